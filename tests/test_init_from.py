"""`init_from` and `trainable`: a run that starts from a Hugging Face Phi directory made by
transformers itself, on 2 CPU ranks with real DeepSpeed engines, and the errors a wrong source,
tokenizer or group name gets before any process group starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.base_model import load_weights, make_base_model
from helpers.cli import run_kolm
from helpers.dist import run_ranks, write_recipe

from kolm.train.checkpoint import complete_checkpoints, consolidated_state_dict

REPO = Path(__file__).resolve().parent.parent

# A run that cannot move its weights: lr 0 (AdamW's decay is lr x weight_decay, so none either).
STILL = {"model": "", "lr": 0.0, "min_lr": 0.0, "train_steps": 1, "save_every": 1, "eval_every": 100}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tokenizer_dir):
    """A transformers-made Phi over the shards' tokenizer, 100 rows past it."""
    return make_base_model(tokenizer_dir, tmp_path_factory.mktemp("base") / "phi")


def _final_weights(run_dir):
    return consolidated_state_dict(complete_checkpoints(run_dir / "checkpoints")[0])


@pytest.mark.dist
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_init_from_starts_from_bitwise_the_source_weights(tmp_path, shards, base_model, stage):
    recipe = write_recipe(tmp_path / "r.yaml", shards, base_model, tmp_path / "run", init_from=str(base_model),
                          zero_stage=stage, precision="fp32", **STILL)
    codes, out = run_ranks(2, recipe, log_dir=tmp_path / "logs")
    assert codes == [0, 0], out[-3000:]
    source, got = load_weights(base_model), _final_weights(tmp_path / "run")
    assert set(got) == set(source)
    for name, tensor in source.items():
        assert torch.equal(got[name], tensor), name
    marker = complete_checkpoints(tmp_path / "run" / "checkpoints")[0].marker
    assert marker["init_from"]["path"] == str(base_model.resolve())
    assert len(marker["init_from"]["weights_sha256"]) == 64


@pytest.mark.dist
def test_bf16_master_weights_keep_the_source_precision_and_frozen_layers_stay(tmp_path, shards, base_model):
    """bf16 ZeRO-2: the fp32 master weights are the source's values, not a bf16-rounded copy; with
    only the embeddings trainable (weight decay on), the layers stay within the bf16 rounding."""
    recipe = write_recipe(tmp_path / "r.yaml", shards, base_model, tmp_path / "run", init_from=str(base_model),
                          precision="bf16", zero_stage=2, trainable=["input_embeddings", "output_embeddings"],
                          **{**STILL, "lr": 1e-3, "warmup_steps": 0, "train_steps": 3, "save_every": 3})
    codes, out = run_ranks(2, recipe, log_dir=tmp_path / "logs")
    assert codes == [0, 0], out[-3000:]
    source, got = load_weights(base_model), _final_weights(tmp_path / "run")
    for name, tensor in source.items():
        if name.startswith(("model.embed_tokens", "lm_head")):
            assert not torch.equal(got[name], tensor), f"{name} did not train"
        else:
            assert torch.equal(got[name], tensor.to(torch.bfloat16).float()), f"{name} changed"


@pytest.mark.dist
def test_bf16_start_keeps_full_precision_masters(tmp_path, shards, base_model):
    recipe = write_recipe(tmp_path / "r.yaml", shards, base_model, tmp_path / "run", init_from=str(base_model),
                          precision="bf16", zero_stage=3, **STILL)
    codes, out = run_ranks(2, recipe, log_dir=tmp_path / "logs")
    assert codes == [0, 0], out[-3000:]
    source, got = load_weights(base_model), _final_weights(tmp_path / "run")
    rounded = [n for n, t in source.items() if not torch.equal(t.to(torch.bfloat16).float(), t)]
    assert rounded, "the source must hold values bf16 cannot represent for this test to mean anything"
    for name, tensor in source.items():
        assert torch.equal(got[name], tensor), name


def _check(tmp_path, shards, tokenizer, **overrides):
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer, tmp_path / "run", **{"model": "", **overrides})
    return run_kolm("train", "--config", recipe, "--check")


@pytest.mark.cli
def test_check_prints_the_trainable_parameters_per_group(tmp_path, shards, base_model):
    proc = _check(tmp_path, shards, base_model, init_from=str(base_model), trainable="output_embeddings,layers")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0] + " " + line.split()[1]: line for line in proc.stdout.splitlines()
            if line.strip().startswith(("input", "output", "layers"))}
    config = json.loads((base_model / "config.json").read_text())
    rows_count, hidden = config["vocab_size"], config["hidden_size"]
    assert f"0 of {rows_count * hidden:>14,}" in rows["input embeddings"]
    both = rows_count * hidden + rows_count
    assert f"{both:>14,} of {both:>14,}" in rows["output embeddings"]
    assert "weights from init_from" in proc.stdout


@pytest.mark.cli
@pytest.mark.parametrize(("overrides", "message"), [
    ({"trainable": "layers,embeddings"}, "unknown group(s) 'embeddings'"),
    ({"trainable": ["new_input_embeddings"]}, "records no base vocabulary"),
    ({"model": "phi-10m"}, "recipe's model phi-10m in hidden_size (64 vs 256), num_hidden_layers (2 vs 6)"),
    ({"model_overrides": {"num_hidden_layers": 3}}, "recipe's model_overrides in num_hidden_layers (2 vs 3)"),
])
def test_bad_init_recipes_are_refused_before_any_process_starts(tmp_path, shards, base_model, overrides, message):
    proc = _check(tmp_path, shards, base_model, init_from=str(base_model), **overrides)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.cli
def test_a_source_that_is_not_phi_is_refused(tmp_path, shards, base_model, tokenizer_dir):
    fake = tmp_path / "llama"
    fake.mkdir()
    config = json.loads((base_model / "config.json").read_text())
    (fake / "config.json").write_text(json.dumps({**config, "model_type": "llama",
                                                  "architectures": ["LlamaForCausalLM"]}))
    proc = _check(tmp_path, shards, tokenizer_dir, init_from=str(fake))
    assert proc.returncode == 2 and "a LlamaForCausalLM model, not PhiForCausalLM" in proc.stderr, proc.stderr


@pytest.mark.cli
def test_a_tokenizer_larger_than_the_rows_says_to_expand(tmp_path, shards, tokenizer_dir, other_tokenizer):
    small = make_base_model(other_tokenizer, tmp_path / "small", spare_rows=0)  # 1,000 rows for a 2,000 tokenizer
    proc = _check(tmp_path, shards, tokenizer_dir, init_from=str(small))
    assert proc.returncode == 2 and "run `kolm model expand --model" in proc.stderr, proc.stderr


@pytest.mark.cli
def test_shards_of_another_tokenizer_than_the_sources_are_refused(tmp_path, shards, tokenizer_dir, other_tokenizer):
    big = make_base_model(other_tokenizer, tmp_path / "other", spare_rows=1500)  # rows enough, wrong tokenizer
    proc = _check(tmp_path, shards, tokenizer_dir, init_from=str(big))
    assert proc.returncode == 2 and "is not the tokenizer of init_from" in proc.stderr, proc.stderr
    assert "kolm shard --tokenizer" in proc.stderr


@pytest.mark.cli
@pytest.mark.parametrize("stage", ["stage1-new-input", "stage2-new-output", "stage3-new-rows", "stage4-all"])
def test_the_staged_phi_2_recipes_check_against_a_grown_model(tmp_path, grown, korean_shards, stage):
    """Each shipped stage, pointed at a small grown model (its shape comes from the source), passes
    --check and trains what its name says."""
    recipe = REPO / "recipes" / "phi-2-ko-extend" / f"{stage}.yaml"
    proc = run_kolm("train", "--config", recipe, f"init_from={grown}", f"data={korean_shards}",
                    f"run_dir={tmp_path / 'run'}", "seq_len=64", "global_batch=8", "micro_batch=2", "--check")
    assert proc.returncode == 0, proc.stderr
    if stage == "stage4-all":
        assert "trainable" not in proc.stdout
        return
    table = {line.split()[0]: line for line in proc.stdout.splitlines()
             if line.strip().startswith(("input", "output", "layers"))}
    assert " 0 of" in table["layers"]
    assert (" 0 of" in table["input"]) == (stage == "stage2-new-output")
    assert (" 0 of" in table["output"]) == (stage == "stage1-new-input")
