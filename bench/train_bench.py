"""Training throughput: `kolm train` (packed windows, DeepSpeed ZeRO-2) vs the seed's HF Trainer recipe.

One run prepares (or reuses, from ``bench/out/``) a tokenizer trained with kolm and kolm shards of the same
text, then measures, on the same model shape, sequence length and global batch:

* ``seed``    the recipe kolm replaces: every line is one sample (``tok(..., truncation=True,
              max_length=seq_len, return_overflowing_tokens=True)`` through ``datasets.map``), batches padded by
              ``DataCollatorForLanguageModeling(mlm=False)``, ``PhiForCausalLM`` trained by ``transformers.Trainer``
              (micro batch 4 x 4 accumulation, AdamW 5e-4, weight decay 0.1, cosine), one process,
              ``torch.set_num_threads(threads)``, fp32. Useful tokens = non-padding tokens (attention mask ones);
              the rate is taken over the optimizer steps after the warmup steps, from a forward hook
              (tokens) and a Trainer callback (step ends).
* ``kolm 2x1`` ``torchrun --nproc-per-node 2 -m kolm train`` with 1 thread per rank, ZeRO-2, fp32;
* ``kolm 1x2`` the same on one process with 2 threads.
  kolm's rate is the steady state from ``metrics.jsonl`` (``log_every=1``, so every step is timed on its own;
  the first ``--warmup`` steps are dropped), and its MFU is the one kolm logs (per-device tokens/s x
  FLOPs per token / the best matmul peak measured on the machine so far, kolm/train/hardware.py).

Rates are reported for the median timed step and for the whole timed window: on a shared 2-core machine other
jobs steal whole steps, and a 2-thread process slows down far more than its share when they do.

The machine has no native bf16 on CPU (a bf16 matmul runs far below fp32), so everything runs in fp32; the
script measures both to show it. ``--profile`` adds a py-spy profile of rank 0 of a 2-process run (not timed)
and prints where that rank's main thread spends its time (forward, backward, gradient communication,
optimizer, ...). The Markdown table is printed and appended to ``bench/RESULTS.md`` ("Training throughput").

    .venv/bin/python bench/train_bench.py                       # 50,000 lines, seq_len 256, 2 rounds: ~9 min idle
    .venv/bin/python bench/train_bench.py --steps 4 --no-record # quick check
    .venv/bin/python bench/train_bench.py --methods kolm-2x1 --profile
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import common
import seed
import spy_profile
from common import DEFAULT_CORPUS, OUT, RESULTS, ROOT, die

from kolm.train.metrics import read_metrics

HEADING = "## Training throughput"

SEED, KOLM_2X1, KOLM_1X2 = "seed", "kolm-2x1", "kolm-1x2"
METHODS = (SEED, KOLM_2X1, KOLM_1X2)
LAYOUTS = {KOLM_2X1: (2, 1), KOLM_1X2: (1, 2)}  # (processes, threads per process)
SEED_MICRO_BATCH, SEED_ACCUM = seed.MICRO_BATCH, seed.ACCUM


@dataclass
class Measurement:
    """The steady state of one training run."""

    method: str
    processes: int
    threads: int
    step_seconds: list[float]  # each timed optimizer step
    step_useful: list[int]  # non-padding tokens processed in each (every token for kolm)
    step_total: list[int]  # tokens processed in each, padding included
    mfu_scale: float | None  # kolm's logged MFU / its tokens/s (FLOPs per token / (peak x ranks)); seed: None
    peak_gflops: float | None  # the per-device peak kolm measured at start-up (GFLOP/s), from its log
    flops_per_token: float  # training FLOPs per token at the run's (mean) sequence length
    loss_first: float
    loss_last: float
    background: float  # cores kept busy by other processes during the run
    wall: float  # the whole run, start-up included
    grad_norms: list[float | None] = field(default_factory=list)  # kolm's logged norm, every step

    @property
    def steps(self) -> int:
        return len(self.step_seconds)

    @property
    def seconds(self) -> float:
        return sum(self.step_seconds)

    @property
    def useful_rate(self) -> float:
        """Over the whole timed window."""
        return sum(self.step_useful) / self.seconds

    @property
    def total_rate(self) -> float:
        return sum(self.step_total) / self.seconds

    @property
    def median_useful_rate(self) -> float:
        """The median step's rate: robust to other processes stealing the CPUs for part of the run."""
        return statistics.median(u / t for u, t in zip(self.step_useful, self.step_seconds))

    @property
    def median_total_rate(self) -> float:
        return statistics.median(n / t for n, t in zip(self.step_total, self.step_seconds))

    @property
    def padding(self) -> float:
        return 1 - sum(self.step_useful) / sum(self.step_total)

    def mfu(self, median: bool = True) -> float | None:
        """kolm's MFU at the median step's (or the window's) rate."""
        if self.mfu_scale is None:
            return None
        return self.mfu_scale * (self.median_total_rate if median else self.total_rate)


# --------------------------------------------------------------------------- corpus, tokenizer, shards


def base_env(threads: int) -> dict[str, str]:
    return common.bench_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu",
                     TOKENIZERS_PARALLELISM="false")


# --------------------------------------------------------------------------- the seed (child process)


class TokenCounter:
    """A forward pre-hook counting the tokens each forward call processes."""

    def __init__(self) -> None:
        self.useful = 0
        self.total = 0

    def __call__(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        self.total += int(ids.numel())
        self.useful += int(mask.sum()) if mask is not None else int(ids.numel())


def child_seed(corpus: Path, tok_dir: Path, model: str, seq_len: int, threads: int, warmup: int, steps: int) -> dict:
    """The seed recipe under transformers.Trainer; returns the steady-state step times and token counts."""
    import torch

    torch.set_num_threads(threads)
    seed.require_accelerate()
    from transformers import DataCollatorForLanguageModeling, PhiForCausalLM, Trainer, TrainerCallback

    tok = seed.tokenizer(tok_dir)
    dataset = seed.dataset(common.read_lines(corpus), tok, seq_len)
    torch.manual_seed(1234)
    net = PhiForCausalLM(seed.model_config(tok_dir, model, seq_len))
    counter = TokenCounter()
    net.register_forward_pre_hook(counter, with_kwargs=True)
    marks: list[tuple[float, int, int, float | None]] = []  # (time, useful, total, loss) at each step end

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), counter.useful, counter.total, None))

        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), counter.useful, counter.total, None))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                t, u, n, _ = marks[-1]
                marks[-1] = (t, u, n, float(logs["loss"]))

    out = OUT / "seed-run"
    # the seed's optimizer with a short warmup and a fixed length: this measures speed, not the schedule
    args = seed.training_arguments(out, **{**seed.recipe_hyperparameters(), "warmup_steps": max(1, warmup),
                                           "max_steps": warmup + steps, "logging_steps": 1})
    Trainer(model=net, args=args, train_dataset=dataset, data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
            callbacks=[StepClock()]).train()
    shutil.rmtree(out, ignore_errors=True)
    return {"marks": marks, "samples": len(dataset), "threads": torch.get_num_threads()}


def measure_seed(corpus: Path, tok: Path, args: argparse.Namespace) -> Measurement:
    log = OUT / "seed.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", SEED, "--data-corpus", str(corpus),
           "--tokenizer-dir", str(tok), "--model", args.model, "--seq-len", str(args.seq_len),
           "--warmup", str(args.warmup), "--steps", str(args.seed_steps or args.steps)]
    timed = common.run_timed(cmd, base_env(args.threads), log, args.timeout, cwd=ROOT)
    report = json.loads(timed.stdout.strip().splitlines()[-1])
    marks = report["marks"][args.warmup:]  # marks[0] is train begin, marks[k] the end of step k
    pairs = list(zip(marks, marks[1:]))
    total = [b[2] - a[2] for a, b in pairs]
    losses = [m[3] for m in marks[1:] if m[3] is not None]
    mean_len = sum(total) / (len(total) * SEED_MICRO_BATCH * SEED_ACCUM)
    return Measurement(
        SEED, 1, report["threads"], [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs], total,
        None, None, flops_for(tok, args.model, max(1, round(mean_len))), losses[0] if losses else float("nan"),
        losses[-1] if losses else float("nan"), timed.background, timed.wall,
    )


def flops_for(tok: Path, model: str, seq_len: int) -> float:
    from kolm.data.tokenizer import load_tokenizer_info
    from kolm.model.flops import flops_per_token
    from kolm.model.presets import get_shape, padded_vocab

    return flops_per_token(get_shape(model), padded_vocab(load_tokenizer_info(tok).vocab_size), seq_len)


# --------------------------------------------------------------------------- kolm train


def write_recipe(path: Path, shards: Path, tok: Path, run_dir: Path, args: argparse.Namespace, steps: int) -> Path:
    import yaml

    recipe = {
        "data": str(shards), "tokenizer": str(tok), "run_dir": str(run_dir), "model": args.model,
        "seq_len": args.seq_len, "global_batch": SEED_MICRO_BATCH * SEED_ACCUM, "micro_batch": args.micro_batch,
        "lr": 5e-4, "weight_decay": 0.1, "warmup_steps": max(1, args.warmup), "train_steps": steps,
        "zero_stage": 2, "precision": "fp32", "log_every": 1, "eval_every": 1 << 30, "eval_samples": 4,
        "save_every": 1 << 30, "keep_checkpoints": 1, "tensorboard": False,
    }
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def kolm_launch(method: str, args: argparse.Namespace, shards: Path, tok: Path, steps: int) -> tuple[list[str], Path]:
    nproc, _ = LAYOUTS[method]
    work = OUT / f"train-{method}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    recipe = write_recipe(work / "recipe.yaml", shards, tok, work / "run", args, steps)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "kolm", "train", "--config", str(recipe)]
    return cmd, work


def steady_state(records: list[dict], warmup: int) -> tuple[list[float], int, float]:
    """(seconds of each logged step after the first ``warmup``, tokens per step, MFU per token/s).

    With ``log_every=1`` every step is a logging window of its own; kolm's MFU is proportional to its
    tokens/s, so the ratio recovers it for any rate."""
    logged = [r for r in records if "tokens_per_s" in r]
    kept = [r for r in logged if r["step"] > warmup] or logged[-1:]
    per_step = records[-1]["tokens"] // records[-1]["step"]
    return [per_step / r["tokens_per_s"] for r in kept], per_step, kept[0]["mfu"] / kept[0]["tokens_per_s"]


def measure_kolm(method: str, shards: Path, tok: Path, args: argparse.Namespace) -> Measurement:
    nproc, threads = LAYOUTS[method]
    cmd, work = kolm_launch(method, args, shards, tok, args.warmup + args.steps)
    timed = common.run_timed(cmd, base_env(threads), work / "train.log", args.timeout, cwd=ROOT)
    records = read_metrics(work / "run").train
    seconds, per_step, scale = steady_state(records, args.warmup)
    peak = re.search(r"peak ([\d.]+) GFLOP/s per device", timed.stderr)
    kept = records[args.warmup:]
    shutil.rmtree(work / "run" / "checkpoints", ignore_errors=True)
    tokens = [per_step] * len(seconds)
    return Measurement(
        method, nproc, threads, seconds, tokens, tokens, scale, float(peak.group(1)) if peak else None,
        flops_for(tok, args.model, args.seq_len), kept[0]["loss"], kept[-1]["loss"], timed.background, timed.wall,
        [r.get("grad_norm") for r in records],
    )


# --------------------------------------------------------------------------- profile of one kolm rank (py-spy)


def profile_kolm(shards: Path, tok: Path, args: argparse.Namespace) -> Counter:
    """Run the 2-process layout and sample rank 0's stacks with py-spy (idle frames included) in steady state."""
    spy = spy_profile.py_spy()
    cmd, work = kolm_launch(KOLM_2X1, args, shards, tok, args.warmup + args.steps + 2)
    counts = spy_profile.profile_rank0(spy, cmd, base_env(1), work, args.warmup, args.profile_seconds, args.timeout)
    shutil.rmtree(work / "run" / "checkpoints", ignore_errors=True)
    return counts


# --------------------------------------------------------------------------- machine peak (child process)


def child_peak() -> dict:
    """Matmul FLOP/s (1024^3, the probe kolm uses for MFU) for 1 and 2 threads, fp32 and bf16."""
    import torch

    from kolm.train.hardware import measured_matmul_flops

    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            fp32 = dtype == torch.float32
            out[f"{str(dtype).replace('torch.', '')}-{threads}"] = measured_matmul_flops(
                torch.device("cpu"), dtype, seconds=3.0 if fp32 else 1.0, n=1024 if fp32 else 256)
    return out


def measure_peaks(args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "peak"]
    timed = common.run_timed(cmd, base_env(2), OUT / "peak.log", args.timeout, cwd=ROOT)
    return json.loads(timed.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the run


def measure(method: str, corpus: Path, shards: Path, tok: Path, args: argparse.Namespace) -> Measurement:
    if method == SEED:
        return measure_seed(corpus, tok, args)
    return measure_kolm(method, shards, tok, args)


def merge_peaks(best: dict, new: dict) -> dict:
    """Keep the highest of each peak: background load only ever lowers a measurement."""
    return {k: max(v, best.get(k, 0.0)) for k, v in new.items()}


def run_all(corpus: Path, shards: Path, tok: Path, args: argparse.Namespace) -> tuple[list[Measurement], dict]:
    """Every method once per round; the matmul peaks are measured again at the start of each round."""
    results: list[Measurement] = []
    peaks: dict = {}
    for r, method in common.rounds(args.methods, args.repeats):
        common.wait_for_quiet(args.quiet_cores, args.max_wait)
        if len(results) % len(args.methods) == 0:
            peaks = merge_peaks(peaks, measure_peaks(args))
            print("  peaks (GFLOP/s): " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peaks.items()), file=sys.stderr)
        m = measure(method, corpus, shards, tok, args)
        mfu = f"  MFU {m.mfu():.1%}" if m.mfu_scale is not None else ""
        print(f"  round {r + 1}/{args.repeats} {method:9s} {m.steps} steps {m.seconds:7.1f} s  "
              f"useful {m.median_useful_rate:8,.0f} tok/s (median step; window {m.useful_rate:,.0f})  "
              f"total {m.median_total_rate:8,.0f} tok/s{mfu}  "
              f"others busy {m.background:.2f} cores  (wall {m.wall:.0f} s)", file=sys.stderr)
        results.append(m)
    return results, peaks


# --------------------------------------------------------------------------- reporting

LABELS = {
    SEED: "seed: HF Trainer, one line = one sample, padded",
    KOLM_2X1: "kolm train, torchrun, ZeRO-2, packed",
    KOLM_1X2: "kolm train, torchrun, ZeRO-2, packed",
}


def best_of(results: list[Measurement]) -> dict[str, Measurement]:
    """Per method, the run with the highest median-step useful rate (background load only slows a run down)."""
    out: dict[str, Measurement] = {}
    for m in results:
        if m.method not in out or m.median_useful_rate > out[m.method].median_useful_rate:
            out[m.method] = m
    return {k: out[k] for k in METHODS if k in out}


def model_mfu(m: Measurement, peaks: dict) -> float:
    """Model FLOPs (on every token processed, padding included) at the median step's rate / the machine's
    fp32 matmul peak (this script's 2-thread measurement: every layout here keeps both cores busy)."""
    peak = peaks["float32-2"]
    return m.median_total_rate * m.flops_per_token / peak


def format_table(best: dict[str, Measurement], peaks: dict, all_runs: list[Measurement]) -> str:
    base = best.get(SEED)
    rows = [
        "| method | procs x threads | steps timed | median s / step | useful tok/s (median step) "
        "| useful tok/s (window) | total tok/s incl. padding (median step) | padding | MFU (kolm log) "
        "| model FLOPs / fp32 peak | vs seed, useful (median step) | vs seed, useful (window) | loss first -> last "
        "| all runs: useful tok/s (median step) | others busy (cores, per run) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for m in best.values():
        runs = [x for x in all_runs if x.method == m.method]
        vs = f"{m.median_useful_rate / base.median_useful_rate:.2f}x" if base else "n/a"
        vs_window = f"{m.useful_rate / base.useful_rate:.2f}x" if base else "n/a"
        mfu = f"{m.mfu():.1%}" if m.mfu_scale is not None else "-"
        rows.append(
            f"| {LABELS[m.method]} | {m.processes} x {m.threads} | {m.steps} | {statistics.median(m.step_seconds):.2f} "
            f"| {m.median_useful_rate:,.0f} | {m.useful_rate:,.0f} | {m.median_total_rate:,.0f} | {m.padding:.0%} "
            f"| {mfu} | {model_mfu(m, peaks):.1%} | {vs} | {vs_window} | {m.loss_first:.3f} -> {m.loss_last:.3f} "
            f"| {', '.join(f'{x.median_useful_rate:,.0f}' for x in runs)} "
            f"| {', '.join(f'{x.background:.2f}' for x in runs)} |"
        )
    return "\n".join(rows)


def report_header(peaks: dict, args: argparse.Namespace, tok: Path, command: str, load_before: float) -> list[str]:
    """The entry's heading and its list of conditions: machine, peaks, data and model, what was timed."""
    fpt = flops_for(tok, args.model, args.seq_len)
    return [
        f"### {common.timestamp()}",
        "",
        f"- machine: {os.cpu_count()} CPUs, {common.cpu_model()}, no GPU; Python {platform.python_version()}, "
        f"{common.library_versions(('torch', 'transformers', 'deepspeed', 'accelerate', 'datasets'))}",
        f"- matmul peak (best per round; 1024^3 fp32, bf16 at 256^3): fp32 {peaks['float32-1'] / 1e9:.1f} GFLOP/s "
        "on 1 thread, "
        f"{peaks['float32-2'] / 1e9:.1f} on 2; bf16 {peaks['bfloat16-1'] / 1e9:.1f} / {peaks['bfloat16-2'] / 1e9:.1f}"
        " - no native bf16 on this CPU, so every run is fp32",
        f"- data: first {args.lines:,} lines of `{args.corpus.name}`; tokenizer `{tok.name}` (kolm BPE); model "
        f"`{args.model}` ({fpt / 1e6:.0f} MFLOP/token at seq_len {args.seq_len}); global batch "
        f"{SEED_MICRO_BATCH * SEED_ACCUM} samples (micro batch: seed {SEED_MICRO_BATCH}, kolm {args.micro_batch})",
        f"- timed: {args.steps} optimizer steps after {args.warmup} warmup steps (seed: "
        f"{args.seed_steps or args.steps}); {args.repeats} interleaved round(s), best run shown",
        f"- command: `{command}`",
        f"- load before the run: {load_before:.2f} cores busy (`uptime`: {common.uptime()})",
    ]


TABLE_NOTE = (
    "Useful tokens = non-padding tokens processed (every kolm token is useful: packed windows). "
    "'MFU (kolm log)' is kolm's own figure (per-device tokens/s x FLOPs/token / the matmul peak each rank "
    "measures in 1 s at start-up); 'model FLOPs / fp32 peak' uses this script's 2-thread fp32 peak "
    "(for the seed, FLOPs/token at its mean padded length, padding counted as work). Rates are given for "
    "the median timed step (robust to other jobs taking the CPUs for part of a run) and for the whole "
    "timed window; the best run of each method (by median-step rate) is shown."
)


def report_findings(best: dict[str, Measurement], peaks: dict) -> list[str]:
    """kolm against the seed, and the gradient norms kolm logged."""
    base = best.get(SEED)
    lines = []
    for method in (KOLM_2X1, KOLM_1X2):
        if base and method in best:
            k = best[method]
            lines.append(f"- {method} / seed, useful tokens/s: {k.median_useful_rate / base.median_useful_rate:.2f}x "
                         f"(median steps), {k.useful_rate / base.useful_rate:.2f}x (whole windows); kolm MFU "
                         f"{k.mfu():.1%} (kolm's peak at start-up: {k.peak_gflops} GFLOP/s per rank), "
                         f"{model_mfu(k, peaks):.1%} of this script's 2-thread fp32 peak")
    for m in best.values():
        if m.grad_norms:
            norms = ", ".join("-" if g is None else f"{g:.3g}" for g in m.grad_norms)
            lines.append(f"- {m.method} grad_norm per step as kolm logs it: {norms}")
    return lines


def format_report(best: dict[str, Measurement], results: list[Measurement], peaks: dict, args: argparse.Namespace,
                  tok: Path, command: str, load_before: float, profile: str | None) -> str:
    lines = [*report_header(peaks, args, tok, command, load_before), "", format_table(best, peaks, results), "",
             TABLE_NOTE, *report_findings(best, peaks)]
    if profile:
        lines += ["", profile]
    if args.notes:
        lines += ["", f"Notes: {args.notes}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help=f"input text (default: {DEFAULT_CORPUS})")
    p.add_argument("--lines", type=int, default=50_000, help="use the first N lines (default: 50000)")
    p.add_argument("--model", default="phi-40m", help="kolm preset (default: phi-40m)")
    p.add_argument("--seq-len", type=int, default=256, help="kolm window length and the seed's max_length")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run (default: 6)")
    p.add_argument("--seed-steps", type=int, default=15, help="timed steps for the seed (default: 15)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (default: 2)")
    p.add_argument("--micro-batch", type=int, default=SEED_MICRO_BATCH,
                   help=f"kolm's micro batch; the global batch stays {SEED_MICRO_BATCH * SEED_ACCUM} (default: 4)")
    p.add_argument("--threads", type=int, default=2, help="threads of the seed's one process (default: 2)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS),
                   help="subset to run (none: only --profile)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds (default: 2)")
    p.add_argument("--profile", action="store_true", help="also profile rank 0 of a 2-process kolm run with py-spy")
    p.add_argument("--profile-seconds", type=int, default=40)
    p.add_argument("--quiet-cores", type=float, default=0.5,
                   help="before each run, wait until all processes use fewer cores than this (default: 0.5)")
    p.add_argument("--max-wait", type=float, default=120.0, help="longest such wait in seconds (default: 120)")
    p.add_argument("--timeout", type=float, default=900.0, help="per run, seconds (default: 900)")
    p.add_argument("--notes", default="", help="free text added to the RESULTS.md entry")
    p.add_argument("--no-record", action="store_true", help=f"print only; do not append to {RESULTS.name}")
    p.add_argument("--child", choices=(SEED, "peak"), help=argparse.SUPPRESS)
    p.add_argument("--data-corpus", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer-dir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_main(args: argparse.Namespace) -> None:
    if args.child == "peak":
        report = child_peak()
    else:
        report = child_seed(args.data_corpus, args.tokenizer_dir, args.model, args.seq_len,
                            int(os.environ.get("OMP_NUM_THREADS", "2")), args.warmup, args.steps)
    print(json.dumps(report))


def prepare(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """The benchmark's text, its tokenizer and its shards (each cached in ``bench/out/``)."""
    if not args.corpus.is_file():
        die(f"no corpus at {args.corpus}; pass --corpus PATH")
    corpus = common.prepare_corpus(args.corpus, args.lines)
    return corpus, *common.ensure_training_data(corpus, args.vocab_size)


def record(report: str, results: list[Measurement], args: argparse.Namespace) -> None:
    """Print the report, append it to RESULTS.md unless ``--no-record``, keep every run's figures."""
    print(report)
    if not args.no_record:
        common.append_results(report, HEADING, "bench/train_bench.py", append_only=True)
        print(f"appended to {RESULTS}", file=sys.stderr)
    (OUT / "train-last-run.json").write_text(json.dumps([asdict(m) for m in results], indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    command = common.command_line(".venv/bin/python", "bench/train_bench.py", argv)
    load_before = common.busy_cores(2.0)
    corpus, tok, shards = prepare(args)
    profile = None
    if args.profile:
        common.wait_for_quiet(args.quiet_cores, args.max_wait)
        profile = spy_profile.format_profile(profile_kolm(shards, tok, args), args.profile_seconds)
        print(profile, file=sys.stderr)
    if not args.methods:
        return 0
    results, peaks = run_all(corpus, shards, tok, args)
    record(format_report(best_of(results), results, peaks, args, tok, command, load_before, profile), results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
