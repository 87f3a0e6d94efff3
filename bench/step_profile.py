"""Where one training step's time goes: a few steps of a DeepSpeed engine under torch.profiler, every
kernel (on a GPU) or every operator's own time (on a CPU) sorted into categories by its name and by
where it ran (kolm's labelled regions, DeepSpeed's ZeRO code, the optimizer step). Used by
``gpu_bench.py --profile``.

On a GPU the shares are of the steps' wall time without the profiler: kernel time per category, and
the rest (the device waiting for the host, launch gaps) as "host gaps and idle". On a CPU they are of the
training thread's time: each operator's self time, and the rest (Python, the framework between
operators) as host time. The attention row names the SDPA backend that ran: PyTorch's flash,
cuDNN, memory-efficient or math kernel, read from the operator that dispatched it.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

CATEGORIES = ("matmul", "attention", "norm", "rotary", "loss", "elementwise and other", "optimizer",
              "ZeRO gradient copies and buckets", "host gaps and idle")
SDPA_BACKENDS = (  # the aten operator SDPA dispatches to, by backend
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_efficient_attention", "efficient"),
    ("_scaled_dot_product_fused_attention_overrideable", "fused (overrideable)"),
    ("_scaled_dot_product_attention_math", "math"),
    ("_flash_attention", "flash"),
    ("_efficient_attention", "efficient"),
    ("_cudnn_attention", "cudnn"),
    ("flash_attn", "flash-attn package"),
)
NAME_RULES = (  # first match wins on the lower-cased kernel or operator name
    ("loss", ("crossentropy", "cross_entropy", "log_softmax", "nll_loss")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_mha")),
    ("norm", ("layer_norm", "layernorm")),
    ("optimizer", ("adam", "multi_tensor", "_foreach")),
    ("matmul", ("gemm", "mm", "matmul", "linear", "nvjet", "xmma", "cutlass", "scaled_mm", "float8")),
)
LABELS = {"kolm::rotary": "rotary", "kolm::loss": "loss", "kolm::optimizer": "optimizer"}


def classify(name: str) -> str:
    """A category from a kernel's or operator's name alone."""
    low = name.lower()
    for category, needles in NAME_RULES:
        if any(n in low for n in needles):
            return category
    return "elementwise and other"


def sdpa_backends(names) -> list[str]:
    """The SDPA backends whose operators appear among ``names``."""
    found = []
    for name in names:
        for needle, backend in SDPA_BACKENDS:
            if needle in name and backend not in found:
                found.append(backend)
                break
    return found


FRAMES = (  # Python frames (profiled with_stack) that fix a category for everything they run
    ("torch/optim/", "optimizer"), ("deepspeed/ops/adam/", "optimizer"), ("deepspeed/runtime/fp16/", "optimizer"),
    ("deepspeed/runtime/bf16_optimizer", "optimizer"), ("deepspeed/runtime/zero/", "ZeRO gradient copies and buckets"),
)
BACKWARD_NODE = "autograd::engine::evaluate_function"


def _labelled(event, labels: dict[int, str]) -> str | None:
    """The category the innermost enclosing region fixes: kolm's labels, an optimizer's or ZeRO's
    Python code, or, for a backward operator, its forward operator's label. The walk stops at the
    backward node: the autograd engine itself runs inside ZeRO's backward() call."""
    node = event.cpu_parent
    while node is not None:
        if node.name in LABELS:
            return LABELS[node.name]
        if node.name.startswith(BACKWARD_NODE):
            return labels.get(node.sequence_nr)
        for needle, category in FRAMES:
            if needle in node.name:
                return category
        node = node.cpu_parent
    return None


def _forward_labels(events) -> dict[int, str]:
    """Sequence number of each forward operator inside a kolm label: its backward runs under it."""
    out = {}
    for e in events:
        if e.sequence_nr >= 0 and ".py(" not in e.name and not e.name.startswith("autograd::"):
            node = e.cpu_parent
            while node is not None and node.name not in LABELS:
                node = node.cpu_parent
            if node is not None and LABELS[node.name] in ("rotary", "loss"):
                out[e.sequence_nr] = LABELS[node.name]
    return out


def _is_operator(event) -> bool:
    """An operator (aten::mm, deepspeed's ops, a custom kernel), not a Python frame or a region."""
    name = event.name
    return "::" in name and not name.startswith(("autograd::", "kolm::", "ProfilerStep")) and ".py(" not in name


def categorize(events, wall_us: float, on_gpu: bool) -> dict[str, float]:
    """Microseconds per category over the profiled steps (their sum is ``wall_us``)."""
    labels = _forward_labels(events)
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.device_type.name != "CPU" or e.is_async or not _is_operator(e):
            continue
        fixed = _labelled(e, labels)
        if on_gpu:
            for k in e.kernels:
                totals[fixed or classify(k.name)] += k.duration
        else:
            totals[fixed or classify(e.name)] += e.self_cpu_time_total
    if on_gpu and not totals:  # no kernel tied to its operator: the device's own events, by name alone
        for e in events:
            if e.device_type.name == "CUDA":
                totals[classify(e.name)] += e.time_range.end - e.time_range.start
    busy = sum(totals.values())
    totals["host gaps and idle"] = max(0.0, wall_us - busy)
    return {c: totals.get(c, 0.0) for c in CATEGORIES}


@contextlib.contextmanager
def labelled_regions():
    """kolm's regions the profile attributes whole: rotary embedding (transformers' Phi applies it
    through a module function) and the fused loss."""
    import torch
    import transformers.models.phi.modeling_phi as phi

    import kolm.model.phi as kolm_phi

    saved = phi.apply_rotary_pos_emb, kolm_phi.linear_cross_entropy

    def wrap(fn, label):
        def labelled(*args, **kwargs):
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)
        return labelled

    phi.apply_rotary_pos_emb = wrap(saved[0], "kolm::rotary")
    kolm_phi.linear_cross_entropy = wrap(saved[1], "kolm::loss")
    try:
        yield
    finally:
        phi.apply_rotary_pos_emb, kolm_phi.linear_cross_entropy = saved


def profile(step, engine, steps: int, on_gpu: bool) -> dict:
    """Run ``step(engine)`` ``steps`` times under the profiler (after one unprofiled step); the
    categories' shares of the wall time, the seconds per step and the SDPA backends that ran."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with labelled_regions():
        step(engine)  # compiled blocks recompile once for the labelled functions: not timed
        plain = _timed(step, engine, steps, on_gpu)
        with torch.profiler.profile(activities=activities, with_stack=True) as prof:
            profiled = _timed(step, engine, steps, on_gpu)
    events = prof.events()
    if not on_gpu:  # the training thread's operators only (a CPU profile also sees gloo's and the pool's)
        main = {e.thread for e in events if e.name == "kolm::optimizer"}
        events = [e for e in events if e.thread in main]
    # Kernel durations do not change under the profiler, but the host slows down (Python frames are
    # recorded): on a GPU the shares are of the unprofiled steps' time. On a CPU every operator's own
    # time is measured under the profiler, so the profiled time is the whole.
    wall = plain if on_gpu else profiled
    us = categorize(events, wall * 1e6, on_gpu)
    return {"step_s": plain / steps, "shares": {c: v / (wall * 1e6) for c, v in us.items()},
            "sdpa": sdpa_backends({e.name for e in events}) or ["none seen"]}


def _timed(step, engine, steps: int, on_gpu: bool) -> float:
    """Seconds for ``steps`` steps."""
    _sync(on_gpu)
    start = time.perf_counter()
    for _ in range(steps):
        step(engine)
    _sync(on_gpu)
    return time.perf_counter() - start


def _sync(on_gpu: bool) -> None:
    if on_gpu:
        import torch

        torch.cuda.synchronize()


def format_profile(result: dict, setting: str) -> list[str]:
    """The profile as a markdown table under a one-line description."""
    lines = [f"- profile of {setting}: {result['step_s'] * 1e3:,.1f} ms per step; SDPA backend: "
             f"{', '.join(result['sdpa'])}", "", "| category | share of step time |", "|---|--:|"]
    for category in CATEGORIES:
        lines.append(f"| {category} | {result['shares'][category]:.1%} |")
    return lines
