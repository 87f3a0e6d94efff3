"""`kolm report RUN_DIR`: plots and a text summary of a run's metrics.jsonl, without TensorBoard."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from kolm.errors import KolmError
from kolm.train.hang import summarize_reports
from kolm.train.metrics import read_metrics

PLOTS = ("loss.png", "lr.png", "throughput.png")


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def summarize(train: list[dict], evals: list[dict], harness: list[dict] = ()) -> str:
    last = train[-1]
    tail = [r["loss"] for r in train[-min(len(train), 20):] if math.isfinite(r["loss"])]
    lines = [f"steps: {last['step']}, samples: {last['consumed_samples']:,}, tokens: {last['tokens']:,}",
             f"train loss: {statistics.fmean(tail):.4f} (mean of the last {len(tail)} steps), "
             f"first step {train[0]['loss']:.4f}"]
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        final = evals[-1]
        lines.append(f"validation: loss {final['eval_loss']:.4f}, perplexity {final['eval_perplexity']:.2f}, "
                     f"next-token accuracy {final['eval_accuracy']:.1%} at step {final['step']}")
        if evals[0]["step"] < final["step"]:
            lines.append(f"  first evaluation (step {evals[0]['step']}): perplexity {evals[0]['eval_perplexity']:.2f}")
        lines.append(f"  best: loss {best['eval_loss']:.4f} at step {best['step']}")
        lines += [f"  {name}: loss {final[f'eval_loss/{name}']:.4f}, perplexity {final[f'eval_perplexity/{name}']:.2f}"
                  for name in sources(final)]
    lines += _harness_lines(harness)
    lines += _batch_lines(train)
    speed = [r for r in train if "tokens_per_s" in r]
    if speed:
        tps = statistics.median(r["tokens_per_s"] for r in speed)
        mfu = statistics.median(r["mfu"] for r in speed)
        per_device = statistics.median(r["tokens_per_s_per_device"] for r in speed)
        basis = f" {speed[-1]['mfu_basis']}" if speed[-1].get("mfu_basis") else ""
        lines.append(f"throughput: {tps:,.0f} tokens/s ({per_device:,.0f} per device), MFU{basis} {mfu:.1%} (medians)")
    skipped = last.get("skipped_steps", 0)
    if skipped:
        lines.append(f"skipped steps (non-finite loss or gradient): {skipped}")
    return "\n".join(lines)


def batch_steps(train: list[dict]) -> list[tuple[int, int]]:
    """(global batch, first step at it) each time the batch changes (a ramp); one entry when constant."""
    found: list[tuple[int, int]] = []
    for r in train:
        if "global_batch" in r and (not found or found[-1][0] != r["global_batch"]):
            found.append((r["global_batch"], r["step"]))
    return found


def _batch_lines(train: list[dict]) -> list[str]:
    changes = batch_steps(train)
    if len(changes) < 2:
        return [f"global batch: {changes[0][0]}"] if changes else []
    shown = ", ".join(f"{batch} from step {step}" for batch, step in changes)
    return [f"global batch (ramp): {shown}"]


def sources(record: dict) -> list[str]:
    """The data sources a blended run's record names (``eval_loss/NAME``)."""
    return [key.split("/", 1)[1] for key in record if key.startswith("eval_loss/")]


def _harness_lines(harness: list[dict]) -> list[str]:
    """lm-evaluation-harness results, per task: every evaluated step's scores."""
    lines = []
    for task in sorted({r["task"] for r in harness}):
        scores = [r for r in harness if r["task"] == task]
        shown = ", ".join(f"step {r['step']}: " + " ".join(f"{k} {r[k]:.3f}" for k in ("acc", "acc_norm") if k in r)
                          for r in scores)
        lines.append(f"harness {task}: {shown}")
    return lines


def plot(train: list[dict], evals: list[dict], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    return [_plot_loss(train, evals, out / "loss.png", title), _plot_lr(train, out / "lr.png", title),
            _plot_throughput(train, out / "throughput.png", title)]


def _plot_loss(train: list[dict], evals: list[dict], path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    tokens = [r["tokens"] / 1e6 for r in train]
    losses = [r["loss"] for r in train]
    ax.plot(tokens, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
    ax.plot(tokens, smooth(losses, 0.9), color="tab:blue", label="train (smoothed)")
    if evals:
        ax.plot([r["tokens"] / 1e6 for r in evals], [r["eval_loss"] for r in evals], "o-", color="tab:orange",
                label="validation")
        for name in sources(evals[-1]):
            ax.plot([r["tokens"] / 1e6 for r in evals if f"eval_loss/{name}" in r],
                    [r[f"eval_loss/{name}"] for r in evals if f"eval_loss/{name}" in r], ".--", label=f"valid: {name}")
    ax.set(xlabel="tokens (millions)", ylabel="cross-entropy loss", title=f"{title}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _plot_lr(train: list[dict], path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    ax.set(xlabel="step", ylabel="learning rate", title=f"{title}: learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)
    if len(batch_steps(train)) > 1:  # a batch ramp: the global batch of each step beside the rate
        batch = ax.twinx()
        batch.step([r["step"] for r in train], [r.get("global_batch") for r in train], where="post",
                   color="tab:gray", label="global batch")
        batch.set_ylabel("global batch (samples)")
        batch.set_ylim(bottom=0)
        batch.legend(loc="lower right")
    return _save(fig, path)


def _plot_throughput(train: list[dict], path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    speed = [r for r in train if "tokens_per_s" in r]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot([r["step"] for r in speed], [r["tokens_per_s"] for r in speed], ".-", color="tab:purple")
    top.set(ylabel="tokens/s (all devices)", title=f"{title}: throughput")
    bottom.plot([r["step"] for r in speed], [100 * r["mfu"] for r in speed], ".-", color="tab:red")
    bottom.set(xlabel="step", ylabel="MFU (%)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(run_dir: str | Path, out: str | Path | None = None) -> tuple[str, list[Path]]:
    """Plots into ``out`` (default RUN_DIR/report) and summary.txt; returns (summary, plot paths)."""
    run = Path(run_dir)
    metrics = read_metrics(run)
    if not metrics.train:
        raise KolmError(f"{run / 'metrics.jsonl'} has no training steps yet")
    train, evals = metrics.train, metrics.evals
    target = Path(out) if out else run / "report"
    paths = plot(train, evals, target, run.resolve().name)
    text = summarize(train, evals, [r for r in metrics.other if r.get("kind") == "harness"])
    text = "\n".join([text, *summarize_reports(run)])  # the hangs the watchdog reported, and who did not
    (target / "summary.txt").write_text(text + "\n", encoding="utf-8")
    return text, paths
