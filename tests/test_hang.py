"""The hang watchdog: on 2 CPU ranks a frozen rank ends the job with exit 5 and every live rank's
stacks, the rerun resumes to the uninterrupted losses, and a slow checkpoint save is not a hang; in a
bare interpreter, a main thread blocked in C code is reported, and bytes arriving in a checkpoint
being written keep the watchdog quiet until they stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers.cli import run_kolm
from helpers.dist import Ranks, run_ranks, train_records, wait_for, write_recipe

from kolm.train.hang import EXIT_HANG, read_reports

HANG = 20  # seconds: far above a tiny step on a loaded machine, short enough for a test
PHASES = {"data", "forward", "backward", "optimizer", "collective", "eval", "checkpoint"}
SLOW_DISK = Path(__file__).resolve().parent / "helpers" / "slow_disk"


def _losses(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["consumed_samples"], r["loss"]) for r in train_records(run_dir)]


@pytest.mark.dist
def test_a_frozen_rank_ends_the_job_with_stacks_and_the_rerun_resumes(tmp_path, reference_run, shards, tokenizer_dir):
    reference, _ = reference_run
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir, hang_timeout=HANG)
    ranks = Ranks(2, recipe, log_dir=tmp_path / "hung")
    wait_for(lambda: len(train_records(run_dir)) >= 5, 300, "step 5")
    ranks.signal_rank(1, signal.SIGSTOP)  # rank 1 stops dead mid-run; rank 0 waits for it in a collective
    frozen = time.monotonic()
    try:
        code = ranks.procs[0].wait(timeout=HANG + 60)
        ended_in = time.monotonic() - frozen
    finally:
        os.kill(ranks.procs[1].pid, signal.SIGKILL)  # what srun or torchrun does to the rest of a failed job
        ranks.procs[1].wait()
    out = ranks.output()
    assert code == EXIT_HANG, out[-3000:]
    assert ended_in < HANG + 60
    reports = read_reports(run_dir)
    assert [r.rank for r in reports] == [0], out[-3000:]
    report = reports[0]
    assert report.world_size == 2 and report.phase in PHASES and report.step >= 5
    assert report.path.name == f"step{report.step}-rank0-{report.host}-{report.time}.txt"
    stacks = report.path.read_text()
    assert "Current thread" in stacks and "kolm/train/loop.py" in stacks and 'File "' in stacks
    assert "no training progress for" in out and "1 of 2 ranks reported the hang; no report from rank 1" in out
    summary = run_kolm("report", run_dir, check=True).stdout
    assert f"hang at step {report.step}" in summary and "reported by rank 0 on" in summary
    assert "not by 1 (likely culprits)" in summary

    codes, out = run_ranks(2, recipe, log_dir=tmp_path / "rerun")
    assert codes == [0, 0], out[-3000:]
    assert "resuming from global_step" in out
    assert _losses(run_dir) == _losses(reference)


@pytest.mark.dist
def test_a_checkpoint_save_slower_than_the_timeout_is_not_a_hang(tmp_path, reference_run, shards, tokenizer_dir):
    reference, _ = reference_run
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir, hang_timeout=HANG / 2)
    writes = tmp_path / "slow-writes.log"
    # Rank 0 writes global_step8 at 64 KiB/s: about 45 s, longer than the watchdog's timeout and than
    # the collectives' own (hang_timeout + 30 s), while rank 1 waits for it in DeepSpeed's barrier.
    env = {"PYTHONPATH": os.pathsep.join([str(SLOW_DISK), os.environ.get("PYTHONPATH", "")]),
           "KOLM_TEST_SLOW_DIR": str(run_dir / "checkpoints" / "global_step8"), "KOLM_TEST_SLOW_RANK": "0",
           "KOLM_TEST_SLOW_BPS": str(64 * 1024), "KOLM_TEST_SLOW_LOG": str(writes)}
    codes, out = run_ranks(2, recipe, log_dir=tmp_path / "logs", extra_env=env)
    assert codes == [0, 0], out[-3000:]
    times = [float(t) for t in writes.read_text().split()]
    assert times[-1] - times[0] > HANG / 2 + 30  # the save really was that slow
    assert not read_reports(run_dir) and "no training progress" not in out
    assert _losses(run_dir) == _losses(reference)


WATCHED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from kolm.train.hang import HangWatch
    run, write_for = Path(sys.argv[1]), float(sys.argv[2])
    watch = HangWatch(1.0, run, rank=0, world_size=1).start("20260101T000000Z", step=3)
    watch.progress(3)
    with watch.saving(run / "checkpoints" / "global_step4"):
        target = run / "checkpoints" / "global_step4" / "state.pt"
        target.parent.mkdir(parents=True)
        started = time.monotonic()
        while time.monotonic() - started < write_for:  # a slow save: a few bytes every 0.3 s
            with open(target, "ab") as f:
                f.write(b"x" * 100)
            time.sleep(0.3)
        print("written", flush=True)
        time.sleep(3600)  # then the filesystem stops answering
""")


@pytest.mark.unit
def test_a_save_is_watched_by_its_bytes_and_a_blocked_main_thread_is_reported(tmp_path):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", WATCHED, str(tmp_path / "run"), "4"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == EXIT_HANG, proc.stderr
    assert "written" in proc.stdout  # 4 s of writing under a 1 s timeout was not a hang
    assert time.monotonic() - started < 30
    [report] = read_reports(tmp_path / "run")
    assert (report.rank, report.step, report.phase, report.launch) == (0, 3, "checkpoint", "20260101T000000Z")
    stacks = report.path.read_text()
    assert "Thread" in stacks and 'File "<string>", line 17 in <module>' in stacks  # the main thread's sleep
    assert "1 of 1 ranks reported the hang" in proc.stderr and str(report.path) in proc.stderr


@pytest.mark.unit
def test_hang_timeout_zero_turns_the_watchdog_off(tmp_path):
    code = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from kolm.train.hang import HangWatch
        watch = HangWatch(0, Path(sys.argv[1]), rank=0, world_size=1).start("x", step=0)
        time.sleep(2)
        print("alive", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "alive" in proc.stdout and not (tmp_path / "hangs").exists()
