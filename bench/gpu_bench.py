"""One GPU: kolm's training step (DeepSpeed ZeRO-2, bf16, the fused loss) at phi-160m and phi-1.5 sizes,
against the card's data-sheet peak and against the seed recipe on the same GPU and text.

For each model and sequence length (512, 2048) it climbs a ladder of micro batches (1, 2, 4, ...) until
memory runs out or throughput stops growing, with sdpa attention and no compilation; at the best micro
batch it then tries flash-attention 2 (when the flash-attn package is installed) and compiled blocks.
Each point reports tokens/s, MFU against the card's bf16 peak (kolm.train.hardware) and peak GPU memory.
The seed recipe (Hugging Face Trainer, per-device batch 4, one padded line per sample, bf16) runs on the
same text for the useful-tokens/s ratio. Points run in order of importance inside ``--budget`` seconds
(default 420, so the whole command ends within 8 minutes); what does not fit is listed as skipped.

    python bench/gpu_bench.py --corpus corpus.txt.gz             # on the GPU machine; appends to RESULTS.md
    python bench/gpu_bench.py --smoke --no-record                # the same code on CPU, tiny shapes, minutes

Each (model, seq_len, kernel) group runs in a child process of its own, so an out-of-memory error or a
compilation failure ends that group only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import common

HEADING = "## One GPU"
FUSED = ", q/k/v/fc1 fused"
LADDER = (1, 2, 4, 8, 16, 32, 64)
PROFILE_RESERVE = 100.0  # seconds of the budget kept for the profile


@dataclass(frozen=True)
class Group:
    """Points measured in one child process: one model, length and kernel, several micro batches."""

    model: str
    seq_len: int
    attn: str = "sdpa"
    compile: bool = False
    micro_batches: tuple[int, ...] = LADDER
    climb: bool = True  # stop the ladder when throughput stops growing
    zero_stage: int = 2
    precision: str = ""  # "": the plan's (bf16 on a GPU, fp32 in smoke mode); "fp8": float8 decoder blocks
    fused: bool = False  # q, k, v and fc1 from one matrix product (fused_projection.py; not under ZeRO-3)


@dataclass
class Point:
    model: str
    seq_len: int
    attn: str
    compile: bool
    micro_batch: int
    tokens_per_s: float | None = None
    mfu: float | None = None  # for fp8 points bf16-equivalent: model FLOPs against the bf16 peak
    peak_gib: float | None = None
    error: str = ""
    zero_stage: int = 2
    precision: str = ""
    tokens_per_cpu_s: float | None = None  # tokens per second of this process's CPU time (the CPU ratios)
    final_loss: float | None = None  # after every step on the same fixed batch (fp8 against bf16)
    fused: bool = False


@dataclass
class Plan:
    smoke: bool
    steps: int
    warmup: int
    dtype: str
    groups: list[Group] = field(default_factory=list)
    torch_adam: bool = False  # PyTorch's AdamW instead of DeepSpeed's JIT-built FusedAdam
    zero_stages: tuple[int, ...] = ()  # more ZeRO stages to try at each group's best micro batch
    profile: bool = False  # profile the fastest point (step_profile) after the measurements
    name: str = ""  # "frontier": the fixed A/B rows of `--plan frontier`


def parse_groups(text: str) -> list[Group]:
    """``phi-1.5:2048:8,phi-160m:512``: model, sequence length and, optionally, one micro batch."""
    from kolm.model.presets import get_shape

    groups = []
    for item in filter(None, text.split(",")):
        model, *numbers = item.split(":")
        if len(numbers) not in (1, 2) or not all(n.isdigit() and int(n) > 0 for n in numbers):
            raise ValueError(f"--groups: {item!r} is not MODEL:SEQ or MODEL:SEQ:MICRO_BATCH (e.g. phi-1.5:2048:8)")
        get_shape(model)  # an unknown preset is refused here, not in a child
        groups.append(Group(model, int(numbers[0]), micro_batches=tuple(map(int, numbers[1:])) or LADDER))
    return groups


def make_plan(smoke: bool, only: str = "", name: str = "") -> Plan:
    """The groups in order of importance (the budget cuts from the end), or ``only`` those named."""
    plan = frontier_plan(smoke) if name == "frontier" else _default_plan(smoke)
    if only:
        plan.groups = parse_groups(only)
    return plan


def frontier_plan(smoke: bool) -> Plan:
    """A/B rows at the best known setting (phi-1.5, seq 2048, micro batch 8, compiled blocks): ZeRO
    stage 2/0/1, fp8 decoder blocks, q/k/v/fc1 fused into one matrix product, compilation off; then a
    profile of the fastest row."""
    base = _default_plan(smoke)
    model, seq, mb = ("phi-tiny", 64, 2) if smoke else ("phi-1.5", 2048, 8)

    def row(stage: int, compiled: bool = True, precision: str = "", fused: bool = False) -> Group:
        return Group(model, seq, "sdpa", compiled, (mb,), False, stage, precision, fused)

    groups = [row(2), row(0), row(2, precision="fp8"), row(2, fused=True), row(1), row(2, compiled=False),
              row(0, compiled=False)]
    return Plan(smoke, base.steps, base.warmup, base.dtype, groups, profile=True, name="frontier")


def _default_plan(smoke: bool) -> Plan:
    if smoke:
        # The compiled point follows from the ladder (variants); fp32, as inductor builds no bf16 kernels
        # for these blocks on CPU.
        return Plan(True, 3, 1, "fp32", [Group("phi-tiny", 64, micro_batches=(1, 2))])
    groups = [Group("phi-1.5", 2048), Group("phi-1.5", 512), Group("phi-160m", 2048), Group("phi-160m", 512)]
    return Plan(False, 8, 3, "bf16", groups)


def variants(best: Point, flash: bool, stages: tuple[int, ...] = ()) -> list[Group]:
    """At a group's best micro batch: the ZeRO stages asked for (the ladder's own stage again, if
    listed: a repeat that shows the noise), compiled blocks, and flash-attention 2 when it is installed."""
    out = [Group(best.model, best.seq_len, best.attn, False, (best.micro_batch,), False, s) for s in stages]
    out.append(Group(best.model, best.seq_len, best.attn, True, (best.micro_batch,), False))
    if flash:
        out += [Group(best.model, best.seq_len, "flash_attention_2", c, (best.micro_batch,), False)
                for c in (False, True)]
    return out


# --------------------------------------------------------------------------- child: kolm's step


def _engine(group: Group, micro_batch: int, dtype: str, vocab: int, torch_adam: bool):
    import torch

    from kolm.model.presets import build_config, get_shape
    from kolm.train import dsconfig
    from kolm.train.config import RunConfig
    from kolm.train.engine import build_engine
    from kolm.train.setup import check_kernels

    cfg = RunConfig(model=group.model, seq_len=group.seq_len, global_batch=micro_batch, micro_batch=micro_batch,
                    zero_stage=group.zero_stage, precision=group.precision or dtype, warmup_steps=1,
                    attn_implementation=group.attn, compile=group.compile)
    check_kernels(cfg)  # what `kolm train --check` refuses (fp8 off Hopper, ...) ends the point with its message
    if group.fused and (group.zero_stage == 3 or cfg.precision == "fp8"):
        raise ValueError("fused projections need plain linear layers under ZeRO stage 0, 1 or 2 (not fp8, not ZeRO-3)")
    ds_config = dsconfig.build(cfg, 1, 1, on_cpu=torch_adam or not torch.cuda.is_available())
    config = build_config(get_shape(group.model), vocab, 0, 0, group.seq_len, group.attn)
    engine = build_engine(config, ds_config, 0, cfg.weight_decay, False, group.compile and not group.fused,
                          fp8=cfg.precision == "fp8")
    if group.fused:
        _fuse(engine, group.compile)
    return engine


def _fuse(engine, compile: bool) -> None:
    """Fuse the projections of the engine's model, then compile its blocks if asked. The engine's module
    is the model itself, DeepSpeed (ZeRO 0-2) leaves the blocks' forward alone (fuse_projections refuses a
    replaced one) and torch.compile traces at the first call: compiled here, the fused blocks are compiled
    as kolm.train.engine.build_engine compiles plain ones before deepspeed.initialize."""
    from fused_projection import fuse_projections

    from kolm.train.engine import compile_blocks

    fuse_projections(engine.module)
    if compile:
        compile_blocks(engine.module)


def _timed_steps(engine, micro_batch: int, seq_len: int, vocab: int, warmup: int,
                 steps: int) -> tuple[float, float, float]:
    """Seconds per optimizer step, wall clock and this process's CPU time, the medians of ``steps``
    after ``warmup``, and the last step's loss. On a CPU shared with other work the CPU time is the
    steadier measure: with one thread it counts the step's own work, not the waits for a core."""
    import statistics

    step = train_step(engine, micro_batch, seq_len, vocab)
    seconds, cpu = [], []
    for i in range(warmup + steps):
        _sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = step(engine)
        _sync()
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return statistics.median(seconds), statistics.median(cpu), float(loss)


def train_step(engine, micro_batch: int, seq_len: int, vocab: int):
    """One optimizer step on a fixed random batch, as `kolm train` makes it (the step is labelled
    for the profile)."""
    import torch

    generator = torch.Generator(engine.device).manual_seed(0)  # the same batch for every point
    x = torch.randint(0, vocab, (micro_batch, seq_len + 1), device=engine.device, generator=generator)

    def step(engine) -> torch.Tensor:
        loss = engine(input_ids=x[:, :-1], targets=x[:, 1:]) / (micro_batch * seq_len)
        engine.backward(loss)
        with torch.profiler.record_function("kolm::optimizer"):
            engine.step()
        return loss.detach()

    return step


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_point(group: Group, micro_batch: int, plan: Plan, vocab: int, peak: float) -> Point:
    import gc

    import torch

    from kolm.model.flops import flops_per_token
    from kolm.model.presets import get_shape

    point = Point(group.model, group.seq_len, group.attn, group.compile, micro_batch, zero_stage=group.zero_stage,
                  precision=group.precision or plan.dtype, fused=group.fused)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    engine = None
    try:
        engine = _engine(group, micro_batch, plan.dtype, vocab, plan.torch_adam)
        step, cpu, point.final_loss = _timed_steps(engine, micro_batch, group.seq_len, vocab, plan.warmup,
                                                   plan.steps)
        point.tokens_per_s = micro_batch * group.seq_len / step
        point.tokens_per_cpu_s = micro_batch * group.seq_len / cpu if cpu > 0 else None
        point.mfu = point.tokens_per_s * flops_per_token(get_shape(group.model), vocab, group.seq_len) / peak
        if torch.cuda.is_available():
            point.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    except torch.cuda.OutOfMemoryError:
        point.error = "out of memory"
    except Exception as e:  # a kernel or compiler failure ends this point, reported, not the benchmark
        point.error = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return point


def child_group(group: Group, plan: Plan, vocab: int) -> list[Point]:
    import torch

    from kolm.train import distenv
    from kolm.train.engine import join_process_group
    from kolm.train.hardware import device_peak_flops

    join_process_group(distenv.DistEnv(0, 1, 0, "127.0.0.1", distenv.free_port(), "single"))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    peak, _ = device_peak_flops(device, torch.bfloat16 if plan.dtype == "bf16" else torch.float32)
    points: list[Point] = []
    for mb in group.micro_batches:
        points.append(measure_point(group, mb, plan, vocab, peak))
        done = [p.tokens_per_s for p in points if p.tokens_per_s]
        if points[-1].error or (group.climb and len(done) >= 2 and done[-1] < 1.03 * done[-2]):
            break
    return points


def child_profile(group: Group, plan: Plan, vocab: int) -> dict:
    """A few steps of one point under torch.profiler (step_profile): shares of the step time."""
    import step_profile
    import torch

    from kolm.train import distenv
    from kolm.train.engine import join_process_group

    join_process_group(distenv.DistEnv(0, 1, 0, "127.0.0.1", distenv.free_port(), "single"))
    mb = group.micro_batches[0]
    engine = _engine(group, mb, plan.dtype, vocab, plan.torch_adam)
    step = train_step(engine, mb, group.seq_len, vocab)
    for _ in range(plan.warmup):
        step(engine)
    return step_profile.profile(step, engine, max(2, plan.steps // 2), torch.cuda.is_available())


# --------------------------------------------------------------------------- child: the seed recipe


def child_seed(corpus: Path, tokenizer: Path, model: str, seq_len: int, smoke: bool) -> dict:
    """The seed's training (HF Trainer, per-device batch 4, accumulation 4, padded lines) for a few steps:
    useful (non-padding) tokens per second."""
    import torch
    import transformers as hf

    from kolm.model.presets import build_config, get_shape, padded_vocab

    tok = hf.AutoTokenizer.from_pretrained(str(tokenizer))
    tok.pad_token = tok.eos_token  # as the seed script did
    lines = common.read_lines(corpus)[: 2000 if smoke else 40000]
    enc = tok(lines, truncation=True, max_length=seq_len, return_overflowing_tokens=True)
    samples = [{"input_ids": ids} for ids in enc["input_ids"]]
    config = build_config(get_shape(model), padded_vocab(len(tok)), tok.eos_token_id, tok.eos_token_id, 2048)
    torch.manual_seed(0)
    timing = _seed_timing(hf.TrainerCallback)()
    args = hf.TrainingArguments(output_dir=str(common.OUT / "gpu-seed"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=4, learning_rate=5e-4, weight_decay=0.1,
                             max_steps=4 if smoke else 30, bf16=torch.cuda.is_available(), logging_steps=1000,
                             save_strategy="no", report_to=[], dataloader_num_workers=0, use_cpu=smoke)
    model_obj = hf.PhiForCausalLM(config)
    model_obj.register_forward_pre_hook(timing.count, with_kwargs=True)
    hf.Trainer(model=model_obj, args=args, train_dataset=samples, callbacks=[timing],
               data_collator=hf.DataCollatorForLanguageModeling(tok, mlm=False)).train()
    return timing.report(warmup=1 if smoke else 5)


def _seed_timing(base: type) -> type:
    """A Trainer callback (and forward pre-hook) that counts useful tokens and times every step."""

    class SeedTiming(base):
        def __init__(self):
            self.tokens, self.step_tokens, self.marks = 0, [], []

        def count(self, module, args, kwargs) -> None:
            mask = kwargs.get("attention_mask")
            self.tokens += int(mask.sum()) if mask is not None else int(kwargs["input_ids"].numel())

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            self.marks.append(time.perf_counter())
            self.step_tokens.append(self.tokens)
            self.tokens = 0

        def report(self, warmup: int) -> dict:
            seconds = [b - a for a, b in zip(self.marks, self.marks[1:])][warmup:]
            useful = self.step_tokens[1:][warmup:]
            return {"useful_tokens_per_s": sum(useful) / sum(seconds), "steps": len(seconds)}

    return SeedTiming


# --------------------------------------------------------------------------- parent


def run_child(args: list[str], timeout: float) -> dict | None:
    cmd = [sys.executable, __file__, *args]
    env = common.bench_env(DS_ACCELERATOR="cpu") if "--smoke" in args else common.bench_env()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"ran past its share of the budget ({timeout:.0f} s)"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def child_flags(opts: argparse.Namespace) -> list[str]:
    """What every child is told: the vocabulary, the plan and the options that shape a step."""
    return ["--vocab", str(opts.vocab), "--steps", str(opts.steps or 0), *(["--smoke"] if opts.smoke else []),
            *(["--torch-adam"] if opts.torch_adam else []), *(["--plan", opts.plan] if opts.plan else [])]


def run_profile(opts: argparse.Namespace, points: list[Point], deadline: float) -> tuple[Point | None, dict | None]:
    """Profile the fastest point in a child of its own, in what is left of the budget."""
    done = [p for p in points if p.tokens_per_s]
    if not done:
        return None, None
    best = max(done, key=lambda p: p.tokens_per_s)
    group = Group(best.model, best.seq_len, best.attn, best.compile, (best.micro_batch,), False, best.zero_stage,
                  best.precision if best.precision == "fp8" else "", best.fused)
    left = max(30.0, deadline - time.monotonic())
    return best, run_child(["--child-profile", json.dumps(asdict(group)), *child_flags(opts)], left)


def run_all(opts: argparse.Namespace, plan: Plan, flash: bool) -> tuple[list[Point], dict | None, list[str]]:
    deadline = opts.deadline
    points, skipped, seed = [], [], None
    queue = list(plan.groups)
    seed_args = ["--child-seed", "--corpus", str(opts.corpus), "--tokenizer", str(opts.tokenizer),
                 "--seed-model", plan.groups[0].model, *(["--smoke"] if opts.smoke else [])]
    reserve = PROFILE_RESERVE if plan.profile else 0.0
    while queue:
        group = queue.pop(0)
        left = deadline - reserve - time.monotonic()
        if left < 30:
            skipped.append(f"{group.model} seq {group.seq_len} {group.attn}{' compiled' if group.compile else ''}"
                           f"{' fused' if group.fused else ''} ZeRO-{group.zero_stage} {group.precision}".rstrip())
            continue
        result = run_child(["--child-group", json.dumps(asdict(group)), *child_flags(opts)], left)
        got = [Point(**p) for p in result.get("points", [])] or [
            Point(group.model, group.seq_len, group.attn, group.compile, group.micro_batches[0],
                  error=result.get("error"), zero_stage=group.zero_stage, precision=group.precision or plan.dtype,
                  fused=group.fused)]
        points += got
        best = max((p for p in got if p.tokens_per_s), key=lambda p: p.tokens_per_s, default=None)
        if best and group.climb:
            queue[1:1] = variants(best, flash, plan.zero_stages)
        if seed is None and len(points) >= 1 and not opts.no_seed:
            seed = run_child(seed_args, max(30.0, deadline - time.monotonic()))
    return points, seed, skipped


def format_report(points: list[Point], seed: dict | None, skipped: list[str], opts: argparse.Namespace,
                  profiled: tuple[Point | None, dict | None] = (None, None)) -> str:
    import torch

    optimizer = "PyTorch AdamW" if opts.torch_adam or not torch.cuda.is_available() else "DeepSpeed FusedAdam"
    lines = [f"### {common.timestamp(utc=True)}", "", f"- device: {device_line()}",
             f"- kolm revision: {common.git_revision()}; command: `{opts.command}`",
             f"- kolm: one process, DeepSpeed ZeRO (stage per row), fused loss, random token windows (every token "
             f"useful), {opts.vocab:,} embedding rows, {optimizer}; MFU against the card's data-sheet bf16 peak "
             "(for fp8 rows bf16-equivalent: the same model FLOPs over the bf16 peak)", "",
             "| model | seq | attention | compiled | micro batch | tokens/s | MFU | peak GiB | ZeRO | precision "
             "| q, k, v, fc1 | note |",
             "|---|--:|---|---|--:|--:|--:|--:|--:|---|---|---|"]
    for p in points:
        mfu = f"{p.mfu:.1%}{' (bf16-eq.)' if p.precision == 'fp8' else ''}" if p.tokens_per_s else "-"
        lines.append(f"| {p.model} | {p.seq_len} | {p.attn} | {'yes' if p.compile else 'no'} | {p.micro_batch} | "
                     + (f"{p.tokens_per_s:,.0f} | {mfu} | " if p.tokens_per_s else "- | - | ")
                     + (f"{p.peak_gib:.1f} | " if p.peak_gib is not None else "- | ")
                     + f"{p.zero_stage} | {p.precision} | {'one GEMM' if p.fused else 'four GEMMs'} | {p.error} |")
    lines.append("")
    lines += _summary(points, seed, skipped) + _profile_lines(*profiled)
    return "\n".join(lines) + "\n"


def device_line() -> str:
    """The card (or CPU) and the versions a GPU figure depends on."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        card = f"{torch.cuda.get_device_name(0)} (sm{major}{minor})"
    else:
        card = f"CPU ({common.cpu_model()})"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return (f"{card}; CUDA {torch.version.cuda or 'none'}, cuDNN {cudnn or 'none'}; "
            f"{common.library_versions(['torch', 'deepspeed', 'transformers', 'torchao', 'flash-attn'])}")


def _profile_lines(point: Point | None, result: dict | None) -> list[str]:
    if result is None:
        return []
    if "shares" not in result:
        return [f"- profile: {result.get('error', 'no result')}"]
    import step_profile

    setting = (f"{point.model} seq {point.seq_len} micro batch {point.micro_batch}, ZeRO-{point.zero_stage}, "
               f"{point.precision}{', compiled' if point.compile else ''}{FUSED if point.fused else ''}")
    return ["", *step_profile.format_profile(result, setting)]


def _summary(points: list[Point], seed: dict | None, skipped: list[str]) -> list[str]:
    lines = []
    big = [p for p in points if p.tokens_per_s and p.model == points[0].model]
    if big:
        best = max(big, key=lambda p: p.mfu)
        lines.append(f"- best {best.model}: {best.mfu:.1%} MFU at seq {best.seq_len}, micro batch {best.micro_batch} "
                     f"({best.attn}{', compiled' if best.compile else ''}{FUSED if best.fused else ''}); goal 50%")
    if seed and "useful_tokens_per_s" in seed and big:
        best_tps = max(p.tokens_per_s for p in big)
        ratio = best_tps / seed["useful_tokens_per_s"]
        lines.append(f"- seed recipe ({points[0].model}, HF Trainer, batch 4 x 4, padded lines): "
                     f"{seed['useful_tokens_per_s']:,.0f} useful tokens/s; kolm/seed {ratio:.1f}x (goal 10x)")
    elif seed:
        lines.append(f"- seed recipe: {seed.get('error', 'not measured')}")
    if skipped:
        lines.append(f"- not measured within the budget: {', '.join(skipped)}")
    return lines + stage_ratios(points) + fp8_parity(points) + fused_ratios(points)


def fp8_parity(points: list[Point]) -> list[str]:
    """Each fp8 point against the bf16 point of the same setting: the loss after the same steps on the
    same batch, and tokens/s."""
    lines = []
    for p in points:
        twin = next((q for q in points if q.precision == "bf16" and q.final_loss is not None and
                     (q.model, q.seq_len, q.attn, q.compile, q.micro_batch, q.zero_stage, q.fused) ==
                     (p.model, p.seq_len, p.attn, p.compile, p.micro_batch, p.zero_stage, p.fused)), None)
        if p.precision != "fp8" or p.final_loss is None or twin is None:
            continue
        lines.append(f"- fp8 against bf16 ({p.model} seq {p.seq_len} micro batch {p.micro_batch}, ZeRO-{p.zero_stage}"
                     f"{', compiled' if p.compile else ''}): loss after the same steps on the same batch "
                     f"{p.final_loss:.4f} against {twin.final_loss:.4f} ({p.final_loss / twin.final_loss - 1:+.2%}); "
                     f"tokens/s {p.tokens_per_s / twin.tokens_per_s:.3f}x")
    return lines


def fused_ratios(points: list[Point]) -> list[str]:
    """Each fused-projection point against the four-GEMM point of the same setting: tokens/s (on a CPU
    tokens per CPU-second) and the loss after the same steps on the same batch."""
    import torch

    gpu = torch.cuda.is_available()
    lines = []
    for p in points:
        setting = (p.model, p.seq_len, p.attn, p.compile, p.micro_batch, p.zero_stage, p.precision)
        twin = next((q for q in points if not q.fused and q.tokens_per_s and
                     (q.model, q.seq_len, q.attn, q.compile, q.micro_batch, q.zero_stage, q.precision) == setting),
                    None)
        if not p.fused or not p.tokens_per_s or twin is None:
            continue
        ratio = p.tokens_per_s / twin.tokens_per_s if gpu else (p.tokens_per_cpu_s or 0) / (twin.tokens_per_cpu_s or 1)
        measure = "tokens/s" if gpu else "tokens per CPU-second"
        lines.append(f"- one GEMM for q, k, v, fc1 against four ({p.model} seq {p.seq_len} micro batch {p.micro_batch}"
                     f", ZeRO-{p.zero_stage}{', compiled' if p.compile else ''}): {measure} {ratio:.3f}x (a fused "
                     f"layout needs >= 1.03x); loss after the same steps {p.final_loss:.4f} against "
                     f"{twin.final_loss:.4f}")
    return lines


def stage_ratios(points: list[Point]) -> list[str]:
    """Tokens/s of each ZeRO stage against ZeRO-2 at the same setting (means over repeats); on a CPU
    by CPU time (tokens per CPU-second of the one-thread process), which other work disturbs less."""
    import torch

    gpu = torch.cuda.is_available()
    by: dict[tuple, dict[int, list[float]]] = {}
    for p in points:
        rate = p.tokens_per_s if gpu else p.tokens_per_cpu_s
        if rate and p.precision != "fp8" and not p.fused:
            key = (p.model, p.seq_len, p.attn, p.compile, p.micro_batch, p.precision)
            by.setdefault(key, {}).setdefault(p.zero_stage, []).append(rate)
    lines = []
    for (model, seq, attn, compiled, mb, _), stages in by.items():
        if 2 not in stages or len(stages) < 2:
            continue
        base = sum(stages[2]) / len(stages[2])
        ratios = ", ".join(f"ZeRO-{s} {sum(v) / len(v) / base:.3f}" for s, v in sorted(stages.items()) if s != 2)
        spread = f"; ZeRO-2 repeats within {max(stages[2]) / min(stages[2]) - 1:.1%}" if len(stages[2]) > 1 else ""
        measure = "tokens/s" if gpu else "tokens per CPU-second"
        lines.append(f"- {model} seq {seq} micro batch {mb} ({attn}{', compiled' if compiled else ''}): {measure} "
                     f"against ZeRO-2: {ratios}{spread}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="the same code on CPU with tiny shapes")
    p.add_argument("--corpus", type=Path, default=common.DEFAULT_CORPUS, help="text for the seed recipe")
    p.add_argument("--tokenizer", type=Path, default=None, help="default: trained on --corpus (cached)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all measurements (default 420)")
    p.add_argument("--no-seed", action="store_true", help="skip the seed recipe")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--groups", default="", help="only these points, in order: MODEL:SEQ[:MICRO_BATCH],... "
                   "(default: phi-1.5 and phi-160m at 2048 and 512, climbing micro batches)")
    p.add_argument("--torch-adam", action="store_true", help="PyTorch's AdamW instead of DeepSpeed's FusedAdam "
                   "(where the CUDA op cannot be built)")
    p.add_argument("--zero-stages", default="", help="more ZeRO stages to measure at each group's best micro "
                   "batch, e.g. 0,1 (the ladder runs at ZeRO-2)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per point (default 8; 3 with --smoke)")
    p.add_argument("--profile", action="store_true", help="then profile the fastest point under torch.profiler: "
                   "shares of the step time by category, and the SDPA backend that ran")
    p.add_argument("--plan", choices=("frontier",), default="", help="frontier: A/B rows at phi-1.5, seq 2048, "
                   "micro batch 8 (ZeRO 2/0/1, fp8, fused q/k/v/fc1, compile on/off) and the profile, within --budget; "
                   "no corpus")
    p.add_argument("--out", type=Path, default=None, help="also write the report here (default with --plan "
                   "frontier: $OUT/gpu_frontier.md when $OUT is set)")
    p.add_argument("--child-group", help=argparse.SUPPRESS)
    p.add_argument("--child-profile", help=argparse.SUPPRESS)
    p.add_argument("--child-seed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed-model", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if not all(x.strip() in ("0", "1", "2", "3") for x in filter(None, opts.zero_stages.split(","))):
        p.error(f"--zero-stages: {opts.zero_stages!r} is not a comma-separated list of 0, 1, 2, 3")
    return opts


def child_main(opts: argparse.Namespace) -> None:
    plan = make_plan(opts.smoke, name=opts.plan)
    plan.steps = opts.steps or plan.steps
    plan.torch_adam = opts.torch_adam
    if opts.child_seed:
        print(json.dumps(child_seed(opts.corpus, opts.tokenizer, opts.seed_model, 512 if not opts.smoke else 64,
                                    opts.smoke)))
        return
    raw = json.loads(opts.child_group or opts.child_profile)
    group = Group(**{**raw, "micro_batches": tuple(raw["micro_batches"])})
    if opts.child_profile:
        print(json.dumps(child_profile(group, plan, opts.vocab)))
        return
    points = child_group(group, plan, opts.vocab)
    print(json.dumps({"points": [asdict(p) for p in points]}))


def prepare(opts: argparse.Namespace, plan: Plan) -> None:
    """The vocabulary (the tokenizer's, trained on the corpus for the seed recipe; a frontier run takes
    phi-1.5's 51,200 rows and needs no corpus)."""
    from kolm.model.presets import padded_vocab

    if plan.name == "frontier":
        opts.no_seed, opts.vocab = True, padded_vocab(2000 if opts.smoke else 51200)
        return
    if not opts.corpus.is_file():
        common.die(f"no corpus at {opts.corpus}; pass --corpus PATH (one document per line, .txt or .txt.gz)")
    corpus = common.prepare_corpus(opts.corpus, 2000 if opts.smoke else 50_000)
    opts.corpus = corpus
    opts.tokenizer = opts.tokenizer or common.ensure_tokenizer(corpus, 2000 if opts.smoke else 51200)
    from kolm.data.tokenizer import load_tokenizer_info

    opts.vocab = padded_vocab(load_tokenizer_info(opts.tokenizer).vocab_size)  # kolm's and the seed's LM head


def main(argv: list[str] | None = None) -> int:
    import importlib.util
    import os

    opts = parse_args(argv)
    if opts.child_group or opts.child_seed or opts.child_profile:
        child_main(opts)
        return 0
    try:
        plan = make_plan(opts.smoke, opts.groups, opts.plan)
    except Exception as e:  # a malformed --groups or an unknown preset
        common.die(str(e))
    plan.zero_stages = tuple(int(x) for x in filter(None, opts.zero_stages.split(",")))
    plan.profile = plan.profile or opts.profile
    opts.command = common.command_line("python", "bench/gpu_bench.py", argv)
    opts.deadline = time.monotonic() + opts.budget
    prepare(opts, plan)
    flash = importlib.util.find_spec("flash_attn") is not None and not opts.smoke
    points, seed, skipped = run_all(opts, plan, flash)
    profiled = run_profile(opts, points, opts.deadline) if plan.profile else (None, None)
    report = format_report(points, seed, skipped, opts, profiled)
    out = opts.out or (Path(os.environ["OUT"]) / "gpu_frontier.md" if plan.name == "frontier" and
                       os.environ.get("OUT") else None)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report, encoding="utf-8")
    common.publish(report, HEADING, "bench/gpu_bench.py", not opts.no_record)
    return 0 if any(p.tokens_per_s for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
