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
  FLOPs per token / the matmul peak each rank measures in the training dtype).

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
import datetime
import gzip
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
RESULTS = BENCH / "RESULTS.md"
HEADING = "## Training throughput"
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpora" / "nsmc-reviews.txt.gz"

SEED, KOLM_2X1, KOLM_1X2 = "seed", "kolm-2x1", "kolm-1x2"
METHODS = (SEED, KOLM_2X1, KOLM_1X2)
LAYOUTS = {KOLM_2X1: (2, 1), KOLM_1X2: (1, 2)}  # (processes, threads per process)
SEED_MICRO_BATCH, SEED_ACCUM = 4, 4  # the seed's per_device_train_batch_size, gradient_accumulation_steps


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


def open_text(path: Path):
    """A text-mode handle on a plain or gzipped UTF-8 file."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def read_lines(path: Path) -> list[str]:
    """One sample per line, as the seed reads them (stripped, empty lines dropped, as kolm does too)."""
    with open_text(path) as f:
        return [s for s in (line.strip() for line in f) if s]


def stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".txt").removesuffix(".jsonl")


def prepare_corpus(corpus: Path, lines: int) -> Path:
    """A cached gzip of the first ``lines`` lines of ``corpus``."""
    target = OUT / f"corpus-{stem(corpus)}-{lines}.txt.gz"
    if not target.is_file():
        OUT.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        with open_text(corpus) as src, gzip.open(tmp, "wt", encoding="utf-8") as dst:
            for _, line in zip(range(lines), src):
                dst.write(line)
        os.replace(tmp, target)
    return target


def kolm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kolm", *args]


def run_quiet(cmd: list[str], what: str) -> None:
    print(f"{what}: {shlex.join(cmd)}", file=sys.stderr)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"train_bench: {what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def ensure_tokenizer(corpus: Path, vocab_size: int) -> Path:
    """A byte-level BPE trained with ``kolm tokenizer train`` on the benchmark text, cached."""
    target = OUT / f"tokenizer-{stem(corpus)}-v{vocab_size}"
    if not (target / "tokenizer.json").is_file():
        run_quiet(kolm_cmd("tokenizer", "train", "--input", str(corpus), "--vocab-size", str(vocab_size),
                           "--out", str(target), "--force"), "training the tokenizer")
    return target


def ensure_shards(corpus: Path, tok: Path, valid_fraction: float) -> Path:
    """kolm shards of the benchmark text with that tokenizer, cached."""
    target = OUT / f"train-shards-{stem(corpus)}-{tok.name}"
    if not (target / "manifest.json").is_file():
        run_quiet(kolm_cmd("shard", "--input", str(corpus), "--tokenizer", str(tok), "--out", str(target),
                           "--valid-fraction", str(valid_fraction), "--overwrite", "--no-progress"), "sharding")
    return target


# --------------------------------------------------------------------------- load accounting


def busy_jiffies() -> int:
    """Busy jiffies over all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]) - fields[3] - fields[4]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def busy_cores(seconds: float = 1.0) -> float:
    """Cores kept busy by all processes right now (sampled over ``seconds``)."""
    b0 = busy_jiffies()
    time.sleep(seconds)
    return (busy_jiffies() - b0) / os.sysconf("SC_CLK_TCK") / seconds


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Wait until other processes use fewer than ``threshold`` cores (at most ``max_wait`` s)."""
    deadline = time.monotonic() + max_wait
    load = busy_cores()
    while load > threshold and time.monotonic() < deadline:
        print(f"  waiting: other processes busy on {load:.2f} cores", file=sys.stderr)
        time.sleep(5.0)
        load = busy_cores()
    return load


@dataclass
class Timed:
    wall: float
    background: float
    stdout: str
    stderr: str


def run_timed(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> Timed:
    """Run ``cmd`` to completion (its own process group, killed on timeout); wall time and others' load."""
    b0, c0, t0 = busy_jiffies(), children_cpu(), time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            sys.exit(f"train_bench: {shlex.join(cmd)} ran past {timeout:.0f} s; log in {log}")
    wall = time.perf_counter() - t0
    cpu = children_cpu() - c0
    others = max(0.0, ((busy_jiffies() - b0) / os.sysconf("SC_CLK_TCK") - cpu) / wall)
    stderr = log.read_text(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"train_bench: {shlex.join(cmd)} failed ({proc.returncode}):\n{stderr[-4000:]}")
    return Timed(wall, others, stdout, stderr)


def base_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu",
               HF_HOME=str(OUT / "hf-home"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONHASHSEED="0")
    return env


# --------------------------------------------------------------------------- the seed (child process)


def model_config(tok_dir: Path, model: str, seq_len: int):
    """The exact PhiConfig kolm builds for this tokenizer, so both sides train the same model."""
    from kolm.data.tokenizer import load_tokenizer_info
    from kolm.model.presets import build_config, get_shape, padded_vocab

    info = load_tokenizer_info(tok_dir)
    shape = get_shape(model)
    return build_config(shape, padded_vocab(info.vocab_size), info.eos_id, info.eos_id,
                        max(seq_len, shape.max_position_embeddings))


def seed_dataset(corpus: Path, tok, seq_len: int):
    """The seed's data: all lines in memory, one line = one sample, truncated at ``seq_len``."""
    import datasets

    datasets.disable_progress_bars()
    lines = read_lines(corpus)
    ds = datasets.Dataset.from_dict({"text": lines})
    return ds.map(lambda b: tok(b["text"], truncation=True, max_length=seq_len, return_overflowing_tokens=True),
                  batched=True, remove_columns=ds.column_names)


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
    try:
        import accelerate  # noqa: F401  (Trainer needs it; the `bench` extra does not bring it)
    except ImportError:
        sys.exit("train_bench: transformers.Trainer needs `accelerate`: .venv/bin/pip install accelerate")
    from transformers import (
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        PhiForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.pad_token = tok.eos_token
    dataset = seed_dataset(corpus, tok, seq_len)
    torch.manual_seed(1234)
    net = PhiForCausalLM(model_config(tok_dir, model, seq_len))
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
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=SEED_MICRO_BATCH, gradient_accumulation_steps=SEED_ACCUM,
        learning_rate=5e-4, weight_decay=0.1, warmup_steps=max(1, warmup), lr_scheduler_type="cosine",
        max_steps=warmup + steps, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=1234,
    )
    Trainer(model=net, args=args, train_dataset=dataset, data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
            callbacks=[StepClock()]).train()
    shutil.rmtree(out, ignore_errors=True)
    return {"marks": marks, "samples": len(dataset), "threads": torch.get_num_threads()}


def measure_seed(corpus: Path, tok: Path, args: argparse.Namespace) -> Measurement:
    log = OUT / "seed.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", SEED, "--data-corpus", str(corpus),
           "--tokenizer-dir", str(tok), "--model", args.model, "--seq-len", str(args.seq_len),
           "--warmup", str(args.warmup), "--steps", str(args.seed_steps or args.steps)]
    timed = run_timed(cmd, base_env(args.threads), log, args.timeout)
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
    from kolm.model.presets import flops_per_token, get_shape, padded_vocab

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


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


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
    timed = run_timed(cmd, base_env(threads), work / "train.log", args.timeout)
    records = train_records(work / "run")
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

CATEGORIES = (  # first match wins, tested on the frames of a sample from the innermost outwards
    ("gradient/param communication (gloo)", ("torch/distributed/", "deepspeed/comm/")),
    ("optimizer step (AdamW)", ("torch/optim/",)),
    ("ZeRO bookkeeping (flatten, copy, clip)", ("deepspeed/runtime/zero/", "deepspeed/runtime/utils.py")),
    ("loss (token_stats: fp32 logits, CE, argmax)", ("kolm/metrics.py",)),
    ("backward (autograd)", ("torch/autograd/", "torch/_tensor.py")),
    ("forward (PhiForCausalLM)", ("transformers/",)),
    ("data (PackedDataset)", ("kolm/packed.py",)),
)


def find_child(parent: int, env_key: str, value: str, timeout: float) -> int:
    """The pid of a descendant of ``parent`` whose environment has ``env_key=value``."""
    deadline = time.monotonic() + timeout
    want = f"{env_key}={value}".encode()
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == parent and want in (entry / "environ").read_bytes().split(b"\0"):
                    return int(entry.name)
            except (OSError, ValueError, IndexError):
                continue
        time.sleep(0.5)
    sys.exit(f"train_bench: no process with {env_key}={value} under pid {parent}")


def classify(frames: list[str]) -> str:
    for name, needles in CATEGORIES:
        if any(n in f for f in frames for n in needles):
            return name
    return "other"


def read_py_spy_raw(path: Path) -> Counter:
    """Samples of the training (main) thread by category, from py-spy's collapsed-stack output."""
    counts: Counter = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if "kolm/train.py" not in stack:
            continue
        counts[classify(stack.split(";")[::-1])] += int(n)
    return counts


def profile_kolm(shards: Path, tok: Path, args: argparse.Namespace) -> Counter:
    """Run the 2-process layout and sample rank 0's stacks with py-spy (idle frames included) in steady state."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).is_file():
        sys.exit("train_bench: --profile needs py-spy: .venv/bin/pip install py-spy")
    steps = args.warmup + args.steps + 2
    cmd, work = kolm_launch(KOLM_2X1, args, shards, tok, steps)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(1), stdout=subprocess.DEVNULL,
                            stderr=open(work / "train.log", "w"), start_new_session=True)
    try:
        rank0 = find_child(proc.pid, "RANK", "0", 60)
        metrics = work / "run" / "metrics.jsonl"
        deadline = time.monotonic() + args.timeout
        while (not metrics.is_file() or len(train_records(work / "run")) < args.warmup) and proc.poll() is None:
            if time.monotonic() > deadline:
                sys.exit("train_bench: profile run did not reach the steady state in time")
            time.sleep(1.0)
        done = len(train_records(work / "run"))
        out = work / "py-spy.txt"
        spy = [py_spy, "record", "--pid", str(rank0), "--rate", "50", "--idle", "--nonblocking", "--format", "raw",
               "--duration", str(args.profile_seconds), "--output", str(out)]
        print(f"profiling rank 0 (pid {rank0}) from step {done}: {shlex.join(spy)}", file=sys.stderr)
        subprocess.run(spy, check=True, capture_output=True)
        proc.wait(timeout=args.timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    shutil.rmtree(work / "run" / "checkpoints", ignore_errors=True)
    return read_py_spy_raw(out)


def format_profile(counts: Counter, seconds: int) -> str:
    total = sum(counts.values()) or 1
    rows = [f"py-spy on rank 0 of `kolm train` (2 processes x 1 thread), {seconds} s of steady state, "
            f"{total} samples of the training thread (waiting included):", "",
            "| where rank 0's training thread is | share |", "|---|--:|"]
    rows += [f"| {name} | {n / total:.1%} |" for name, n in counts.most_common()]
    return "\n".join(rows)


# --------------------------------------------------------------------------- machine peak (child process)


def child_peak() -> dict:
    """Matmul FLOP/s (1024^3, the probe kolm uses for MFU) for 1 and 2 threads, fp32 and bf16."""
    import torch

    from kolm.train.metrics import measured_matmul_flops

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
    timed = run_timed(cmd, base_env(2), OUT / "peak.log", args.timeout)
    return json.loads(timed.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the run


def rounds(methods: list[str], repeats: int) -> Iterable[tuple[int, str]]:
    """Interleaved schedule: every method once per round, the order rotated each round."""
    for r in range(repeats):
        k = r % len(methods)
        for m in methods[k:] + methods[:k]:
            yield r, m


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
    for r, method in rounds(args.methods, args.repeats):
        wait_for_quiet(args.quiet_cores, args.max_wait)
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
    seed = best.get(SEED)
    rows = [
        "| method | procs x threads | steps timed | median s / step | useful tok/s (median step) "
        "| useful tok/s (window) | total tok/s incl. padding (median step) | padding | MFU (kolm log) "
        "| model FLOPs / fp32 peak | vs seed, useful (median step) | vs seed, useful (window) | loss first -> last "
        "| all runs: useful tok/s (median step) | others busy (cores, per run) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for m in best.values():
        runs = [x for x in all_runs if x.method == m.method]
        vs = f"{m.median_useful_rate / seed.median_useful_rate:.2f}x" if seed else "n/a"
        vs_window = f"{m.useful_rate / seed.useful_rate:.2f}x" if seed else "n/a"
        mfu = f"{m.mfu():.1%}" if m.mfu_scale is not None else "-"
        rows.append(
            f"| {LABELS[m.method]} | {m.processes} x {m.threads} | {m.steps} | {statistics.median(m.step_seconds):.2f} "
            f"| {m.median_useful_rate:,.0f} | {m.useful_rate:,.0f} | {m.median_total_rate:,.0f} | {m.padding:.0%} "
            f"| {mfu} | {model_mfu(m, peaks):.1%} | {vs} | {vs_window} | {m.loss_first:.3f} -> {m.loss_last:.3f} "
            f"| {', '.join(f'{x.median_useful_rate:,.0f}' for x in runs)} "
            f"| {', '.join(f'{x.background:.2f}' for x in runs)} |"
        )
    return "\n".join(rows)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def library_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "transformers", "deepspeed", "accelerate", "datasets"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def format_report(best: dict[str, Measurement], results: list[Measurement], peaks: dict, args: argparse.Namespace,
                  tok: Path, command: str, load_before: float, profile: str | None) -> str:
    seed = best.get(SEED)
    fpt = flops_for(tok, args.model, args.seq_len)
    lines = [
        f"### {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        f"- machine: {os.cpu_count()} CPUs, {cpu_model()}, no GPU; Python {platform.python_version()}, "
        f"{library_versions()}",
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
        f"- load before the run: {load_before:.2f} cores busy (`uptime`: {uptime()})",
        "",
        format_table(best, peaks, results),
        "",
        "Useful tokens = non-padding tokens processed (every kolm token is useful: packed windows). "
        "'MFU (kolm log)' is kolm's own figure (per-device tokens/s x FLOPs/token / the matmul peak each rank "
        "measures in 1 s at start-up); 'model FLOPs / fp32 peak' uses this script's 2-thread fp32 peak "
        "(for the seed, FLOPs/token at its mean padded length, padding counted as work). Rates are given for "
        "the median timed step (robust to other jobs taking the CPUs for part of a run) and for the whole "
        "timed window; the best run of each method (by median-step rate) is shown.",
    ]
    for method in (KOLM_2X1, KOLM_1X2):
        if seed and method in best:
            k = best[method]
            lines.append(f"- {method} / seed, useful tokens/s: {k.median_useful_rate / seed.median_useful_rate:.2f}x "
                         f"(median steps), {k.useful_rate / seed.useful_rate:.2f}x (whole windows); kolm MFU "
                         f"{k.mfu():.1%} (kolm's peak at start-up: {k.peak_gflops} GFLOP/s per rank), "
                         f"{model_mfu(k, peaks):.1%} of this script's 2-thread fp32 peak")
    for m in best.values():
        if m.grad_norms:
            norms = ", ".join("-" if g is None else f"{g:.3g}" for g in m.grad_norms)
            lines.append(f"- {m.method} grad_norm per step as kolm logs it: {norms}")
    if profile:
        lines += ["", profile]
    if args.notes:
        lines += ["", f"Notes: {args.notes}"]
    return "\n".join(lines) + "\n"


def uptime() -> str:
    return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


def append_results(block: str) -> None:
    """Append ``block`` at the end of RESULTS.md, under a new "Training throughput" heading unless the last
    section already is that one. Nothing already in the file is rewritten."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else ""
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    prefix = "" if text else "# Benchmark results\n"
    if not headings or headings[-1].strip() != HEADING:
        prefix += f"\n{HEADING}\n\nWritten by `bench/train_bench.py`; newest last.\n"
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(("\n" if text and not text.endswith("\n") else "") + prefix + "\n" + block)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    if not args.corpus.is_file():
        sys.exit(f"train_bench: no corpus at {args.corpus}; pass --corpus PATH")
    command = shlex.join([".venv/bin/python", "bench/train_bench.py", *(sys.argv[1:] if argv is None else argv)])
    load_before = busy_cores(2.0)
    corpus = prepare_corpus(args.corpus, args.lines)
    tok = ensure_tokenizer(corpus, args.vocab_size)
    shards = ensure_shards(corpus, tok, 0.002)
    profile = None
    if args.profile:
        wait_for_quiet(args.quiet_cores, args.max_wait)
        profile = format_profile(profile_kolm(shards, tok, args), args.profile_seconds)
        print(profile, file=sys.stderr)
    if not args.methods:
        return 0
    results, peaks = run_all(corpus, shards, tok, args)
    report = format_report(best_of(results), results, peaks, args, tok, command, load_before, profile)
    print(report)
    if not args.no_record:
        append_results(report)
        print(f"appended to {RESULTS}", file=sys.stderr)
    (OUT / "train-last-run.json").write_text(json.dumps([asdict(m) for m in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
