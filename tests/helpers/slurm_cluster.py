"""Drive the local Slurm cluster from tests: start it, submit, and watch jobs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "local-slurm.sh"


# The suite's own cluster, beside (never instead of) one a user started with tools/local-slurm.sh:
# its own state directory, ports and node names.
CLUSTER = {"KOLM_SLURM_DIR": "/var/lib/kolm-slurm-tests", "KOLM_SLURM_PORT": "16917", "KOLM_SLURM_PREFIX": "kolm-t"}


def start_cluster() -> dict[str, str]:
    """Start (or reuse) the suite's 2-node local cluster; returns the environment jobs are submitted with."""
    tool_env = {**os.environ, **CLUSTER}
    proc = subprocess.run([str(TOOL), "start", "--nodes", "2"], capture_output=True, text=True, env=tool_env)
    if proc.returncode != 0:
        raise AssertionError(f"tools/local-slurm.sh start failed:\n{proc.stdout}\n{proc.stderr}")
    conf = subprocess.run([str(TOOL), "env"], capture_output=True, text=True, check=True, env=tool_env).stdout
    env = {**os.environ, "SLURM_CONF": conf.strip().split("=", 1)[1],
           "KOLM_PYTHON": sys.executable, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def sbatch(env: dict, *args: str, cwd: Path) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"sbatch {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc.stdout.strip().split(";")[0]


def scontrol(env: dict, *args: str) -> str:
    return subprocess.run(["scontrol", *args], env=env, capture_output=True, text=True, check=True).stdout


def job(env: dict, job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True,
                         text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}


def wait_job(env: dict, job_id: str, predicate, timeout: float, what: str, log: Path | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = job(env, job_id)
        if predicate(info):
            return info
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise AssertionError(f"timed out waiting for job {job_id} to {what}: {info.get('JobState')}\n{tail}")
        time.sleep(1.0)


def finished(info: dict) -> bool:
    """Ended, or never will (a dependency failed)."""
    return info.get("JobState") in FINAL or info.get("Reason") == "DependencyNeverSatisfied"


def restarted(info: dict) -> bool:
    return int(info.get("Restarts", "0")) >= 1


# --------------------------------------------------------------------------- the time limit, by construction


def job_processes(job_id: str, marker: bytes) -> list[int]:
    """Python processes of a job (SLURM_JOB_ID in their environment) whose command line holds ``marker``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmdline and b"python" in cmdline.split(b"\0")[0] and f"SLURM_JOB_ID={job_id}".encode() in environ:
            found.append(int(proc.name))
    return found


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # already ended
            os.kill(pid, sig)


def signalled(pid: int, sig: int) -> bool:
    """Whether ``sig`` reached the frozen process ``pid``: pending, or delivered already (Slurm sends
    SIGCONT with a job step's signals, so the process may have taken it and gone on, or ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    pending = int(fields["SigPnd"].split()[0], 16) | int(fields["ShdPnd"].split()[0], 16)
    return bool(pending & (1 << (sig - 1))) or not fields["State"].strip().startswith("T")


def _seconds(text: str) -> int:
    days, _, clock = text.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def time_limit_due(env: dict, job_id: str, warning_s: int) -> None:
    """Set the job's time limit so that the warning Slurm sends ``warning_s`` before it is due within
    a minute, leaving ``warning_s`` seconds or more to the limit itself."""
    elapsed = _seconds(job(env, job_id)["RunTime"])
    scontrol(env, "update", f"JobId={job_id}", f"TimeLimit={-(-(elapsed + warning_s) // 60)}")
