"""Running `kolm clean`'s datatrove pipelines: locally (a pool of workers) with one progress bar
per stage, and quietly (datatrove's own log goes to each task's log file, not the terminal).

datatrove's local executor starts its workers through a forkserver, which re-imports the main
module: the `kolm` console script and ``python -m kolm`` both guard their entry point for that.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import sys
import threading
import time
from pathlib import Path

import datatrove.executor.base as _base
import datatrove.pipeline.dedup.exact_dedup as _exact
import datatrove.pipeline.dedup.minhash as _minhash
import datatrove.utils._import_utils as _imports
import multiprocess
from datatrove.executor.local import LocalPipelineExecutor
from loguru import logger

from kolm.data.clean_workers import PRELOAD
from kolm.log import say

_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}"


_quiet = False


def quiet() -> None:
    """datatrove's console logging off except critical errors (once per process: loguru's add is slow)."""
    global _quiet
    if not _quiet:
        logger.remove()
        logger.add(sys.stderr, level="CRITICAL")
        _quiet = True


def _task_logger(logging_dir, rank: int, local_rank: int = 0, node_rank: int = -1):
    quiet()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    return logfile, logger.add(logfile, level="DEBUG", format=_FORMAT, colorize=False)


def _close_task_logger(task_log) -> None:
    logfile, handler = task_log
    logger.complete()
    logger.remove(handler)
    logfile.close()


def _no_bar(iterable=None, *args, **kwargs):
    return iterable


# The executor's base module looks these up by name when a task starts and ends; the dedup steps'
# own progress bars would interleave with kolm's stage bars.
_base.add_task_logger = _task_logger
_base.close_task_logger = _close_task_logger
_exact.tqdm = _minhash.tqdm = _no_bar


@functools.cache
def _distribution_available(name: str) -> bool | None:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return None


# datatrove checks that a step's packages are installed (xxhash for the hash settings, kiwipiepy for
# the MinHash step) by reading the metadata of every installed distribution, about a second of the
# command's start; looking the one name up gives the same answer.
_imports._is_distribution_available = _distribution_available



class KolmExecutor(LocalPipelineExecutor):
    """datatrove's local executor; defined here so that its workers import this module (and so
    send datatrove's log to the task log files) before they run a task."""


def run_local(pipeline: list, tasks: int, workers: int, logging_dir: Path, label: str, progress: bool,
              ranks: tuple[int, int] | None = None) -> None:
    """Run tasks ``ranks`` (default: all) of a ``tasks``-task pipeline on ``workers`` processes; a
    task that finished in an earlier, killed run is skipped (datatrove's completion markers)."""
    quiet()
    multiprocess.get_context("forkserver").set_forkserver_preload(PRELOAD)
    lo, hi = ranks or (0, tasks)
    executor = KolmExecutor(pipeline, tasks=tasks, workers=max(1, min(workers, hi - lo)), local_tasks=hi - lo,
                            local_rank_offset=lo, logging_dir=str(logging_dir), skip_completed=True)
    with StageBar(logging_dir / "completions", tasks, label, progress):
        executor.run()
    missing = [r for r in range(lo, hi) if not (logging_dir / "completions" / f"{r:05d}").is_file()]
    if missing:
        raise RuntimeError(f"{label}: tasks {missing[:10]} did not finish; see {logging_dir}/logs")


def wait_for_stage(logging_dir: Path, tasks: int, label: str, poll_seconds: float = 2.0) -> None:
    """Wait until every task of a stage has finished (the other array tasks run the rest)."""
    completions = logging_dir / "completions"
    told = False
    while not completions.is_dir() or len(os.listdir(completions)) < tasks:
        if not told:
            say(f"{label}: waiting for the other array tasks to finish their share")
            told = True
        time.sleep(poll_seconds)


class StageBar:
    """A progress bar of finished tasks, fed by polling datatrove's completion markers."""

    def __init__(self, completions: Path, tasks: int, label: str, enabled: bool):
        self.completions, self.tasks, self.label, self.enabled = completions, tasks, label, enabled
        self.stop = threading.Event()

    def _done(self) -> int:
        return len(os.listdir(self.completions)) if self.completions.is_dir() else 0

    def _poll(self, bar) -> None:
        while not self.stop.wait(0.5):
            bar.n = self._done()
            bar.refresh()

    def __enter__(self) -> StageBar:
        from tqdm import tqdm

        self.bar = tqdm(total=self.tasks, desc=self.label, unit="task", file=sys.stderr, disable=not self.enabled,
                        initial=self._done(), mininterval=0.5)
        self.thread = threading.Thread(target=self._poll, args=(self.bar,), daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.bar.n = self._done()
        self.bar.close()
