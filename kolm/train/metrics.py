"""Metrics: next-token loss/perplexity/accuracy (one implementation for training, evaluation
and `kolm eval`), throughput and MFU against the device's peak, and the run's metric sinks."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# Dense bf16 peak per device, TFLOP/s (vendor data sheets; SXM parts unless named).
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "A10G": 125.0,
    "L40S": 362.0,
}


def device_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for this process's device: the data-sheet bf16 peak
    for known GPUs, else the best measured matmul. On a CPU that is the faster of fp32 and the
    training dtype: CPUs without native bf16 emulate it far below their fp32 peak, and MFU
    measures against what the hardware can do, not against the slow path."""
    kind = str(dtype).replace("torch.", "")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name}, data sheet {tflops:g} TFLOP/s bf16"
        return measured_matmul_flops(device, dtype, seconds), f"{name}, measured {kind} matmul"
    threads = torch.get_num_threads()
    candidates = {str(d).replace("torch.", ""): d for d in (dtype, torch.float32)}
    best = max((measured_matmul_flops(device, d, seconds / len(candidates), n=512), k) for k, d in candidates.items())
    return best[0], f"CPU, {threads} threads, measured {best[1]} matmul"


def measured_matmul_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, seconds: float = 1.0,
                          n: int = 1024) -> float:
    """Best sustained matmul FLOP/s over ``seconds``: the device's practical peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    (a @ b).sum().item()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            c = a @ b
        c.sum().item()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best


def token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(summed cross-entropy, correct next-token predictions, tokens) for one batch.

    ``logits[:, i]`` is the prediction for ``targets[:, i]``, i.e. token i+1 of the window;
    every target is a real token (packed windows carry no padding).
    """
    flat = logits.float().reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    loss_sum = F.cross_entropy(flat, t, reduction="sum")
    correct = (flat.argmax(dim=-1) == t).sum()
    return loss_sum, correct, t.numel()


@dataclass
class EvalTotals:
    loss_sum: float = 0.0
    correct: float = 0.0
    tokens: float = 0.0

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, tokens: int) -> None:
        self.loss_sum += float(loss_sum)
        self.correct += float(correct)
        self.tokens += tokens

    def all_reduce(self, device: torch.device) -> EvalTotals:
        import torch.distributed as dist

        t = torch.tensor([self.loss_sum, self.correct, self.tokens], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(t)
        return EvalTotals(*t.tolist())

    def summary(self) -> dict:
        loss = self.loss_sum / max(self.tokens, 1)
        return {
            "eval_loss": loss,
            "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_accuracy": self.correct / max(self.tokens, 1),
            "eval_tokens": int(self.tokens),
        }


class MetricSinks:
    """metrics.jsonl (always), TensorBoard (when available), on rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("kolm: tensorboard is not installed; logging to metrics.jsonl only", file=sys.stderr)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps a resumed run will redo, so the file reads as one run."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.tb is not None:
            kind = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self.tb.add_scalar(f"{kind}/{key}", value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
