"""The EOS embedding is an ordinary, trainable row: no padding index in the model config, sane
gradient norms for a batch whose window starts with EOS (a zero row there made every LayerNorm
at position 0 divide by sqrt(eps) and the gradient norm reach 1e8-1e17), and exported models that
still pad batched prompts for `transformers.pipeline`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers.cli import run_kolm
from helpers.dist import run_ranks, train_records, write_recipe

from kolm.data.packed import PackedDataset
from kolm.data.tokenizer import load_tokenizer_info
from kolm.model.presets import PRESETS, phi_config_dict
from kolm.train.config import load_config
from kolm.train.health import GradNormWatch

# Ten layers: deep enough that a zero residual stream at position 0 blows the gradient up by
# orders of magnitude (about 1e8 for this width with the old frozen EOS row).
DEEP = {"model": "phi-tiny", "model_overrides": {"num_hidden_layers": 10}, "seq_len": 64, "global_batch": 4,
        "micro_batch": 1, "train_steps": 3, "warmup_steps": 1, "save_every": 2, "eval_every": 100,
        "log_every": 1}


def _seed_with_eos_window(shards, eos: int, seq_len: int, batch: int) -> int:
    """A data seed whose first global batch holds a window that starts with EOS."""
    dataset = PackedDataset(shards, "train", seq_len)
    starts = np.array([dataset.window(i)[0] for i in range(dataset.num_samples)])
    for seed in range(10_000):
        first = np.random.Generator(np.random.PCG64([seed, 0])).permutation(dataset.num_samples)[:batch]
        if (starts[first] == eos).any():
            return seed
    raise AssertionError("no seed puts an EOS-initial window into the first batch")


@pytest.fixture(scope="module")
def eos_seed(shards, tokenizer_dir) -> int:
    return _seed_with_eos_window(shards, load_tokenizer_info(tokenizer_dir).eos_id, DEEP["seq_len"],
                                 DEEP["global_batch"])


def _plain_autograd_norm(recipe, dtype: torch.dtype) -> float:
    """The step-1 gradient norm of the same initial weights on the same samples, without DeepSpeed."""
    from transformers import PhiForCausalLM

    from kolm.model.loss import token_stats
    from kolm.train.setup import prepare

    cfg = load_config(recipe)
    plan = prepare(cfg)
    torch.manual_seed(cfg.seed)
    model = PhiForCausalLM(plan.model_config).to(dtype)
    x = torch.from_numpy(plan.train.samples(0, cfg.global_batch))
    loss_sum, _, n = token_stats(model(input_ids=x[:, :-1]).logits, x[:, 1:])
    (loss_sum / n).backward()
    return float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters())))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards, tokenizer_dir, eos_seed):
    """Three steps of a 10-layer Phi on 2 ranks for each ZeRO stage and precision."""
    done = {}

    def run(stage: int, precision: str):
        if (stage, precision) not in done:
            root = tmp_path_factory.mktemp(f"eos-zero{stage}-{precision}")
            recipe = write_recipe(root / "recipe.yaml", shards, tokenizer_dir, root / "run", **DEEP, seed=eos_seed,
                                  zero_stage=stage, precision=precision)
            codes, out = run_ranks(2, recipe, log_dir=root / "logs")
            assert codes == [0, 0], out[-3000:]
            done[stage, precision] = recipe, root / "run", out
        return done[stage, precision]

    return run


@pytest.mark.dist
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_window_starting_with_eos_gives_a_sane_gradient_norm(runs, stage, precision):
    recipe, run_dir, out = runs(stage, precision)
    logged = train_records(run_dir)[0]["grad_norm"]
    plain = _plain_autograd_norm(recipe, torch.bfloat16 if precision == "bf16" else torch.float32)
    assert logged < 100, f"step-1 gradient norm {logged:.3g} (plain autograd: {plain:.3g})"
    assert logged == pytest.approx(plain, rel=0.02)
    assert "gradient norm" not in out  # no spike warning


@pytest.mark.dist
def test_the_eos_row_trains_and_the_export_pads_batched_prompts(runs, tmp_path, tokenizer_dir):
    recipe, run_dir, _ = runs(2, "fp32")
    out = tmp_path / "model"
    run_kolm("convert", run_dir, "--out", out, "--dtype", "fp32", check=True)
    config = json.loads((out / "config.json").read_text())
    assert config.get("pad_token_id") is None
    eos = load_tokenizer_info(tokenizer_dir).eos_id
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == eos

    from safetensors.torch import load_file
    from transformers import PhiForCausalLM, pipeline

    from kolm.train.setup import prepare

    cfg = load_config(recipe)
    torch.manual_seed(cfg.seed)
    initial = PhiForCausalLM(prepare(cfg).model_config).model.embed_tokens.weight[eos].detach()
    trained = load_file(out / "model.safetensors")["model.embed_tokens.weight"][eos]
    assert initial.abs().sum() > 0 and not torch.equal(trained, initial)

    pipe = pipeline("text-generation", model=str(out), device=-1)
    prompts = ["대한민국은 민주공화국이다", "국회"]
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    alone = [pipe(p, **settings)[0]["generated_text"] for p in prompts]
    batched = [o[0]["generated_text"] for o in pipe(prompts, batch_size=2, **settings)]
    assert batched == alone and all(a.startswith(p) and len(a) > len(p) for a, p in zip(alone, prompts))


@pytest.mark.dist
def test_a_checkpoint_with_eos_padding_resumes_and_converts_untied(runs, tmp_path):
    recipe, run_dir, _ = runs(2, "fp32")
    old = tmp_path / "run"
    shutil.copytree(run_dir, old)
    shutil.rmtree(old / "checkpoints" / "global_step3")
    (old / "checkpoints" / "latest").write_text("global_step2")
    marker_path = old / "checkpoints" / "global_step2" / "kolm_complete.json"
    marker = json.loads(marker_path.read_text())
    marker["model_config"]["pad_token_id"] = marker["model_config"]["eos_token_id"]  # as runs before the fix
    marker_path.write_text(json.dumps(marker))

    converted = run_kolm("convert", old, "--out", tmp_path / "model", "--dtype", "fp32", check=True)
    assert "trained with pad_token_id = EOS" in converted.stderr
    assert json.loads((tmp_path / "model" / "config.json").read_text()).get("pad_token_id") is None

    codes, out = run_ranks(2, recipe, f"run_dir={old}", log_dir=tmp_path / "logs")
    assert codes == [0, 0], out[-3000:]
    assert "global_step2 was written with pad_token_id = EOS" in out and "resuming from global_step2" in out
    resumed = json.loads((old / "checkpoints" / "global_step3" / "kolm_complete.json").read_text())
    assert resumed["model_config"]["pad_token_id"] is None


@pytest.mark.unit
def test_no_preset_ties_padding_to_a_token():
    for shape in PRESETS.values():
        assert phi_config_dict(shape, 51200, 0, 0, 2048)["pad_token_id"] is None


@pytest.mark.unit
def test_gradient_norm_spikes_are_named_and_counted():
    watch = GradNormWatch(factor=1e4)
    # Before any history the clipping threshold is the reference: the first steps of the old bug.
    assert "step 1: gradient norm 2.4e+16" in watch.observe(1, 2.4e16, clip=1.0)
    assert watch.observe(2, 3.0, clip=1.0) is None
    for step in range(3, 20):
        assert watch.observe(step, 2.0 + step / 100, clip=1.0) is None
    assert watch.observe(20, 5e3, clip=1.0) is None  # large, but not absurd against a median of ~2
    assert "step 21" in watch.observe(21, 1e5, clip=1.0)
    assert watch.spikes == 2 and 1e5 not in watch.history and 2.4e16 not in watch.history
    assert watch.observe(22, float("nan"), clip=1.0) is None and watch.observe(23, None, clip=1.0) is None
    assert GradNormWatch(factor=0).observe(1, 1e30, clip=1.0) is None
