"""A rank that stops making progress ends within `hang_timeout`, saying where every thread was.

One rank of a multi-node run can stop: a hung GPU, a dead link, a stuck filesystem read, a
deadlocked data worker. Every other rank then waits inside a collective, and the job holds its
nodes until the time limit. Each rank runs a watchdog thread of its own, independent of the main
thread (which may be blocked in C code: a collective, a device synchronisation, a read). The
training loop records what it is doing (a phase: data, forward, backward, optimizer, collective,
eval, checkpoint) with one attribute assignment, and each completed step moves the deadline.

When nothing moves for `hang_timeout` seconds, the rank writes every thread's Python stack with
`faulthandler` to RUN_DIR/hangs/ (one file per rank and occurrence: host, rank, step, time and
phase in its name and header), waits a few seconds for the other ranks' reports, names the ranks
that did not report (the likely culprits: a rank that is frozen or dead cannot report), and exits
with EXIT_HANG. Launchers requeue on it; the rerun resumes from the newest complete checkpoint.

Allowances: the first step counts from the end of start-up and gets FIRST_STEP_FACTOR x the
timeout (kernels compile, caches fill); each evaluation batch counts as progress; a checkpoint
save counts as progress for as long as bytes arrive in the checkpoint being written, so a slow
save is not a hang and a save stuck on a dead filesystem is one. From the end of start-up every
process group's timeout is `hang_timeout` + PG_MARGIN, so gloo or NCCL ends a blocked collective
even where this thread cannot run; during a save it is lifted, since the save's barriers wait on
the slowest writer and the watchdog judges the save by its bytes.
"""

from __future__ import annotations

import faulthandler
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from kolm.log import say, warn

EXIT_HANG = 5
HANGS = "hangs"
FIRST_STEP_FACTOR = 2.0
PG_MARGIN = 30.0  # the watchdog (which reports) must fire before the collective's own timeout
SAVE_PG_TIMEOUT = 7 * 24 * 3600.0  # during a save the watchdog alone decides
REPORT_GRACE = 5.0  # how long a reporting rank waits for the other ranks' reports


def stamp(t: float | None = None) -> str:
    """A UTC time as 20261203T071500Z."""
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).strftime("%Y%m%dT%H%M%SZ")


class HangWatch:
    """The watchdog of one rank. Set ``phase`` freely; call ``progress`` after each step."""

    def __init__(self, timeout: float, run_dir: Path, rank: int, world_size: int,
                 on_hang: Callable[[], None] | None = None):
        self.timeout, self.rank, self.world_size, self.on_hang = timeout, rank, world_size, on_hang
        self.dir = Path(run_dir) / HANGS
        self.phase = "start-up"
        self.step = 0
        self.launch = ""
        self._deadline = math.inf
        self._saving: Path | None = None  # a checkpoint being written: bytes arriving there are progress
        self._stopped = False
        self._stalled = 0.0  # how long this process itself last did not run (stopped, starved), since progress
        self._poll = min(1.0, timeout / 10) if timeout > 0 else 1.0

    @property
    def enabled(self) -> bool:
        return self.timeout > 0

    def start(self, launch: str, step: int) -> HangWatch:
        """Arm the watchdog at the end of start-up: the first step has its own allowance."""
        self.launch, self.step = launch, step
        if self.enabled:
            self._deadline = time.monotonic() + FIRST_STEP_FACTOR * self.timeout
            set_collective_timeout(self.timeout + PG_MARGIN)
            threading.Thread(target=self._run, name="kolm-hang-watch", daemon=True).start()
        return self

    def progress(self, step: int | None = None) -> None:
        """Something completed (a step, an evaluation batch): the deadline moves."""
        if step is not None:
            self.step = step
        self._stalled = 0.0
        self._deadline = time.monotonic() + self.timeout

    @contextmanager
    def saving(self, path: Path) -> Iterator[None]:
        """A checkpoint save into ``path``: progress while its bytes grow; collectives wait on."""
        self.phase, self._saving = "checkpoint", Path(path)
        self.progress()
        if self.enabled:
            set_collective_timeout(SAVE_PG_TIMEOUT)
        try:
            yield
        finally:
            self._saving = None
            self.progress()
            if self.enabled:
                set_collective_timeout(self.timeout + PG_MARGIN)

    def stop(self) -> None:
        self._stopped = True

    def _run(self) -> None:
        last, written = time.monotonic(), -1
        while not self._stopped:
            time.sleep(self._poll)
            now = time.monotonic()
            if now - last > 5 * self._poll + 1:  # this process itself did not run (SIGSTOP, a starved node)
                self._stalled = now - last
            last = now
            saving = self._saving
            if saving is not None:
                size = _bytes_under(saving)
                if size != written:
                    written = size
                    self.progress()
            if now > self._deadline and not self._stopped:
                self._fire(now)

    def _fire(self, now: float) -> None:
        """Report this rank's stacks, wait briefly for the others' reports, name who is missing, exit."""
        quiet = now - self._deadline + self.timeout
        try:
            path = self._write_report(quiet)
            missing = self._await_others()
            text = describe_hang(self.rank, self.step, self.phase, quiet, path, self.world_size, missing)
            if self._stalled:
                text += (f". This process itself did not run for {self._stalled:.0f} s before this report (stopped, "
                         "or starved of CPU): it is the likely culprit")
            say(text, every_rank=True)
        except OSError as e:
            warn(f"rank {self.rank}: no training progress for {quiet:.0f} s at step {self.step} (phase {self.phase}); "
                 f"writing the hang report failed ({e})", every_rank=True)
        if self.on_hang is not None:
            try:
                self.on_hang()
            except Exception as e:  # the exit below must happen whatever the hook does
                warn(f"rank {self.rank}: the hang hook failed: {e}", every_rank=True)
        _flush_logs()
        os._exit(EXIT_HANG)

    def _write_report(self, quiet: float) -> Path:
        host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # the scheduler's name for the node
        self.dir.mkdir(parents=True, exist_ok=True)
        now = stamp()
        path = self.dir / f"step{self.step}-rank{self.rank}-{host}-{now}.txt"
        header = {"launch": self.launch, "rank": self.rank, "world_size": self.world_size, "host": host,
                  "pid": os.getpid(), "step": self.step, "phase": self.phase, "time": now,
                  "quiet_s": round(quiet, 1), "timeout_s": self.timeout, "stalled_s": round(self._stalled, 1)}
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(f"{k}: {v}\n" for k, v in header.items()))
            f.write(f"\nno training progress for {quiet:.0f} s (hang_timeout {self.timeout:g} s); the last completed "
                    f"step is {self.step}; this rank was in: {self.phase}\nevery thread's stack, most recent call "
                    "first:\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        os.replace(tmp, path)
        return path

    def _await_others(self) -> list[int]:
        """The ranks that have not reported this launch's hang after REPORT_GRACE seconds."""
        deadline = time.monotonic() + REPORT_GRACE
        while True:
            reported = {r.rank for r in read_reports(self.dir.parent) if r.launch == self.launch}
            missing = [r for r in range(self.world_size) if r not in reported]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)


def describe_hang(rank: int, step: int, phase: str, quiet: float, path: Path, world: int, missing: list[int]) -> str:
    reported = world - len(missing)
    text = (f"rank {rank}: no training progress for {quiet:.0f} s at step {step} (phase {phase}); every thread's "
            f"stack is in {path}. {reported} of {world} ranks reported the hang")
    if missing:
        text += f"; no report from rank{'s' if len(missing) > 1 else ''} {_ranks(missing)}: look there first"
    return text + (f". Exit {EXIT_HANG}: rerun (or let the launcher requeue) to resume from the newest complete "
                   "checkpoint")


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:16]))
    return shown + (f" and {len(ranks) - 16} more" if len(ranks) > 16 else "")


def _bytes_under(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def _flush_logs() -> None:
    import logging
    import sys

    for handler in logging.getLogger("kolm").handlers:
        handler.flush()
    sys.stderr.flush()


def set_collective_timeout(seconds: float) -> None:
    """Every process group this rank belongs to (DeepSpeed's included) times out after ``seconds``."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    from torch.distributed import distributed_c10d as c10d

    try:
        groups = list(c10d._world.pg_map)
    except AttributeError:  # a torch without the private registry: the default group at least
        groups = [None]
    for group in groups:
        try:
            c10d._set_pg_timeout(timedelta(seconds=seconds), group)
        except (ValueError, RuntimeError, AssertionError, AttributeError):
            continue  # a group of other ranks, or a backend without a settable timeout


def agree_launch(device) -> str:
    """One name for this launch on every rank: rank 0's start time (hang reports are grouped by it)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(time.time())], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.broadcast(t, src=0)
    return stamp(float(t.item()))


# --------------------------------------------------------------------------- reading the reports


@dataclass(frozen=True)
class HangReport:
    path: Path
    launch: str
    rank: int
    world_size: int
    host: str
    step: int
    phase: str
    time: str
    stalled_s: float


def read_reports(run_dir: Path) -> list[HangReport]:
    """Every hang report of a run, oldest launch first."""
    found = []
    for path in sorted((Path(run_dir) / HANGS).glob("step*-rank*.txt")):
        try:
            head = path.read_text(encoding="utf-8", errors="replace").split("\n\n", 1)[0]
            fields = dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)
            found.append(HangReport(path, fields["launch"], int(fields["rank"]), int(fields["world_size"]),
                                    fields["host"], int(fields["step"]), fields["phase"], fields["time"],
                                    float(fields.get("stalled_s", 0))))
        except (OSError, KeyError, ValueError):
            continue  # not a report kolm wrote
    return sorted(found, key=lambda r: (r.launch, r.rank))


def summarize_reports(run_dir: Path) -> list[str]:
    """One line per hang of the run: who reported it (where each was) and who did not."""
    reports = read_reports(run_dir)
    lines = []
    for launch in sorted({r.launch for r in reports}):
        group = [r for r in reports if r.launch == launch]
        # A rank that was itself stopped for longer than the others waited reported only on waking.
        late = {r.rank for r in group if r.stalled_s > 0}
        missing = sorted(set(range(group[0].world_size)) - {r.rank for r in group} | late)
        shown = ", ".join(f"{r.rank} on {r.host} ({r.phase})" for r in group if r.rank not in late)
        line = (f"hang at step {max(r.step for r in group)} ({group[0].time}): reported by "
                f"rank{'s' * (len(group) > 1)} {shown or 'none in time'}")
        if missing:
            line += f"; not by {_ranks(missing)} (likely culprits)"
        lines.append(line + f"; stacks in {group[0].path.parent}")
    return lines
