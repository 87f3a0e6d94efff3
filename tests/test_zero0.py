"""``zero_stage: 0`` (plain data parallel) on 2 CPU ranks, in fp32 and bf16: exact resume after
SIGKILL, resume on another number of ranks without a universal checkpoint, and `kolm convert` /
`kolm eval` reading DeepSpeed's stage-0 layout (in bf16: its bf16 optimizer's fp32 master copies)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.cli import run_kolm
from helpers.dist import kill_at_step, run_ranks, train_records, train_to_end, write_recipe

from kolm.train.checkpoint import MARKER, complete_checkpoints, consolidated_state_dict

STAGE0 = {"zero_stage": 0, "train_steps": 8, "save_every": 4, "eval_every": 4}


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def reference(request, tmp_path_factory, shards, tokenizer_dir):
    """An uninterrupted 8-step stage-0 run on 2 ranks (checkpoints at 4 and 8): (root, precision)."""
    root = tmp_path_factory.mktemp(f"zero0-{request.param}")
    train_to_end(root, shards, tokenizer_dir, precision=request.param, **STAGE0)
    return root, request.param


def _losses(run_dir):
    return [(r["step"], r["consumed_samples"], r["loss"], r["grad_norm"]) for r in train_records(run_dir)]


@pytest.mark.dist
def test_stage0_trains_and_resumes_after_sigkill_bitwise(tmp_path, shards, tokenizer_dir, reference):
    root, precision = reference
    ref = _losses(root / "run")
    assert [s for s, *_ in ref] == list(range(1, 9)) and ref[-1][2] < ref[0][2] - 0.3
    assert all(norm > 0 for *_, norm in ref)  # the gradient norm is measured in fp32 too (kolm.train.plain_dp)
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir, precision=precision, **STAGE0)
    kill_at_step(recipe, run_dir, 6, log_dir=tmp_path / "logs1")
    assert (run_dir / "checkpoints" / "global_step4" / MARKER).is_file()
    codes, out = run_ranks(2, recipe, log_dir=tmp_path / "logs2")
    assert codes == [0, 0], out[-3000:]
    assert "resuming from global_step4" in out
    assert _losses(run_dir) == ref


@pytest.mark.dist
def test_stage0_resumes_on_one_rank_without_a_universal_checkpoint(tmp_path, shards, tokenizer_dir, reference):
    root, precision = reference
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "run" / "checkpoints" / "global_step4", run_dir / "checkpoints" / "global_step4")
    shutil.copy(root / "run" / "metrics.jsonl", run_dir / "metrics.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir, precision=precision, **STAGE0)
    codes, out = run_ranks(1, recipe, log_dir=tmp_path / "logs")
    assert codes == [0], out[-3000:]
    assert "resuming from global_step4" in out and "universal" not in out
    mine, ref = _losses(run_dir), _losses(root / "run")
    assert [(s, c) for s, c, *_ in mine] == [(s, c) for s, c, *_ in ref]
    # One rank sums 4 micro-batches where two ranks sum 2 each and average: the same up to rounding.
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    for (*_, a, _), (*_, b, _) in zip(mine[4:], ref[4:], strict=True):
        assert a == pytest.approx(b, rel=tolerance)


@pytest.mark.dist
def test_stage0_checkpoint_converts_and_evaluates(tmp_path, shards, reference):
    root, precision = reference
    run = root / "run"
    newest = complete_checkpoints(run / "checkpoints")[0]
    state = consolidated_state_dict(newest)
    module = torch.load(newest.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    params = {k: v for k, v in module.items() if k in state}
    assert set(params) == set(state) and all(v.dtype == torch.float32 for v in state.values())
    for name, weight in params.items():
        # fp32: the module is the master copy; bf16: the masters, rounded, are the module's weights
        # (a wrong order of the bf16 optimizer's flat groups would pair tensors of other values)
        torch.testing.assert_close(state[name].to(weight.dtype), weight, rtol=0, atol=0)
    if precision == "bf16":
        assert any(not torch.equal(state[n], params[n].float()) for n in params)  # fp32 values, not rounded
    out = tmp_path / "hf"
    proc = run_kolm("convert", run, "--out", out, "--dtype", "fp32", check=True)
    assert "verified" in proc.stdout
    assert json.loads((out / "kolm_export.json").read_text())["zero_stage"] == 0
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for name, value in state.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0)
    from_export = run_kolm("eval", out, "--data", shards, check=True).stdout.splitlines()[-1]
    from_ckpt = run_kolm("eval", run, "--data", shards, check=True).stdout.splitlines()[-1]
    assert from_export == from_ckpt and "perplexity" in from_export


@pytest.mark.cli
def test_check_and_plan_accept_stage_0(tmp_path, shards, tokenizer_dir):
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, tmp_path / "run", zero_stage=0)
    check = run_kolm("train", "--config", recipe, "--check")
    assert check.returncode == 0, check.stderr[-2000:]
    measured = run_kolm("plan", "--model", "phi-tiny", "--seq-len", "64", "--measure", "--zero-stage", "0", check=True)
    assert "ZeRO-0, 1 process" in measured.stdout and "model states: estimated" in measured.stdout
    plan = run_kolm("plan", "--model", "phi-1.5", "--nodes", "1", "--gpus-per-node", "1", "--gpu", "h200",
                    check=True).stdout
    assert "zero0" not in plan  # recommended only once a GPU measurement backs it (kolm.train.plan.PLAIN)
