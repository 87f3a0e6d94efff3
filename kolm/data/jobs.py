"""What `kolm clean`, `kolm shard` and `kolm tokenizer` share about starting a job: checking the
numbers and the --out directory they were given before anything is written, and letting the
tasks of a Slurm array agree on one plan (only task 0 ever replaces earlier output)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from kolm.errors import KolmError

PLAN_WAIT_SECONDS = 600.0  # how long a task other than 0 waits for task 0 to record the plan


def check_at_least(option: str, value: int | None, minimum: int = 1) -> None:
    """Refuse a count below ``minimum`` (None means the option was not given)."""
    if value is not None and value < minimum:
        raise KolmError(f"{option} {value}: must be at least {minimum}")


def check_tasks(num_tasks: int, task_index: int) -> None:
    """Refuse an array-task count or index that names no task."""
    if num_tasks < 1:
        raise KolmError(f"--num-tasks {num_tasks}: must be at least 1 (the number of array tasks)")
    if not 0 <= task_index < num_tasks:
        raise KolmError(f"--task-index {task_index} must be in [0, {num_tasks}) for --num-tasks {num_tasks}")


def array_task(num_tasks: int | None = None, task_index: int | None = None) -> tuple[int, int]:
    """(num_tasks, task_index): as given, else from a Slurm array job's environment, else (1, 0)."""
    env = os.environ
    if (num_tasks is not None and task_index is not None) or not env.get("SLURM_ARRAY_TASK_ID"):
        return (1 if num_tasks is None else num_tasks, 0 if task_index is None else task_index)
    try:
        count, task_id = int(env["SLURM_ARRAY_TASK_COUNT"]), int(env["SLURM_ARRAY_TASK_ID"])
        first, last = int(env.get("SLURM_ARRAY_TASK_MIN", "0")), int(env.get("SLURM_ARRAY_TASK_MAX", "-1"))
    except (KeyError, ValueError) as e:
        raise KolmError(f"the Slurm array variables do not name a task ({e}); pass --num-tasks and --task-index") from e
    if (last >= 0 and last - first + 1 != count) or not first <= task_id < first + count:
        raise KolmError(f"array task {task_id} of a {count}-task array from {first}: kolm needs the tasks numbered "
                        "without gaps (sbatch --array=0-N, no step or list); or pass --num-tasks and --task-index")
    return (count if num_tasks is None else num_tasks, task_id - first if task_index is None else task_index)


def check_out_dir(out: Path) -> None:
    """Refuse an --out that is a file, or lies below one, before anything is written."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == out else f"lies below {p}, which is a file"
                raise KolmError(f"--out {out} {what}; choose a directory for --out")
            return


def wait_for_plan(out: Path, ready: Callable[[], bool], task_index: int, timeout: float | None = None) -> None:
    """Array task ``task_index`` (not 0) waits until ``ready()``: task 0 has checked ``out`` (and, with
    --overwrite, removed earlier output of another plan) and recorded this run's plan."""
    timeout = PLAN_WAIT_SECONDS if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() >= deadline:
            raise KolmError(
                f"{out}: array task {task_index} waited {timeout:.0f}s for array task 0 to start this run "
                "(task 0 alone checks --out and, with --overwrite, replaces earlier output); see task 0's log, "
                "and run task 0 first"
            )
        time.sleep(min(1.0, timeout / 10))
