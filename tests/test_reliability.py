"""A shared machine: one writer per run directory, no orphaned workers when a launcher dies, and
DeepSpeed's ops built safely by runs that start together on an empty cache."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.dist import Ranks, free_port, kill_at_step, run_ranks, train_records, wait_for, workers_of, write_recipe

from kolm.train.runlock import HOLDER, LOCK

pytestmark = pytest.mark.dist


def _losses(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["consumed_samples"], r["loss"]) for r in train_records(run_dir)]


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        os.kill(pid, sig)


def test_a_second_trainer_on_a_live_run_dir_is_refused_and_the_live_run_goes_on(tmp_path, reference_run, shards,
                                                                                  tokenizer_dir):
    reference, _ = reference_run
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir)
    live = Ranks(2, recipe, log_dir=tmp_path / "live")
    wait_for(lambda: len(train_records(run_dir)) >= 1, 300, "the live run's first step")
    # Frozen, so that however fast this machine is, the live run is still running when the second starts.
    _signal_all([p.pid for p in live.procs], signal.SIGSTOP)
    files_before = {p.relative_to(run_dir) for p in run_dir.rglob("*")}
    started = time.monotonic()
    codes, out = run_ranks(2, recipe, log_dir=tmp_path / "second", timeout=120)
    refused_in = time.monotonic() - started
    _signal_all([p.pid for p in live.procs], signal.SIGCONT)
    assert codes == [2, 2], out[-3000:]
    assert f"{run_dir} is in use by another training run (process {live.procs[0].pid} on " in out
    assert "give this run another run_dir" in out and refused_in < 60
    assert {p.relative_to(run_dir) for p in run_dir.rglob("*")} == files_before  # it wrote nothing
    assert live.wait() == [0, 0], live.output()[-3000:]
    assert _losses(run_dir) == _losses(reference)  # the live run, untouched
    assert (run_dir / LOCK).is_file() and not (run_dir / HOLDER).exists()  # released at the end


def test_a_killed_run_never_blocks_the_rerun(tmp_path, reference_run, shards, tokenizer_dir):
    reference, _ = reference_run
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir)
    kill_at_step(recipe, run_dir, 5, log_dir=tmp_path / "killed")
    assert (run_dir / HOLDER).is_file()  # left behind by the dead holder; the kernel dropped its lock
    codes, out = run_ranks(2, recipe, log_dir=tmp_path / "rerun")
    assert codes == [0, 0], out[-3000:]
    assert re.search(r"resuming from global_step(4|8):", out) and _losses(run_dir) == _losses(reference)


def _launch(kind: str, recipe: Path, log: Path) -> subprocess.Popen:
    if kind == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(free_port()), "--module"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen([*cmd, "kolm", "train", "--config", str(recipe)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)


@pytest.mark.parametrize("kind", ["torchrun", "deepspeed"])
def test_workers_stop_when_their_launcher_is_killed_and_the_rerun_resumes(tmp_path, reference_run, shards,
                                                                        tokenizer_dir, kind):
    reference, _ = reference_run
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir)
    launcher = _launch(kind, recipe, tmp_path / "launcher.log")
    wait_for(lambda: len(train_records(run_dir)) >= 5, 300, "step 5")
    workers = workers_of(launcher.pid)
    assert len(workers) == 2, (workers, (tmp_path / "launcher.log").read_text()[-2000:])
    # Workers frozen while the launcher alone dies, so the run cannot simply end first.
    _signal_all(workers, signal.SIGSTOP)
    launcher.kill()
    launcher.wait()
    _signal_all(workers, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while _alive(workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(workers), f"workers {_alive(workers)} still running 30 s after the launcher died"
    assert len(train_records(run_dir)) < 12  # they stopped, rather than training on to the end
    rerun = _launch(kind, recipe, tmp_path / "rerun.log")
    assert rerun.wait(600) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    assert "resuming from global_step" in (tmp_path / "rerun.log").read_text()
    assert _losses(run_dir) == _losses(reference)


def test_two_runs_starting_together_on_an_empty_op_cache_both_finish(tmp_path, shards, tokenizer_dir):
    cache = tmp_path / "torch_extensions"  # empty: both want to build DeepSpeed's op at once
    procs = []
    for name in ("a", "b"):
        recipe = write_recipe(tmp_path / f"{name}.yaml", shards, tokenizer_dir, tmp_path / name, train_steps=2,
                              save_every=2, eval_every=2, micro_batch=8)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                 "MASTER_PORT")}
        env.update(TORCH_EXTENSIONS_DIR=str(cache), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        with open(tmp_path / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "kolm", "train", "--config", str(recipe)], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(900) for p in procs]
    logs = [(tmp_path / f"{name}.log").read_text(errors="replace") for name in ("a", "b")]
    assert codes == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert all("finished: 2 steps" in log for log in logs)
