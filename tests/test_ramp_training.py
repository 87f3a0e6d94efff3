"""Training with a batch ramp on 2 CPU processes: the loss scaling of each step matches a constant
batch of the same size, a SIGKILL mid-ramp resumes bit for bit, a resume mid-ramp on 1 or 3 ranks
takes the same samples, and a changed ramp refuses to resume."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from helpers.cli import run_kolm
from helpers.dist import kill_at_step, run_ranks, train_records, write_recipe

from kolm.train.rampup import BatchSchedule

# Batches 6, 12, 18 and 24 split over 1, 2 and 3 ranks with micro batch 1. Steps 1-4 take 6 samples,
# 5-6 twelve, 7-8 eighteen, then 24 until 6 x 24 samples: 11 steps, checkpoints at 3, 6 and 9.
RAMP = {"global_batch": 24, "micro_batch": 1, "rampup_batch_size": [6, 6, 72], "train_steps": 6,
        "warmup_steps": 2, "save_every": 3, "eval_every": 100, "eval_samples": 16, "keep_checkpoints": 4}
SCHEDULE = BatchSchedule.from_config(24, [6, 6, 72])


def _steps(run_dir) -> list[tuple]:
    return [(r["step"], r["consumed_samples"], r["global_batch"]) for r in train_records(run_dir)]


def _losses(run_dir) -> list[tuple]:
    return [(r["step"], r["consumed_samples"], r["global_batch"], r["loss"], r["grad_norm"], r["lr"])
            for r in train_records(run_dir)]


@pytest.fixture(scope="module")
def ramp_run(tmp_path_factory, shards, tokenizer_dir):
    """(run dir, recipe) of an uninterrupted ramped run on 2 ranks."""
    root = tmp_path_factory.mktemp("ramp")
    recipe = write_recipe(root / "recipe.yaml", shards, tokenizer_dir, root / "run", **RAMP)
    codes, out = run_ranks(2, recipe, log_dir=root / "logs")
    assert codes == [0, 0], out[-3000:]
    return root / "run", recipe


@pytest.mark.dist
def test_the_run_follows_the_ramp_and_logs_each_steps_batch(ramp_run):
    run_dir, _ = ramp_run
    expected = [(k + 1, SCHEDULE.consumed_after(k + 1), SCHEDULE.batch_at(SCHEDULE.consumed_after(k)))
                for k in range(11)]
    assert _steps(run_dir) == expected
    records = train_records(run_dir)
    # The learning rate counts samples: warmup is 2 x 24 samples, whatever the steps' sizes.
    assert [r["lr"] for r in records[:6]] == pytest.approx([3e-3 * c / 48 for _, c, _ in expected[:6]])
    assert records[-1]["lr"] == pytest.approx(3e-4)
    assert all(r["tokens_per_s"] > 0 for r in records if "tokens_per_s" in r)


@pytest.mark.dist
def test_a_sigkill_mid_ramp_resumes_bit_for_bit(tmp_path, ramp_run):
    reference, recipe = ramp_run
    run_dir = tmp_path / "run"
    kill_at_step(recipe, run_dir, 8, f"run_dir={run_dir}", log_dir=tmp_path / "killed")
    codes, out = run_ranks(2, recipe, f"run_dir={run_dir}", log_dir=tmp_path / "resumed")
    assert codes == [0, 0], out[-3000:]
    assert "resuming from global_step6: step 6, 48 samples consumed" in out
    assert _losses(run_dir) == _losses(reference)


@pytest.mark.dist
@pytest.mark.parametrize("ranks", [1, 3])
def test_a_resume_mid_ramp_on_another_rank_count_takes_the_same_samples(tmp_path, ramp_run, ranks):
    reference, recipe = ramp_run
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    # Step 6 is mid-ramp: the next steps take 18 samples, then 24.
    shutil.copytree(reference / "checkpoints" / "global_step6", run_dir / "checkpoints" / "global_step6")
    shutil.copy(reference / "metrics.jsonl", run_dir / "metrics.jsonl")
    codes, out = run_ranks(ranks, recipe, f"run_dir={run_dir}", log_dir=tmp_path / "logs", timeout=900)
    assert codes == [0] * ranks, out[-3000:]
    assert "converting it to a universal checkpoint" in out
    assert _steps(run_dir) == _steps(reference)
    for mine, ref in zip(train_records(run_dir)[6:], train_records(reference)[6:], strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=2e-2)  # the same samples; bf16 sums in another order


@pytest.mark.dist
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_steps_gradient_is_the_mean_over_its_own_batch(tmp_path, shards, tokenizer_dir, stage):
    # With lr 0 the weights never move, so a step's loss and gradient norm depend only on its samples.
    # Ramped steps 5-6 (batch 8, accumulation 2) take samples 16-32, as steps 3-4 of a constant batch
    # of 8 do; a gradient not scaled by each step's own accumulation would show a different norm.
    frozen = {"lr": 0.0, "min_lr": 0.0, "warmup_steps": 0, "train_steps": 4, "save_every": 100,
              "eval_every": 100, "global_batch": 8, "zero_stage": stage}
    runs = {}
    for name, extra in (("ramp", {"rampup_batch_size": [4, 4, 16]}), ("fixed", {})):
        recipe = write_recipe(tmp_path / f"{name}.yaml", shards, tokenizer_dir, tmp_path / name, **{**frozen, **extra})
        codes, out = run_ranks(2, recipe, log_dir=tmp_path / f"logs-{name}")
        assert codes == [0, 0], out[-3000:]
        runs[name] = {r["consumed_samples"]: (r["loss"], r["grad_norm"]) for r in train_records(tmp_path / name)}
    assert [r["global_batch"] for r in train_records(tmp_path / "ramp")] == [4, 4, 4, 4, 8, 8]
    assert runs["ramp"][24] == runs["fixed"][24] and runs["ramp"][32] == runs["fixed"][32]


@pytest.mark.dist
def test_a_changed_ramp_refuses_to_resume(tmp_path, ramp_run, shards, tokenizer_dir):
    reference, _ = ramp_run
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "checkpoints" / "global_step6", run_dir / "checkpoints" / "global_step6")
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir, **RAMP)
    proc = run_kolm("train", "--config", recipe, "rampup_batch_size=[6,6,144]",
                    env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "was started with different settings (rampup_batch_size [6, 6, 72] vs [6, 6, 144]" in proc.stderr


@pytest.mark.dist
def test_report_shows_the_global_batch_of_each_step(tmp_path, ramp_run):
    run_dir, _ = ramp_run
    proc = run_kolm("report", run_dir, "--out", tmp_path / "report")
    assert proc.returncode == 0, proc.stderr
    assert "global batch (ramp): 6 from step 1, 12 from step 5, 18 from step 7, 24 from step 9" in proc.stdout
    assert (tmp_path / "report" / "lr.png").read_bytes()[:4] == b"\x89PNG"


def _check(recipe, *overrides, env=None):
    return subprocess.run([sys.executable, "-m", "kolm", "train", "--config", str(recipe), "--check", *overrides],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


@pytest.mark.cli
def test_check_prints_the_ramp_and_refuses_one_that_does_not_split(tmp_path, shards, tokenizer_dir):
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, tmp_path / "run", **RAMP)
    ok = _check(recipe)
    assert ok.returncode == 0, ok.stderr
    assert "11 steps" in ok.stdout and "batch ramp [6, 6, 72]: 11 steps in all" in ok.stdout
    rows = [line.split() for line in ok.stdout.splitlines() if line.startswith("  ") and line.split()[0].isdigit()]
    assert rows == [["6", "1", "0", "4", "6"], ["12", "5", "24", "2", "12"], ["18", "7", "48", "2", "18"],
                    ["24", "9", "84", "3", "24"]]
    four = {"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    split = _check(recipe, env=four)
    assert split.returncode == 2
    assert "batch 6 of the ramp is not divisible by micro batch 1 x 4 data-parallel ranks = 4" in split.stderr
    for bad, message in ((["rampup_batch_size=[6,5,72]"], "24 minus start 6 = 18 is not a multiple of the increment 5"),
                         (["rampup_batch_size=[24,6,72]"], "starts at 24, not below global_batch 24"),
                         (["rampup_batch_size=[6,6]"], "is [start, increment, samples] (three integers)"),
                         (["rampup_batch_size=[6,0,72]"], "must all be positive")):
        proc = _check(recipe, *bad)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.cli
def test_plan_counts_the_ramps_steps_and_refuses_one_that_does_not_split():
    proc = run_kolm("plan", "--model", "phi-1.5", "--nodes", "2", "--gpus-per-node", "8", "--gpu", "a100-40",
                    "--lines", "1e8", "--epochs", "2", "--rampup-batch-size", "32", "32", "2000000")
    assert proc.returncode == 0, proc.stderr
    assert "micro_batch=2 " in proc.stdout  # 32 windows over 16 GPUs
    assert "ramp 32 -> 256 by 32 over 2,000,000 samples: 61,116 optimizer steps instead of 45,777" in proc.stdout
    assert "cap the micro batch at 2" in proc.stdout
    bad = run_kolm("plan", "--nodes", "2", "--rampup-batch-size", "8", "8", "1000")
    assert bad.returncode == 2 and "batch 8 of the ramp is not divisible by micro batch 1 x 16" in bad.stderr
