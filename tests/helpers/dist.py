"""Start `kolm train` on several local processes, the way torchrun or srun would."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from kolm.train.metrics import read_metrics

TINY = {
    "model": "phi-tiny",
    "seq_len": 64,
    "global_batch": 8,
    "micro_batch": 2,
    "lr": 3.0e-3,
    "min_lr": 3.0e-4,
    "warmup_steps": 3,
    "train_steps": 12,
    "eval_every": 6,
    "eval_samples": 32,
    "save_every": 4,
    "log_every": 1,
    "keep_checkpoints": 3,
    "zero_stage": 2,
    "precision": "bf16",
    "tensorboard": False,
}


def write_recipe(path: Path, shards: Path, tokenizer: Path, run_dir: Path, **overrides) -> Path:
    recipe = {**TINY, "data": str(shards), "tokenizer": str(tokenizer), "run_dir": str(run_dir), **overrides}
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """N `kolm train` processes in one process group, with torchrun-style environment."""

    def __init__(self, n: int, recipe: Path, *overrides: str, log_dir: Path, argv: list[str] | None = None,
                 extra_env: dict[str, str] | None = None):
        port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.logs = [log_dir / f"rank{r}.log" for r in range(n)]
        log_dir.mkdir(parents=True, exist_ok=True)
        for r in range(n):
            env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r),
                   "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(extra_env or {})}
            group = {"process_group": 0} if r == 0 else {"process_group": self.procs[0].pid}
            with open(self.logs[r], "ab") as log:
                command = argv or ["-m", "kolm", "train", "--config", str(recipe), *overrides]
                self.procs.append(subprocess.Popen(
                    [sys.executable, *command],
                    env=env, stdout=log, stderr=subprocess.STDOUT, **group))

    def wait(self, timeout: float = 600) -> list[int]:
        """Exit codes; on a timeout every rank is killed and the test fails with their output."""
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"ranks still running after {timeout:.0f}s:\n{self.output()[-3000:]}") from None

    def signal_rank(self, rank: int, sig: int) -> None:
        self.procs[rank].send_signal(sig)

    def kill_all(self) -> None:
        os.killpg(self.procs[0].pid, signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def freeze_and_kill(self) -> None:
        """SIGKILL every rank where it stands now: frozen first (SIGSTOP), so that on a fast machine
        the run cannot take more steps (or finish) between the test's decision and the kill."""
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGSTOP)
        self.kill_all()

    def output(self) -> str:
        return "\n".join(log.read_text(errors="replace") for log in self.logs)


def run_ranks(n: int, recipe: Path, *overrides: str, log_dir: Path, timeout: float = 600,
              argv: list[str] | None = None, extra_env: dict[str, str] | None = None) -> tuple[list[int], str]:
    """Run to the end; ``argv`` replaces the `kolm train` command, ``extra_env`` adds to the environment."""
    ranks = Ranks(n, recipe, *overrides, log_dir=log_dir, argv=argv, extra_env=extra_env)
    codes = ranks.wait(timeout)
    return codes, ranks.output()


def train_to_end(root: Path, shards: Path, tokenizer: Path, **overrides) -> Path:
    """A run on 2 ranks from ``root/recipe.yaml`` into ``root/run``, asserted to finish; the recipe."""
    recipe = write_recipe(root / "recipe.yaml", shards, tokenizer, root / "run", **overrides)
    codes, out = run_ranks(2, recipe, log_dir=root / "logs")
    assert codes == [0, 0], out[-3000:]
    return recipe


def kill_at_step(recipe: Path, run_dir: Path, step: int, *overrides: str, log_dir: Path,
                 timeout: float = 600) -> None:
    """Start 2 ranks and SIGKILL them all (frozen first) once ``step`` is in ``run_dir``'s metrics."""
    ranks = Ranks(2, recipe, *overrides, log_dir=log_dir)
    wait_for(lambda: len(train_records(run_dir)) >= step, timeout, f"step {step}")
    ranks.freeze_and_kill()


def train_records(run_dir: Path, kind: str = "train") -> list[dict]:
    if not (run_dir / "metrics.jsonl").is_file():
        return []
    metrics = read_metrics(run_dir)
    return metrics.train if kind == "train" else metrics.evals if kind == "eval" else metrics.other


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def workers_of(launcher: int) -> list[int]:
    """The `kolm train` processes under a launcher's pid (DeepSpeed's runner has a `launch` process
    between, and passes --local_rank before the subcommand)."""
    found, frontier = [], [launcher]
    while frontier:
        pid = frontier.pop()
        for child in children(pid):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            worker = b"-m kolm " in cmdline and b" train " in cmdline and b"launcher" not in cmdline
            (found if worker else frontier).append(child)
    return found
