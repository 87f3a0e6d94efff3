"""`kolm convert --average K` and `--tags`: the exported weights are the element-wise mean of the
checkpoints' fp32 weights (computed here independently, with DeepSpeed's own consolidation), the
model loads in transformers and `kolm eval` takes it, and checkpoints of another shape, tokenizer
or run are refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.cli import run_kolm
from helpers.dist import run_ranks, write_recipe
from safetensors.torch import load_file

from kolm.train.checkpoint import MARKER

pytestmark = pytest.mark.dist


def _fp32(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag).items()}


def _mean(ckpt_dir: Path, tags: list[str]) -> dict[str, torch.Tensor]:
    states = [_fp32(ckpt_dir, t) for t in tags]
    return {k: torch.stack([s[k] for s in states]).mean(dim=0) for k in states[0]}


def _assert_weights(model_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_file(model_dir / "model.safetensors")
    assert set(got) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_average_is_the_mean_of_the_newest_checkpoints_and_loads_and_evaluates(tmp_path, reference_run, shards):
    run, _ = reference_run  # checkpoints at steps 4, 8 and 12
    out = tmp_path / "avg"
    proc = run_kolm("convert", run, "--average", 3, "--out", out, "--dtype", "fp32", check=True)
    assert "the mean of global_step12, global_step8, global_step4" in proc.stdout and "verified" in proc.stdout
    _assert_weights(out, _mean(run / "checkpoints", ["global_step4", "global_step8", "global_step12"]))
    config = json.loads((out / "config.json").read_text())
    assert config["kolm"]["averaged_checkpoints"] == ["global_step12", "global_step8", "global_step4"]
    assert len(json.loads((out / "kolm_export.json").read_text())["averaged"]) == 3

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "PhiForCausalLM"
    scored = run_kolm("eval", out, "--data", shards, check=True).stdout.splitlines()[-1]
    assert "perplexity" in scored

    picked = tmp_path / "picked"
    run_kolm("convert", run, "--tags", "global_step12,global_step4", "--out", picked, "--dtype", "fp32", check=True)
    _assert_weights(picked, _mean(run / "checkpoints", ["global_step4", "global_step12"]))
    assert json.loads((picked / "config.json").read_text())["kolm"]["averaged_checkpoints"] == [
        "global_step12", "global_step4"]


def test_average_of_one_is_the_plain_conversion(tmp_path, reference_run):
    run, _ = reference_run
    run_kolm("convert", run, "--average", 1, "--out", tmp_path / "one", "--dtype", "fp32", check=True)
    run_kolm("convert", run, "--out", tmp_path / "plain", "--dtype", "fp32", check=True)
    one, plain = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert set(one) == set(plain) and all(torch.equal(one[k], plain[k]) for k in plain)


def test_checkpoints_written_on_different_rank_counts_average(tmp_path, reference_run, shards, tokenizer_dir):
    src, _ = reference_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    for tag in ("global_step8", "global_step12"):
        shutil.rmtree(run / "checkpoints" / tag)
    # The same run resumed from global_step4 on one rank writes global_step8 and global_step12 there.
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run)
    codes, out = run_ranks(1, recipe, log_dir=tmp_path / "logs")
    assert codes == [0], out[-3000:]
    sizes = {json.loads((run / "checkpoints" / t / MARKER).read_text())["world_size"] for t in ("global_step4",
                                                                                               "global_step8")}
    assert sizes == {1, 2}
    out_dir = tmp_path / "avg"
    run_kolm("convert", run, "--tags", "global_step4,global_step8", "--out", out_dir, "--dtype", "fp32", check=True)
    _assert_weights(out_dir, _mean(run / "checkpoints", ["global_step4", "global_step8"]))


def _edit_marker(path: Path, **changes) -> None:
    marker = json.loads((path / MARKER).read_text())
    for key, value in changes.items():
        target = marker
        *parents, leaf = key.split("__")
        for p in parents:
            target = target[p]
        target[leaf] = value
    (path / MARKER).write_text(json.dumps(marker))


def test_checkpoints_of_another_shape_tokenizer_or_run_are_refused(tmp_path, reference_run, other_tokenizer):
    src, _ = reference_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    ckpts = run / "checkpoints"
    # Older than global_step12, so that the run's newest checkpoint is the one they are checked against.
    cases = {"global_step1": {"model_config__hidden_size": 128},
             "global_step2": {"tokenizer": str(other_tokenizer)},
             "global_step3": {"run_config__seed": 7}}
    for tag, changes in cases.items():
        shutil.copytree(ckpts / "global_step8", ckpts / tag)
        _edit_marker(ckpts / tag, **changes)
    expected = {"global_step1": "another model shape (hidden_size differ)",
                "global_step2": "trained with another tokenizer",
                "global_step3": "it belongs to another run (seed differ)"}
    for tag, message in expected.items():
        proc = run_kolm("convert", run, "--tags", f"global_step12,{tag}", "--out", tmp_path / tag)
        assert proc.returncode == 2, proc.stderr
        assert f"cannot average {tag} ({ckpts / tag}) with global_step12: {message}" in proc.stderr, proc.stderr
        assert not (tmp_path / tag).exists()
    too_many = run_kolm("convert", run, "--average", 9, "--out", tmp_path / "x")
    assert too_many.returncode == 2 and "has 6 complete checkpoints" in too_many.stderr
    both = run_kolm("convert", run, "--average", 2, "--best", "--out", tmp_path / "x")
    assert both.returncode == 2 and "without --tag or --best" in both.stderr
    one = run_kolm("convert", ckpts / "global_step8", "--average", 2, "--out", tmp_path / "x")
    assert one.returncode == 2 and "averaging takes the run directory" in one.stderr
    assert not (tmp_path / "x").exists()
