"""`kolm train --check` runs the start-up checks of the real launch: the batch layout for the rank
count the launch will use (--ranks), and the resume check against the run's newest complete
checkpoint. Bad recipe values stop it with exit status 2 and a message naming the key."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers.dist import write_recipe
from helpers.marker import write_marker

from kolm.train.config import load_config

pytestmark = pytest.mark.cli


def _check(recipe, *args, env=None):
    return subprocess.run([sys.executable, "-m", "kolm", "train", "--config", str(recipe), "--check", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def _files(root):
    return sorted((p.relative_to(root), p.stat().st_size) for p in root.rglob("*"))


def test_check_runs_the_resume_check_of_the_real_start(tmp_path, shards, tokenizer_dir):
    from kolm.train.setup import prepare

    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run)
    cfg = load_config(recipe)
    write_marker(run, cfg, prepare(cfg), step=4, world_size=2)
    before = _files(run)
    same = _check(recipe)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "config OK (checked for 1 rank)" in same.stdout
    assert "resumes from global_step4 (step 4 of 12, 32 samples consumed)" in same.stdout
    assert "written on 2 ranks, it is converted once to DeepSpeed's universal checkpoint format" in same.stdout
    two = _check(recipe, "--ranks", "2")
    assert two.returncode == 0 and "checked for 2 ranks" in two.stdout and "universal" not in two.stdout
    changed = _check(recipe, "lr=1e-2", "global_batch=32")
    assert changed.returncode == 2 and "config OK" not in changed.stdout
    assert f"{run} was started with different settings (global_batch 8 vs 32, lr 0.003 vs 0.01" in changed.stderr
    assert _files(run) == before
    assert "starts a new run" in _check(recipe, f"run_dir={tmp_path / 'other'}").stdout


def test_ranks_checks_the_layout_of_the_launch(tmp_path, shards, tokenizer_dir):
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, tmp_path / "run",
                          rampup_batch_size=[4, 4, 64], global_batch=16)
    four = _check(recipe, "--ranks", "4")
    assert four.returncode == 2 and "batch 4 of the ramp is not divisible by micro batch 2 x 4" in four.stderr
    three = _check(recipe, "--ranks", "3", "rampup_batch_size=[]")
    assert three.returncode == 2 and "global batch 16 is not divisible by micro batch 2 x 3" in three.stderr
    two = _check(recipe, "--ranks", "2")
    assert two.returncode == 0 and "config OK (checked for 2 ranks)" in two.stdout
    assert "gradient accumulation 4 at the full batch on 2 ranks" in two.stdout
    launcher = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    assert "checked for 2 ranks" in _check(recipe, env=launcher).stdout
    zero = _check(recipe, "--ranks", "0")
    assert zero.returncode == 2 and "--ranks: must be a positive integer" in zero.stderr
    alone = subprocess.run([sys.executable, "-m", "kolm", "train", "--config", str(recipe), "--ranks", "2"],
                           capture_output=True, text=True)
    assert alone.returncode == 2 and "--ranks goes with --check" in alone.stderr


@pytest.mark.parametrize(
    ("override", "named"),
    [("adam_beta1=1.5", "`adam_beta1` must be in [0, 1)"), ("seed=-1", "`seed` must be in [0, "),
     ("model_overrides.num_attention_heads=0", "`model_overrides.num_attention_heads` must be a positive integer"),
     ("model_overrides.hidden_size=abc", "`model_overrides.hidden_size` must be a positive integer"),
     ("lr=@1", "the value of `lr` is not valid YAML")],
)
def test_check_refuses_bad_values_with_status_2(tmp_path, shards, tokenizer_dir, override, named):
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, tmp_path / "run")
    proc = _check(recipe, override)
    assert proc.returncode == 2 and named in proc.stderr and "Traceback" not in proc.stderr
