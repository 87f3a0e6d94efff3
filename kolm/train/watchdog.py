"""A rank whose launcher is gone stops within seconds.

torchrun and DeepSpeed's launcher start their workers in process sessions of their own, so when
the launcher alone dies (SIGKILL, an OOM kill of the agent, a closed terminal) nothing signals the
workers: they would train on as orphans, write checkpoints nobody waits for, and hold the GPUs.
Each rank records its parent and the launcher processes above it (torchrun's agent; DeepSpeed's
per-node `launch` and its `runner`) and a thread checks once a second that they all still live.
When one is gone the rank exits at once: checkpoints are written atomically, so the newest
complete one is untouched (an interrupted save is skipped on resume).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from kolm.log import say
from kolm.train.distenv import DistEnv

EXIT_LAUNCHER_GONE = 4
LAUNCHERS = ("torch.distributed.run", "torchrun", "deepspeed.launcher", "bin/deepspeed")
POLL = 1.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, from /proc; None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[19])


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_chain(pid: int | None = None) -> list[tuple[int, int, str]]:
    """(pid, start time, command) of this process's parent, and of the launcher processes above it."""
    chain: list[tuple[int, int, str]] = []
    current = _stat(pid or os.getpid())
    while current is not None and current[0] > 1:
        parent = current[0]
        info = _stat(parent)
        command = _command(parent)
        if info is None or (chain and not any(name in command for name in LAUNCHERS)):
            break
        chain.append((parent, info[1], command))
        current = info
    return chain


def _gone(chain: list[tuple[int, int, str]]) -> tuple[int, str] | None:
    for pid, started, command in chain:
        info = _stat(pid)
        if info is None or info[1] != started:
            return pid, command
    if chain and os.getppid() != chain[0][0]:
        return chain[0][0], chain[0][2]
    return None


class LauncherWatch:
    """Checks, from a thread once a second and from the training loop at every step, that the
    launcher processes recorded at start-up still live; exits the rank at once when one is gone."""

    def __init__(self, rank: int, chain: list[tuple[int, int, str]]):
        self.rank, self.chain = rank, chain

    def check(self) -> None:
        gone = _gone(self.chain) if self.chain else None
        if gone is not None:
            say(f"rank {self.rank}: the launcher process {gone[0]} ({gone[1][:80].strip()}) is gone; stopping "
                f"(exit {EXIT_LAUNCHER_GONE}). Complete checkpoints are kept: rerun the job to resume",
                every_rank=True)
            os._exit(EXIT_LAUNCHER_GONE)

    def start(self) -> LauncherWatch:
        def watch() -> None:
            while True:
                time.sleep(POLL)
                self.check()

        if self.chain:
            threading.Thread(target=watch, name="kolm-launcher-watch", daemon=True).start()
        return self


def watch_launcher(env: DistEnv) -> LauncherWatch:
    """Watch this rank's launcher (not for a plain single process, which has none)."""
    return LauncherWatch(env.rank, [] if env.launcher == "single" else launcher_chain()).start()
