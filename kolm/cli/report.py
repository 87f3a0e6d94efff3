"""`kolm report RUN_DIR`: plots and a text summary of a run's metrics.jsonl, without TensorBoard."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from kolm.errors import KolmError

PLOTS = ("loss.png", "lr.png", "throughput.png")


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) from a run directory's metrics.jsonl, in step order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise KolmError(f"{path} not found: give the run directory of a `kolm train` run (its run_dir)")
    train: list[dict] = []
    evals: list[dict] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves at most a torn last line.
            if number == len(path.read_text(encoding="utf-8").splitlines()):
                continue
            raise KolmError(f"{path}:{number} is not JSON; the metrics file is damaged") from None
        (evals if record.get("kind") == "eval" else train).append(record)
    if not train:
        raise KolmError(f"{path} has no training steps yet")
    return sorted(train, key=lambda r: r["step"]), sorted(evals, key=lambda r: r["step"])


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def summarize(train: list[dict], evals: list[dict]) -> str:
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
    speed = [r for r in train if "tokens_per_s" in r]
    if speed:
        tps = statistics.median(r["tokens_per_s"] for r in speed)
        mfu = statistics.median(r["mfu"] for r in speed)
        per_device = statistics.median(r["tokens_per_s_per_device"] for r in speed)
        lines.append(f"throughput: {tps:,.0f} tokens/s ({per_device:,.0f} per device), MFU {mfu:.1%} (medians)")
    skipped = last.get("skipped_steps", 0)
    if skipped:
        lines.append(f"skipped steps (non-finite loss or gradient): {skipped}")
    return "\n".join(lines)


def plot(train: list[dict], evals: list[dict], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    steps = [r["step"] for r in train]
    tokens = [r["tokens"] / 1e6 for r in train]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    losses = [r["loss"] for r in train]
    ax.plot(tokens, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
    ax.plot(tokens, smooth(losses, 0.9), color="tab:blue", label="train (smoothed)")
    if evals:
        ax.plot([r["tokens"] / 1e6 for r in evals], [r["eval_loss"] for r in evals], "o-", color="tab:orange",
                label="validation")
    ax.set(xlabel="tokens (millions)", ylabel="cross-entropy loss", title=f"{title}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "loss.png"))

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(steps, [r["lr"] for r in train], color="tab:green")
    ax.set(xlabel="step", ylabel="learning rate", title=f"{title}: learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)
    written.append(_save(fig, out / "lr.png"))

    speed = [r for r in train if "tokens_per_s" in r]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot([r["step"] for r in speed], [r["tokens_per_s"] for r in speed], ".-", color="tab:purple")
    top.set(ylabel="tokens/s (all devices)", title=f"{title}: throughput")
    bottom.plot([r["step"] for r in speed], [100 * r["mfu"] for r in speed], ".-", color="tab:red")
    bottom.set(xlabel="step", ylabel="MFU (%)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    written.append(_save(fig, out / "throughput.png"))
    return written


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
    train, evals = read_metrics(run)
    target = Path(out) if out else run / "report"
    paths = plot(train, evals, target, run.resolve().name)
    text = summarize(train, evals)
    (target / "summary.txt").write_text(text + "\n", encoding="utf-8")
    return text, paths
