"""Drive the local Slurm cluster from tests: start it, submit, and watch jobs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "local-slurm.sh"


def start_cluster() -> dict[str, str]:
    """Start (or reuse) the 2-node local cluster; returns the environment jobs are submitted with."""
    proc = subprocess.run([str(TOOL), "start", "--nodes", "2"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"tools/local-slurm.sh start failed:\n{proc.stdout}\n{proc.stderr}")
    conf = subprocess.run([str(TOOL), "env"], capture_output=True, text=True, check=True).stdout
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
