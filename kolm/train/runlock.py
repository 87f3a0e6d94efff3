"""One writer per run directory.

Rank 0 of a run holds an exclusive `flock` on ``RUN_DIR/.kolm-lock`` for the whole run; the
kernel drops it when the process dies (SIGKILL, OOM, node loss), so a requeue or a rerun is never
blocked by a dead run. Beside it, ``.kolm-lock.json`` names the holder (host, process id, Slurm
job, launch) and carries a heartbeat that rank 0 refreshes every HEARTBEAT seconds.

A second start is refused before it writes anything:
- its rank 0 cannot take the lock (same machine, or a shared filesystem with working locks);
- its other ranks see the lock held by a launch that is not theirs;
- where `flock` is not shared between nodes (NFS mounted without locking, some Lustre setups), a
  holder on another host with a fresh heartbeat still refuses it; where `flock` fails outright,
  the heartbeat alone decides (a holder silent for STALE seconds is taken to be dead).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from kolm.errors import KolmError
from kolm.files import atomic_write_json
from kolm.log import warn

LOCK = ".kolm-lock"
HOLDER = ".kolm-lock.json"
HEARTBEAT = 20.0  # seconds between refreshes of the holder's heartbeat
STALE = 120.0  # a heartbeat older than this belongs to a dead holder
_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID",
                "SLURM_RESTART_COUNT")


def launch_id() -> str:
    """What every rank of one launch shares and no other concurrent launch does."""
    return ",".join(f"{name}={os.environ.get(name, '')}" for name in _LAUNCH_VARS)


def _holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "launch": launch_id(), "started": time.time(), "heartbeat": time.time()}


def _read_holder(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / HOLDER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"process {holder.get('pid')} on {holder.get('host')}{job}"


def _busy(run_dir: Path, holder: dict | None) -> KolmError:
    return KolmError(
        f"{run_dir} is in use by another training run ({_describe(holder)}); two runs writing one run directory "
        "would mix their checkpoints and metrics. Wait for it to end (or stop it: its checkpoints are kept), "
        "or give this run another run_dir"
    )


def _fresh_elsewhere(holder: dict | None) -> bool:
    """A holder on another host whose heartbeat is recent (its flock may not reach this node)."""
    return bool(holder) and holder.get("host") != socket.gethostname() and time.time() - holder["heartbeat"] < STALE


class RunLock:
    """Rank 0's hold on a run directory; released by ``release`` or by the kernel on death."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._fd: int | None = None
        self._stop = threading.Event()

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise _busy(self.run_dir, _read_holder(self.run_dir)) from None
            return self._acquire_by_heartbeat(e)
        holder = _read_holder(self.run_dir)
        if _fresh_elsewhere(holder):
            os.close(fd)
            raise _busy(self.run_dir, holder)
        self._fd = fd
        self._start_heartbeat()
        return self

    def _acquire_by_heartbeat(self, error: OSError) -> RunLock:
        """No working flock here: the holder file's heartbeat is the lock."""
        holder = _read_holder(self.run_dir)
        if holder and time.time() - holder.get("heartbeat", 0) < STALE:
            raise _busy(self.run_dir, holder)
        warn(f"{self.run_dir}: file locks do not work here ({error.strerror}); guarding the run directory with a "
             f"heartbeat file instead (a crashed run blocks it for {STALE:.0f} s)")
        self._start_heartbeat()
        return self

    def _start_heartbeat(self) -> None:
        info = _holder_info()
        atomic_write_json(self.run_dir / HOLDER, info)

        def beat() -> None:
            while not self._stop.wait(HEARTBEAT):
                info["heartbeat"] = time.time()
                with contextlib.suppress(OSError):  # a full disk stops the run elsewhere; the flock still holds
                    atomic_write_json(self.run_dir / HOLDER, info)

        threading.Thread(target=beat, name="kolm-run-lock", daemon=True).start()

    def release(self) -> None:
        self._stop.set()
        (self.run_dir / HOLDER).unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _locked_on_this_machine(path: Path) -> bool | None:
    """Whether a process on this machine holds an flock on ``path``, read from /proc/locks without
    touching the lock (None where the kernel does not say)."""
    try:
        table = Path("/proc/locks").read_text()
        st = os.stat(path)
    except OSError:
        return None
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        if "FLOCK" in fields and len(fields) > fields.index("FLOCK") + 4 and fields[fields.index("FLOCK") + 4] == key:
            return True
    return False


def check_not_held_by_another_launch(run_dir: Path, settle: float = 3.0) -> None:
    """For ranks other than 0: refuse when another launch holds the run directory.

    Their own rank 0 may not have taken the lock yet, or may have taken it a moment before naming
    itself in the holder file; a lock held by the same launch is theirs. The check only reads, so
    it never gets in their rank 0's way."""
    deadline = time.monotonic() + settle
    while True:
        holder = _held_by_another_launch(run_dir)
        if holder is None:
            return
        if time.monotonic() > deadline:
            raise _busy(run_dir, holder)
        time.sleep(0.5)


def _held_by_another_launch(run_dir: Path) -> dict | None:
    path = run_dir / LOCK
    holder = _read_holder(run_dir)
    if not path.is_file() or holder is None or holder.get("launch") == launch_id():
        return None
    here = _locked_on_this_machine(path)
    fresh = time.time() - holder.get("heartbeat", 0) < STALE
    return holder if here or (here is None and fresh) or _fresh_elsewhere(holder) else None
