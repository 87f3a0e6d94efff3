"""The distributed environment: who am I, how many are we, where is the master.

Reads whatever the launcher provides: torchrun, the `deepspeed` launcher and submitit's
`TorchDistributedEnvironment().export()` set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT;
`srun` (one task per GPU) sets SLURM_* variables, from which the rendezvous is derived. With no
launcher it is a single process.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

from kolm.errors import KolmError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list such as ``gpu[01-03,07],login1`` into host names."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
    return hosts


def slurm_master_port(job_id: str) -> int:
    """A port from the job id, so every task of a job (and only that job) agrees on it."""
    return 20000 + int(job_id) % 20000


def _int_env(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise KolmError(f"environment variable {name}={value!r} is not an integer") from None


def detect() -> DistEnv:
    """The current process's place in the job, from the launcher's environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in env:
                raise KolmError(f"RANK and WORLD_SIZE are set but {name} is not; the launcher must set it")
        local = _int_env("LOCAL_RANK") if "LOCAL_RANK" in env else _int_env("RANK")
        return DistEnv(_int_env("RANK"), _int_env("WORLD_SIZE"), local, env["MASTER_ADDR"],
                       _int_env("MASTER_PORT"), "torch")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        missing = [v for v in ("SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST") if v not in env]
        if missing:
            raise KolmError(
                f"running under srun but {', '.join(missing)} is not set; start with `srun` inside an allocation"
            )
        hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
        port = _int_env("MASTER_PORT") if "MASTER_PORT" in env else slurm_master_port(env["SLURM_JOB_ID"])
        return DistEnv(_int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS"), _int_env("SLURM_LOCALID"),
                       env.get("MASTER_ADDR", hosts[0]), port, "slurm")
    return DistEnv(0, 1, 0, "127.0.0.1", free_port(), "single")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export(d: DistEnv) -> None:
    """Publish the environment in the variables torch.distributed and DeepSpeed read."""
    os.environ.update(
        RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(d.local_rank),
        MASTER_ADDR=d.master_addr, MASTER_PORT=str(d.master_port),
    )
