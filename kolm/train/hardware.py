"""Accelerators: data-sheet memory and bf16 peak per card (one table for MFU and `kolm plan`), and
a measured matmul peak where the card is not in it (CPUs, unknown GPUs)."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kolm.files import atomic_write_json, read_json

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Card:
    label: str
    memory_gib: float
    bf16_tflops: float  # dense, from the vendor's data sheet (SXM parts unless named)
    names: tuple[str, ...]  # substrings of torch.cuda.get_device_name() that identify it


# Keys are what `kolm plan --gpu` takes. Order matters for name matching: specific names first.
CARDS: dict[str, Card] = {
    "h200": Card("H200 141GB", 141, 989.0, ("H200",)),
    "h100-pcie": Card("H100 80GB PCIe", 80, 756.0, ("H100 PCIe",)),
    "h100": Card("H100 80GB SXM", 80, 989.0, ("H100",)),
    "a100-40": Card("A100 40GB", 40, 312.0, ("A100-SXM4-40GB", "A100-PCIE-40GB", "A100 40GB")),
    "a100-80": Card("A100 80GB", 80, 312.0, ("A100",)),
    "l40s": Card("L40S 48GB", 48, 362.0, ("L40S",)),
    "a10g": Card("A10G 24GB", 24, 125.0, ("A10G",)),
}


def card_of(device_name: str) -> Card | None:
    """The table's entry for a CUDA device name, if it has one."""
    return next((c for c in CARDS.values() if any(n in device_name for n in c.names)), None)


def device_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for this process's device: the data-sheet bf16 peak
    for known GPUs, else the best measured matmul. On a CPU that is the faster of fp32 and the
    training dtype: CPUs without native bf16 emulate it far below their fp32 peak, and MFU
    measures against what the hardware can do, not against the slow path."""
    import torch

    kind = str(dtype).replace("torch.", "")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        card = card_of(name)
        if card is not None:
            return card.bf16_tflops * 1e12, f"{name}, data sheet {card.bf16_tflops:g} TFLOP/s bf16"
        return measured_matmul_flops(device, dtype, seconds), f"{name}, measured {kind} matmul"
    threads = torch.get_num_threads()
    candidates = {str(d).replace("torch.", ""): d for d in (dtype, torch.float32)}
    best = max((best_cpu_peak(k, threads, measured_matmul_flops(device, d, seconds / len(candidates), n=512)), k)
               for k, d in candidates.items())
    return best[0], f"CPU, {threads} threads, best measured {best[1]} matmul on this machine"


def peak_cache_path() -> Path:
    """Where measured CPU peaks are kept, per machine: $XDG_CACHE_HOME/kolm, else ~/.cache/kolm."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "kolm" / "device_peaks.json"


def _cpu_key(kind: str, threads: int) -> str:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return f"{platform.node()} | {model} | {threads} threads | {kind} | torch {torch.__version__}"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def best_cpu_peak(kind: str, threads: int, measured: float) -> float:
    """The best of this and every earlier measurement on this machine. Other load only ever lowers a
    measurement, so a single one read the same throughput as 28% to 85% MFU; the best so far is a
    stable denominator that only rises towards what the cores can do."""
    path, key = peak_cache_path(), _cpu_key(kind, threads)
    try:
        cache = read_json(path)
        cached = float(cache.get(key, 0.0)) if isinstance(cache, dict) else 0.0
    except (OSError, ValueError, TypeError):
        cache, cached = {}, 0.0
    if measured <= cached:
        return cached
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**(cache if isinstance(cache, dict) else {}), key: measured})
    except OSError:
        pass  # a read-only cache only costs the stability, never the run
    return measured


def measured_matmul_flops(device: torch.device, dtype: torch.dtype | None = None, seconds: float = 1.0,
                          n: int = 1024) -> float:
    """Best sustained matmul FLOP/s over ``seconds``: the device's practical peak."""
    import torch

    if dtype is None:
        dtype = torch.bfloat16
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
