"""Checkpoint bookkeeping: which checkpoint resume picks, and which ones retention keeps."""

from __future__ import annotations

import json

import pytest

from kolm.train.checkpoint import MARKER, best_checkpoint, complete_checkpoints, find_resume, prune

pytestmark = pytest.mark.unit


def _fake(ckpt_dir, step, eval_loss=None, complete=True, payload=b"weights"):
    d = ckpt_dir / f"global_step{step}"
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(payload)
    if complete:
        files = {"mp_rank_00_model_states.pt": len(payload)}
        (d / MARKER).write_text(json.dumps({"step": step, "files": files, "eval_loss": eval_loss}))
    return d


def test_resume_skips_incomplete_and_damaged_checkpoints_and_says_why(tmp_path):
    _fake(tmp_path, 10)
    _fake(tmp_path, 20)
    damaged = _fake(tmp_path, 30)
    (damaged / "mp_rank_00_model_states.pt").write_bytes(b"short")
    missing = _fake(tmp_path, 40)
    (missing / "mp_rank_00_model_states.pt").unlink()
    _fake(tmp_path, 50, complete=False)
    said = []
    ckpt = find_resume(tmp_path, said.append)
    assert ckpt.step == 20
    assert [m.split(":")[0] for m in said] == ["skipping checkpoint global_step50", "skipping checkpoint global_step40",
                                              "skipping checkpoint global_step30"]
    assert "no completion marker" in said[0] and "is missing" in said[1] and "has 5 bytes, expected 7" in said[2]
    assert find_resume(tmp_path / "none", said.append) is None


def test_prune_keeps_newest_k_and_the_best(tmp_path):
    for step, loss in [(10, 3.0), (20, 1.5), (30, 2.5), (40, 2.0), (50, None)]:
        _fake(tmp_path, step, loss)
    _fake(tmp_path, 35, complete=False)  # an interrupted save, older than the newest complete one
    _fake(tmp_path, 60, complete=False)  # possibly being written right now: left alone
    prune(tmp_path, keep=2, say=lambda m: None)
    remaining = sorted(int(p.name.removeprefix("global_step")) for p in tmp_path.glob("global_step*"))
    assert remaining == [20, 40, 50, 60]
    assert best_checkpoint(tmp_path).step == 20
    assert [c.step for c in complete_checkpoints(tmp_path)] == [50, 40, 20]
