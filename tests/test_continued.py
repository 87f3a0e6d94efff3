"""Continued pretraining end to end on 2 CPU ranks: an English-only Phi (made by transformers) is
grown for a Korean-extended tokenizer, stage 1 trains only the new rows (bf16, ZeRO-2, weight
decay on), stage 2 trains everything (ZeRO-3) from stage 1's run directory, and the result loads
in `transformers.pipeline` with the extended tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.base_model import load_weights
from helpers.cli import run_kolm
from helpers.dist import run_ranks, train_records, write_recipe
from tokenizers import Tokenizer

from kolm.train.checkpoint import complete_checkpoints, consolidated_state_dict

pytestmark = pytest.mark.dist

STAGE = {"model": "", "precision": "bf16", "weight_decay": 0.1, "lr": 3e-3, "min_lr": 3e-4,
         "warmup_steps": 0, "eval_samples": 32, "log_every": 1}
ROWS = ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias")


def _stage(root, name, shards, tokenizer="", **keys):
    """A stage on 2 ranks, asserted to finish; tokenizer "" takes init_from's."""
    recipe = write_recipe(root / f"{name}.yaml", shards, tokenizer, root / name, **{**STAGE, **keys})
    codes, out = run_ranks(2, recipe, log_dir=root / f"{name}-logs")
    assert codes == [0, 0], out[-4000:]
    return root / name, out


def test_two_stages_freeze_what_they_do_not_list_and_continue_where_the_last_ended(
        tmp_path, grown, korean_shards, base_tokenizer):
    base_len = Tokenizer.from_file(str(base_tokenizer / "tokenizer.json")).get_vocab_size(True)
    stage1, _ = _stage(tmp_path, "stage1", korean_shards, init_from=str(grown), zero_stage=2,
                       trainable=["new_input_embeddings", "new_output_embeddings"], train_steps=6, eval_every=6,
                       save_every=6)
    source, after = load_weights(grown), consolidated_state_dict(complete_checkpoints(stage1 / "checkpoints")[0])
    assert set(after) == set(source)
    for name, tensor in source.items():
        rounded = tensor.to(torch.bfloat16).float()
        if name in ROWS:
            assert torch.equal(after[name][:base_len], rounded[:base_len]), f"old rows of {name} changed"
            assert not torch.equal(after[name][base_len:], tensor[base_len:]), f"new rows of {name} did not train"
        else:
            assert torch.equal(after[name], rounded), f"{name} changed"

    stage2, log = _stage(tmp_path, "stage2", korean_shards, init_from=str(stage1), zero_stage=3, train_steps=4,
                         eval_every=4, save_every=4, eval_at_start=True)
    assert "starting from init_from" in log
    last_of_1, first_of_2 = train_records(stage1, "eval")[-1], train_records(stage2, "eval")[0]
    assert first_of_2["step"] == 0
    assert first_of_2["eval_loss"] == pytest.approx(last_of_1["eval_loss"], rel=1e-6, abs=1e-6)
    final = consolidated_state_dict(complete_checkpoints(stage2 / "checkpoints")[0])
    assert not torch.equal(final["model.layers.0.mlp.fc1.weight"], after["model.layers.0.mlp.fc1.weight"])
    marker = complete_checkpoints(stage2 / "checkpoints")[0].marker
    assert marker["init_from"]["kind"] == "run" and marker["base_vocab_size"] == base_len

    exported = tmp_path / "hf"
    proc = run_kolm("convert", stage2, "--out", exported, "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((exported / "config.json").read_text())["kolm"]["base_vocab_size"] == base_len
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(exported))
    assert len(generator.tokenizer) > base_len
    text = generator("대한민국은", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("대한민국은") and len(text) > len("대한민국은")


def test_a_resumed_stage_ignores_init_from_and_keeps_its_frozen_rows(tmp_path, grown, korean_shards, base_tokenizer,
                                                                    extended_tokenizer):
    """Killed after its first checkpoint, a stage resumes from it (init_from is then ignored, even
    when the source is gone) and ends with the losses of an uninterrupted stage."""
    import shutil

    keys = {"tokenizer": extended_tokenizer, "zero_stage": 3, "trainable": ["new_input_embeddings", "layers"],
            "train_steps": 4, "save_every": 2,
            "eval_every": 100}
    whole, _ = _stage(tmp_path, "whole", korean_shards, init_from=str(grown), **keys)
    source = tmp_path / "source"
    shutil.copytree(grown, source)
    first, _ = _stage(tmp_path, "part", korean_shards, init_from=str(source), **{**keys, "train_steps": 4})
    # Rewind the run to its step-2 checkpoint, as if it had been killed right after it.
    for ckpt in complete_checkpoints(first / "checkpoints"):
        if ckpt.step > 2:
            shutil.rmtree(ckpt.path)
    records = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    (first / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= 2))
    shutil.rmtree(source)
    _, log = _stage(tmp_path, "part", korean_shards, init_from=str(source), **keys)
    assert "ignored: the run resumes from its own checkpoint global_step2" in log
    losses = [(r["step"], r["loss"]) for r in train_records(first)]
    assert losses == [(r["step"], r["loss"]) for r in train_records(whole)]
    base_len = Tokenizer.from_file(str(base_tokenizer / "tokenizer.json")).get_vocab_size(True)
    end = consolidated_state_dict(complete_checkpoints(first / "checkpoints")[0])
    rounded = load_weights(grown)["model.embed_tokens.weight"].to(torch.bfloat16).float()
    assert torch.equal(end["model.embed_tokens.weight"][:base_len], rounded[:base_len])


def test_a_frozen_stage_resumes_on_another_number_of_ranks(tmp_path, grown, korean_shards, base_tokenizer):
    """Resumed on 1 rank after a 2-rank start (through DeepSpeed's universal checkpoint, which holds
    only what the optimizer owns), the frozen parts are still the source's."""
    import shutil

    keys = {"zero_stage": 2, "trainable": ["new_output_embeddings"], "save_every": 2, "eval_every": 100,
            "train_steps": 4, "init_from": str(grown)}
    run, _ = _stage(tmp_path, "run", korean_shards, **keys)
    for ckpt in complete_checkpoints(run / "checkpoints"):  # as if killed right after step 2's checkpoint
        if ckpt.step > 2:
            shutil.rmtree(ckpt.path)
    recipe = write_recipe(tmp_path / "more.yaml", korean_shards, "", run, **{**STAGE, **keys})
    codes, out = run_ranks(1, recipe, log_dir=tmp_path / "one-rank")
    assert codes == [0], out[-4000:]
    assert "converting it to a universal checkpoint" in out
    base_len = Tokenizer.from_file(str(base_tokenizer / "tokenizer.json")).get_vocab_size(True)
    source, end = load_weights(grown), consolidated_state_dict(complete_checkpoints(run / "checkpoints")[0])
    assert complete_checkpoints(run / "checkpoints")[0].step == 4
    for name, tensor in source.items():
        rounded = tensor.to(torch.bfloat16).float()
        if name == "lm_head.weight":
            assert torch.equal(end[name][:base_len], rounded[:base_len])
            assert not torch.equal(end[name][base_len:], tensor[base_len:])
        elif name != "lm_head.bias":
            assert torch.equal(end[name], rounded), name
