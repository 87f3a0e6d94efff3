"""Kill-anywhere soak on 2 CPU ranks: SIGKILL at random moments, during checkpoint writes and
right after resumes; the run still finishes with the losses and weights of an uninterrupted one."""

from __future__ import annotations

import os

import pytest
import torch
from helpers.dist import run_ranks, train_records, write_recipe
from helpers.soak import STRATEGIES, soak

from kolm.train.checkpoint import complete_checkpoints, consolidated_state_dict

pytestmark = pytest.mark.soak

SOAK_RUN = {"train_steps": 60, "save_every": 4, "eval_every": 20, "keep_checkpoints": 2}
KILLS = 8


def _final_weights(run_dir):
    return consolidated_state_dict(complete_checkpoints(run_dir / "checkpoints")[0])


def test_kill_anywhere_soak_matches_an_uninterrupted_run(tmp_path, shards, tokenizer_dir):
    ref = write_recipe(tmp_path / "ref.yaml", shards, tokenizer_dir, tmp_path / "ref", **SOAK_RUN)
    codes, out = run_ranks(2, ref, log_dir=tmp_path / "ref-logs")
    assert codes == [0, 0], out[-3000:]
    recipe = write_recipe(tmp_path / "soak.yaml", shards, tokenizer_dir, tmp_path / "run", **SOAK_RUN)
    seed = int(os.environ.get("KOLM_SOAK_SEED", "0"))
    report = soak(recipe, tmp_path / "run", tmp_path / "logs", SOAK_RUN["train_steps"], kills=KILLS, seed=seed)
    assert len(report.kills) == KILLS, (seed, report.summary())
    assert {k["strategy"] for k in report.kills} == set(STRATEGIES), (seed, report.kills)
    assert report.resumed_from, (seed, report.summary())

    got = [(r["step"], r["consumed_samples"], r["loss"]) for r in train_records(tmp_path / "run")]
    want = [(r["step"], r["consumed_samples"], r["loss"]) for r in train_records(tmp_path / "ref")]
    assert got == want, (seed, report.kills)
    final, reference = _final_weights(tmp_path / "run"), _final_weights(tmp_path / "ref")
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in final), (seed, report.kills)
