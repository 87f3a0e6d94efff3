"""Evaluation during training when the validation windows do not split evenly over the ranks:
under ZeRO-3 every forward gathers parameters from every rank, so each rank must run the same
number of forwards, and each window must still be scored exactly once. And a run without a
validation split records no evaluation, not one of loss 0 over 0 tokens."""

from __future__ import annotations

import pytest
from helpers.dist import run_ranks, train_records, write_recipe

from kolm.data.shard import ShardOptions, run_shard
from kolm.train.checkpoint import best_checkpoint


@pytest.mark.dist
# With micro batch 2 on 2 ranks, 1 window is one batch, on rank 0: rank 1 has none, so before a padding
# forward its partner waited forever in ZeRO-3's parameter gather. (The split's other layouts, each window
# counted once, are unit-tested in tests/test_packed.py.)
def test_zero3_evaluation_of_an_uneven_split_finishes_and_scores_each_window_once(tmp_path, shards, tokenizer_dir):
    windows = 1
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir, zero_stage=3, precision="fp32",
                          train_steps=2, eval_every=2, save_every=2, eval_samples=windows, hang_timeout=180)
    codes, out = run_ranks(2, recipe, log_dir=tmp_path / "logs", timeout=900)
    assert codes == [0, 0], out[-3000:]
    (record,) = train_records(run_dir, "eval")
    assert record["eval_tokens"] == windows * 64

    from kolm.export.evaluate import evaluate_model

    # The same checkpoint scored on one process (fp32 both times) over the same windows.
    alone = evaluate_model(str(run_dir), str(shards), max_samples=windows, micro_batch=2)
    assert alone.eval_tokens == record["eval_tokens"]
    assert record["eval_loss"] == pytest.approx(alone.eval_loss, rel=1e-4)
    assert record["eval_accuracy"] == pytest.approx(alone.eval_accuracy, abs=1.5 / alone.eval_tokens)


@pytest.mark.dist
def test_eval_at_start_without_a_validation_split_records_nothing(tmp_path, korean_corpus, tokenizer_dir):
    shards = tmp_path / "shards"
    run_shard([str(korean_corpus)], str(tokenizer_dir), shards, ShardOptions(valid_fraction=0.0), workers=1,
              progress=False)
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir, train_steps=1, save_every=1,
                          eval_at_start=True)
    codes, out = run_ranks(1, recipe, log_dir=tmp_path / "logs", timeout=900)
    assert codes == [0], out[-3000:]
    assert "no evaluation" in out and "eval loss" not in out
    assert train_records(run_dir, "eval") == []
    assert best_checkpoint(run_dir / "checkpoints") is None
