"""Kill-anywhere soak: train on 2 local ranks, SIGKILL the job at random moments (during
checkpoint writes and just after a resume too), restart it each time until it finishes, and
check after every kill that what resume would pick is a complete, loadable checkpoint."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kolm.train.checkpoint import MARKER, _tagged_dirs, complete_checkpoints, find_resume

from .dist import Ranks, train_records

STRATEGIES = ("startup", "random_step", "during_save", "after_resume")


@dataclass
class SoakReport:
    kills: list[dict] = field(default_factory=list)  # strategy, step reached, newest complete checkpoint
    attempts: int = 0
    resumed_from: list[str] = field(default_factory=list)

    def summary(self) -> str:
        by = {s: sum(k["strategy"] == s for k in self.kills) for s in STRATEGIES}
        return (f"{len(self.kills)} kills survived ({', '.join(f'{n} {s}' for s, n in by.items())}), "
                f"{self.attempts} starts")


def _running(ranks: Ranks) -> bool:
    return all(p.poll() is None for p in ranks.procs)


def _steps(run_dir: Path) -> int:
    return len(train_records(run_dir))


def _saving(ckpt_dir: Path) -> bool:
    """A checkpoint directory newer than every complete one is being written."""
    complete = complete_checkpoints(ckpt_dir)
    newest = complete[0].step if complete else -1
    return any(step > newest and not (path / MARKER).exists() for step, path in _tagged_dirs(ckpt_dir))


def _wait_for_moment(ranks: Ranks, strategy: str, run_dir: Path, total_steps: int, rng: random.Random,
                     resumed: bool, timeout: float) -> bool:
    """Wait for the moment to kill and freeze the ranks there (SIGSTOP: nothing moves on between the
    moment and the kill, however fast the machine); False when the run ended first.

    startup: a random moment while the processes import and the engine starts (at the latest when
    this attempt logs its first step); random_step: just after a random step; during_save: while a
    checkpoint is being written; after_resume: within the first steps after a resume."""
    found = _moment(ranks, strategy, run_dir, total_steps, rng, resumed, timeout)
    if found:
        for proc in ranks.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGSTOP)
    return found


def _moment(ranks: Ranks, strategy: str, run_dir: Path, total_steps: int, rng: random.Random, resumed: bool,
            timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    kill_at = time.monotonic() + rng.uniform(0.3, 6.0) if strategy == "startup" else None
    start_steps = _steps(run_dir)
    # A few steps at most, so that the kills spread over the whole run.
    target = min(start_steps + rng.randint(1, 6), total_steps - 1)
    if strategy == "after_resume" and not resumed:
        strategy = "random_step"
    seen_resume = None
    while time.monotonic() < deadline:
        if not _running(ranks):
            return False
        if kill_at is not None and (time.monotonic() >= kill_at or _steps(run_dir) > start_steps):
            return True
        if strategy == "during_save" and _saving(run_dir / "checkpoints"):
            time.sleep(rng.uniform(0.0, 0.01))
            return True
        if strategy == "random_step" and _steps(run_dir) >= target:
            time.sleep(rng.uniform(0.0, 0.05))
            return True
        if strategy == "after_resume":
            if seen_resume is None and "resuming from" in ranks.output():
                seen_resume = _steps(run_dir)
            elif seen_resume is not None and _steps(run_dir) >= seen_resume + rng.randint(0, 2):
                return True
        time.sleep(0.002 if strategy == "during_save" else 0.01)
    return _running(ranks)


def check_resume_target(ckpt_dir: Path) -> str | None:
    """What resume would pick must be complete and every file in it must load."""
    picked = find_resume(ckpt_dir, lambda msg: None)
    if picked is None:
        return None
    for f in picked.path.rglob("*.pt"):
        torch.load(f, map_location="cpu", weights_only=False)  # our own files, written by this test
    json.loads((picked.path / MARKER).read_text())
    return picked.path.name


def soak(recipe: Path, run_dir: Path, log_dir: Path, total_steps: int, kills: int, seed: int,
         timeout: float = 120.0, max_attempts: int = 200) -> SoakReport:
    rng = random.Random(seed)
    report = SoakReport()
    while report.attempts < max_attempts:
        expected = check_resume_target(run_dir / "checkpoints")
        ranks = Ranks(2, recipe, log_dir=log_dir / f"attempt{report.attempts:03d}")
        report.attempts += 1
        if len(report.kills) >= kills:
            codes = ranks.wait(900)
            if codes != [0, 0]:
                raise AssertionError(f"final attempt failed with {codes}:\n{ranks.output()[-3000:]}")
            _check_resumed_from(ranks, expected, report)
            return report
        strategy = STRATEGIES[len(report.kills) % len(STRATEGIES)]
        if _wait_for_moment(ranks, strategy, run_dir, total_steps, rng, expected is not None, timeout):
            ranks.kill_all()
            _check_resumed_from(ranks, expected, report)
            report.kills.append({"strategy": strategy, "steps_logged": _steps(run_dir),
                                 "resume_target": check_resume_target(run_dir / "checkpoints")})
        else:
            codes = ranks.wait(60)
            if codes != [0, 0]:
                raise AssertionError(f"attempt failed with {codes}:\n{ranks.output()[-3000:]}")
            _check_resumed_from(ranks, expected, report)
            return report  # the run finished before the kill came
    raise AssertionError(f"no finish after {max_attempts} starts")


def _check_resumed_from(ranks: Ranks, expected: str | None, report: SoakReport) -> None:
    """The attempt resumed from exactly the checkpoint that was complete when it started."""
    out = ranks.output()
    if "resuming from" not in out:
        if expected is not None and "phi-tiny" in out:  # it got far enough to have resumed
            raise AssertionError(f"started fresh although {expected} was complete:\n{out[-2000:]}")
        return
    tag = out.split("resuming from ", 1)[1].split(":", 1)[0]
    if tag != expected:
        raise AssertionError(f"resumed from {tag}, expected {expected}")
    report.resumed_from.append(tag)
