"""A run's metrics: the step window that gathers per-step figures on the device and reduces them
once every ``log_every`` steps, the sinks that write them (metrics.jsonl and TensorBoard, rank 0
only), and the one reader of metrics.jsonl (for `kolm report`, the demo, tests and benchmarks)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kolm.errors import KolmError
from kolm.log import say, warn

METRICS_FILE = "metrics.jsonl"


@dataclass
class RunMetrics:
    """The records of metrics.jsonl by kind, each in step order."""

    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    other: list[dict] = field(default_factory=list)


def _records(path: Path) -> list[dict]:
    """Every record of a metrics file; a run killed mid-write leaves at most a torn last line."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise KolmError(f"{path}:{number} is not JSON; the metrics file is damaged") from None
    return records


def read_metrics(run_dir: str | os.PathLike) -> RunMetrics:
    """A run directory's metrics.jsonl, sorted by step; a missing file is a clear error."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise KolmError(f"{path} not found: give the run directory of a `kolm train` run (its run_dir)")
    found = RunMetrics()
    for record in _records(path):
        kind = record.get("kind", "train")
        (found.train if kind == "train" else found.evals if kind == "eval" else found.other).append(record)
    for records in (found.train, found.evals, found.other):
        records.sort(key=lambda r: r.get("step", 0))
    return found


@dataclass
class _Pending:
    step: int
    consumed_samples: int
    global_batch: int  # samples in this step (changes during a batch ramp)
    loss: torch.Tensor  # this rank's mean over its micro-batches, still on the device
    grad_norm: object  # a tensor or a float from DeepSpeed, or None
    lr: float
    skipped_steps: int


class StepWindow:
    """Per-step figures kept on the device until a flush: then one all-reduce of the window's
    losses, one transfer, and one throughput measurement over the window."""

    def __init__(self, seq_len: int, world_size: int, flops_per_token: float, peak_flops: float,
                 mfu_basis: str = ""):
        self.seq_len, self.world_size = seq_len, world_size
        self.mfu_basis = mfu_basis  # "bf16-equivalent" in fp8 runs: model FLOPs over the bf16 peak
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.pending: list[_Pending] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        """Throughput windows exclude evaluation and checkpoint time."""
        self.started = time.perf_counter()
        self.timed_samples = 0

    def add(self, step: int, consumed: int, batch: int, loss: torch.Tensor, grad_norm, lr: float,
            skipped: int) -> None:
        self.pending.append(_Pending(step, consumed, batch, loss.detach(), grad_norm, lr, skipped))
        self.timed_samples += batch  # tokens/s counts each step's own batch, ramp or not

    def flush(self, timed: bool) -> list[dict]:
        """The window's train records (collective: every rank calls it at the same step).
        ``timed`` attaches tokens/s and MFU to the last record and restarts the clock."""
        if not self.pending:
            return []
        losses = _mean_over_ranks(torch.stack([p.loss for p in self.pending]), self.world_size)
        norms = _floats([p.grad_norm for p in self.pending])
        records = [{"kind": "train", "step": p.step, "consumed_samples": p.consumed_samples,
                    "tokens": p.consumed_samples * self.seq_len, "global_batch": p.global_batch,
                    "loss": loss, "lr": p.lr, "grad_norm": norm, "skipped_steps": p.skipped_steps}
                   for p, loss, norm in zip(self.pending, losses, norms)]
        if timed:
            records[-1].update(self.throughput())
            self.restart_clock()
        self.pending = []
        return records

    def throughput(self) -> dict:
        tps = self.timed_samples * self.seq_len / max(time.perf_counter() - self.started, 1e-9)
        per_device = tps / self.world_size
        basis = {"mfu_basis": self.mfu_basis} if self.mfu_basis else {}
        return {"tokens_per_s": tps, "tokens_per_s_per_device": per_device,
                "mfu": per_device * self.flops_per_token / self.peak_flops, **basis}


def _mean_over_ranks(values: torch.Tensor, world_size: int) -> list[float]:
    import torch.distributed as dist

    values = values.float()
    if dist.is_initialized():
        dist.all_reduce(values)
    return (values / world_size).tolist()


def _floats(values: list) -> list[float | None]:
    """Gradient norms as Python floats (None where not finite), with one device transfer."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    host = iter(torch.stack([t.float().reshape(()) for t in tensors]).tolist()) if tensors else iter(())
    out = []
    for v in values:
        f = next(host) if isinstance(v, torch.Tensor) else (None if v is None else float(v))
        out.append(f if f is not None and f == f and abs(f) != float("inf") else None)
    return out


class MetricSinks:
    """metrics.jsonl (always), TensorBoard (when available) and Weights & Biases (when asked for),
    on rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self.wandb = None  # a kolm.train.wandb_log.WandbSink, set by the trainer when asked for
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                warn("tensorboard is not installed; logging to metrics.jsonl only")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps a resumed run will redo, so the file reads as one run."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in _records(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, records: list[dict]) -> None:
        if not self.enabled or not records:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        if self.wandb is not None:
            self.wandb.write(records)
        if self.tb is not None:
            for record in records:
                self._scalars(record)
            self.tb.flush()

    def _scalars(self, record: dict) -> None:
        kind = record.get("kind", "train")
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "kind"):
                self.tb.add_scalar(f"{kind}/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


class ProgressDisplay:
    """Rank 0's console: a progress bar on a terminal, else (batch job logs) one plain line per
    timed record."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.enabled, self.total = enabled, total
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True,
                            mininterval=1.0)

    def show(self, records: list[dict]) -> None:
        if not self.enabled or not records:
            return
        last = records[-1]
        if self.bar is None:
            if "tokens_per_s" in last:
                say(f"step {last['step']}/{self.total} loss {last['loss']:.4f} lr {last['lr']:.2e} "
                    f"tok/s {last['tokens_per_s']:.0f} mfu {last['mfu']:.1%}")
            return
        self.bar.update(len(records))
        post = {"loss": f"{last['loss']:.4f}", "lr": f"{last['lr']:.2e}"}
        if "tokens_per_s" in last:
            post.update(tok_s=f"{last['tokens_per_s']:.0f}", mfu=f"{last['mfu']:.1%}")
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
