"""Weights & Biases: a killed and resumed run is one W&B run with every step logged once; a recipe
asking for W&B without the package is refused by --check."""

from __future__ import annotations

import collections
import json
import os
import re

import pytest
from helpers.cli import run_kolm
from helpers.dist import kill_at_step, run_ranks, train_records, write_recipe

from kolm.train.wandb_log import STATE, history

WANDB = {"wandb_project": "kolm-tests", "wandb_mode": "offline"}


@pytest.mark.dist
def test_a_killed_and_resumed_run_logs_every_step_once_to_one_wandb_run(tmp_path, shards, tokenizer_dir,
                                                                        reference_run):
    reference, _ = reference_run
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir, **WANDB)
    kill_at_step(recipe, run_dir, 6, log_dir=tmp_path / "first")
    run_id = json.loads((run_dir / STATE).read_text())["id"]
    codes, out = run_ranks(2, recipe, log_dir=tmp_path / "resumed")
    assert codes == [0, 0] and re.search(r"resuming from global_step(4|8):", out), out[-3000:]
    assert json.loads((run_dir / STATE).read_text())["id"] == run_id  # the same W&B run
    assert len(list(run_dir.glob(f"wandb/offline-run-*-{run_id}"))) == 2  # one segment per process
    steps = collections.Counter(row["_step"] for row in history(run_dir, run_id))
    assert sorted(steps) == list(range(1, 13)) and set(steps.values()) == {1}, steps
    rows = {row["_step"]: row for row in history(run_dir, run_id)}
    want = {r["step"]: r["loss"] for r in train_records(reference)}
    assert {s: row["train/loss"] for s, row in rows.items()} == pytest.approx(want)
    assert rows[6]["eval/eval_loss"] == pytest.approx(train_records(reference, "eval")[0]["eval_loss"])


@pytest.mark.cli
def test_check_refuses_wandb_without_the_package(tmp_path, shards, tokenizer_dir):
    fake = tmp_path / "no-wandb" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named wandb (simulated)')\n")
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, tmp_path / "run", **WANDB)
    env = {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = run_kolm("train", "--config", recipe, "--check", env=env)
    assert proc.returncode == 2 and "wandb_project is set but the wandb package cannot be imported" in proc.stderr
    assert "pip install 'kolm[wandb]'" in proc.stderr and not (tmp_path / "run").exists()
    ok = run_kolm("train", "--config", recipe, "--check")
    assert ok.returncode == 0, ok.stderr
