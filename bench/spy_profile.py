"""Where rank 0 of a `kolm train` run spends its time: py-spy samples of its training (main) thread,
idle frames included, sorted into categories (forward, backward, gradient communication, optimizer,
...). Used by ``train_bench.py --profile``.

(Not ``profile.py``: that name would shadow the standard library's ``profile`` module, which
``cProfile`` imports, for every script run from ``bench/``.)"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from common import ROOT, die

from kolm.train.metrics import METRICS_FILE, read_metrics

CATEGORIES = (  # first match wins, tested on the frames of a sample from the innermost outwards
    ("gradient/param communication (gloo)", ("torch/distributed/", "deepspeed/comm/")),
    ("optimizer step (AdamW)", ("torch/optim/",)),
    ("ZeRO bookkeeping (flatten, copy, clip)", ("deepspeed/runtime/zero/", "deepspeed/runtime/utils.py")),
    ("loss (token_stats: fp32 logits, CE, argmax)", ("kolm/model/loss.py",)),
    ("backward (autograd)", ("torch/autograd/", "torch/_tensor.py")),
    ("forward (PhiForCausalLM)", ("transformers/",)),
    ("data (PackedDataset)", ("kolm/data/packed.py",)),
)
TRAINING_THREAD = "kolm/train/loop.py"  # a frame every sample of the training thread has


def py_spy() -> str:
    """The py-spy executable, or exit saying how to install it."""
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).is_file():
        die("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


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
    die(f"no process with {env_key}={value} under pid {parent}")


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
        if TRAINING_THREAD not in stack:
            continue
        counts[classify(stack.split(";")[::-1])] += int(n)
    return counts


def logged_steps(run_dir: Path) -> int:
    """Train records the run has logged so far (-1 before it has written any metrics)."""
    return len(read_metrics(run_dir).train) if (run_dir / METRICS_FILE).is_file() else -1


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, steps: int, timeout: float) -> int:
    """Wait until the run has logged ``steps`` steps (or ended); the steps it has logged."""
    deadline = time.monotonic() + timeout
    while logged_steps(run_dir) < max(steps, 0) and proc.poll() is None:
        if time.monotonic() > deadline:
            die("profile run did not reach the steady state in time")
        time.sleep(1.0)
    return logged_steps(run_dir)


def profile_rank0(spy: str, cmd: list[str], env: dict[str, str], work: Path, warmup: int, seconds: int,
                  timeout: float) -> Counter:
    """Start ``cmd`` (a torchrun launch of `kolm train` whose run directory is ``work/run``), and
    once it has logged ``warmup`` steps sample rank 0 with py-spy for ``seconds``."""
    with open(work / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True)
    try:
        rank0 = find_child(proc.pid, "RANK", "0", 60)
        done = wait_for_steps(proc, work / "run", warmup, timeout)
        out = work / "py-spy.txt"
        record = [spy, "record", "--pid", str(rank0), "--rate", "50", "--idle", "--nonblocking", "--format", "raw",
                  "--duration", str(seconds), "--output", str(out)]
        print(f"profiling rank 0 (pid {rank0}) from step {done}: {shlex.join(record)}", file=sys.stderr)
        subprocess.run(record, check=True, capture_output=True)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return read_py_spy_raw(out)


def format_profile(counts: Counter, seconds: int) -> str:
    total = sum(counts.values()) or 1
    rows = [f"py-spy on rank 0 of `kolm train` (2 processes x 1 thread), {seconds} s of steady state, "
            f"{total} samples of the training thread (waiting included):", "",
            "| where rank 0's training thread is | share |", "|---|--:|"]
    rows += [f"| {name} | {n / total:.1%} |" for name, n in counts.most_common()]
    return "\n".join(rows)
