"""Evaluation's figures: each window scored once whatever the rank layout, and an evaluation that
scored no token has no loss (it is never recorded as loss 0, perplexity 1), nor can `kolm eval` be
asked for one."""

from __future__ import annotations

import pytest
import torch
from helpers.cli import run_kolm

from kolm.data.packed import PackedDataset
from kolm.errors import KolmError
from kolm.model.loss import EvalTotals
from kolm.model.phi import PhiForTraining
from kolm.model.presets import build_config, get_shape, padded_vocab
from kolm.train.evaluation import evaluate

SEQ = 8


@pytest.fixture(scope="module")
def valid(shards) -> PackedDataset:
    return PackedDataset(shards, "valid", SEQ)


@pytest.fixture(scope="module")
def model(valid) -> PhiForTraining:
    torch.manual_seed(0)
    config = build_config(get_shape("phi-tiny", num_hidden_layers=1), padded_vocab(valid.vocab_size), 0, 0, 64)
    return PhiForTraining(config).eval()


def _evaluate(model, valid: dict, rank: int = 0, world: int = 1, limit: int | None = None):
    return evaluate(model, valid, 2, rank, world, limit, torch.from_numpy, lambda x: {})


@pytest.mark.unit
def test_each_rank_of_an_uneven_split_scores_its_own_windows_once(model, valid):
    # 5 windows, micro batch 2, 2 ranks: rank 0 scores 2 + 1 windows, rank 1 scores 2 and pads one forward.
    alone = _evaluate(model, {"v": valid}, limit=5)
    ranks = [_evaluate(model, {"v": valid}, r, 2, limit=5) for r in range(2)]
    assert [r["eval_tokens"] for r in ranks] == [3 * SEQ, 2 * SEQ] and alone["eval_tokens"] == 5 * SEQ
    loss_sum = sum(r["eval_loss"] * r["eval_tokens"] for r in ranks)
    correct = sum(r["eval_accuracy"] * r["eval_tokens"] for r in ranks)
    assert loss_sum == pytest.approx(alone["eval_loss"] * alone["eval_tokens"], rel=1e-5)
    assert correct == pytest.approx(alone["eval_accuracy"] * alone["eval_tokens"])


@pytest.mark.unit
@pytest.mark.parametrize("limit", [-1, -8])
def test_an_evaluation_of_no_window_records_nothing(model, valid, limit, capfd):
    assert _evaluate(model, {"v": valid}, limit=limit) is None
    assert "evaluation skipped: it scored 0 tokens" in capfd.readouterr().err


@pytest.mark.unit
def test_without_a_validation_split_there_is_no_evaluation(model):
    assert _evaluate(model, {}) is None


@pytest.mark.unit
def test_totals_of_no_token_have_no_loss():
    with pytest.raises(KolmError, match="scored 0 tokens"):
        EvalTotals().summary()


@pytest.mark.cli
@pytest.mark.parametrize(("option", "value"), [("--max-samples", 0), ("--max-samples", -2), ("--micro-batch", 0)])
def test_kolm_eval_refuses_options_that_score_nothing(tmp_path, shards, option, value):
    model = tmp_path / "model"  # never loaded: the options are checked first
    model.mkdir()
    proc = run_kolm("eval", model, "--data", shards, option, value)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"{option} must be at least 1" in proc.stderr and "Traceback" not in proc.stderr
