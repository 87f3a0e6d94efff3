"""bench/fused_projection.py: q, k, v and fc1 from one matrix product give the same logits and the
same gradient for every parameter as transformers' own Phi block, and keep Hugging Face's names."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from kolm.model.documents import document_inputs
from kolm.model.phi import PhiForTraining
from kolm.model.presets import build_config, get_shape

pytestmark = pytest.mark.unit
BENCH = Path(__file__).resolve().parent.parent / "bench"
VOCAB, SEQ, BATCH = 96, 24, 3
VARIANTS = {
    "phi": {},
    # Not kolm's presets, but Phi configurations the block supports: grouped keys and values, q/k norms.
    "gqa-qk-norm": {"num_key_value_heads": 2, "qk_layernorm": True, "partial_rotary_factor": 0.4},
}


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import fused_projection

    return fused_projection


def _config(attn: str, variant: str = "phi", **overrides):
    config = build_config(get_shape("phi-tiny", num_hidden_layers=3), VOCAB, 0, 0, SEQ, attn)
    for key, value in {**VARIANTS[variant], **overrides}.items():
        setattr(config, key, value)
    if "partial_rotary_factor" in VARIANTS[variant]:
        config.rope_parameters["partial_rotary_factor"] = config.partial_rotary_factor
    return config


def _pair(fused, config, seed: int = 0):
    """A model and a fused copy with the same weights; random (not zero) biases, so a mixed-up split shows."""
    torch.manual_seed(seed)
    plain = PhiForTraining(config).float()
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    other = copy.deepcopy(plain)
    assert fused.fuse_projections(other) == config.num_hidden_layers
    return plain, other


def _inputs(kind: str, attn: str) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ))
    if kind == "documents":  # kolm's `attention: document` (EOS id 0 ends documents)
        ids[:, [5, 13]] = 0
        return {"input_ids": ids, **document_inputs(ids, 0, attn, torch.float32)}
    if kind == "padding":  # Hugging Face's 2-D mask, left padding of different lengths
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[1, :4], mask[2, :9] = 0, 0
        return {"input_ids": ids, "attention_mask": mask}
    return {"input_ids": ids}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", ["causal", "documents", "padding"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fused_logits_equal_the_plain_models(fused, attn, kind, variant):
    plain, other = _pair(fused, _config(attn, variant))
    inputs = _inputs(kind, attn)
    with torch.no_grad():
        want, got = plain(**inputs).logits, other(**inputs).logits
    assert want.abs().max() > 0.1  # logits worth comparing
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("kind", ["causal", "documents"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fused_gradients_equal_the_plain_models_in_training_with_dropout(fused, attn, kind, checkpointing):
    config = _config(attn, "phi", resid_pdrop=0.1, attention_dropout=0.1 if attn == "eager" else 0.0)
    plain, other = _pair(fused, config)
    inputs = _inputs(kind, attn)
    targets = torch.randint(0, VOCAB, (BATCH, SEQ))
    losses, norms = [], []
    for model in (plain, other):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        calls = []  # block inputs normalised: once per block, twice when checkpointing recomputes it
        model.model.layers[0].input_layernorm.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(7)  # the same dropout masks, drawn in the same order
        loss = model(**inputs, targets=targets) / targets.numel()  # kolm's training call (the fused loss)
        loss.backward()
        losses.append(loss.detach())
        norms.append(len(calls))
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)
    assert norms == [2, 2] if checkpointing else norms == [1, 1]
    grads = dict(plain.named_parameters())
    for name, p in other.named_parameters():
        assert p.grad is not None and grads[name].grad is not None, name
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=1e-5, msg=name)
    assert grads["model.layers.0.mlp.fc1.weight"].grad.abs().max() > 0  # a gradient worth comparing


def test_dropout_is_active_in_training_and_off_in_eval(fused):
    _, model = _pair(fused, _config("eager", resid_pdrop=0.5))
    ids = _inputs("causal", "eager")["input_ids"]
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_fusing_keeps_hugging_faces_names_shapes_and_parameters(fused):
    plain, other = _pair(fused, _config("sdpa"))
    before = {n: p for n, p in other.named_parameters()}
    fused.fuse_projections(other)  # a second call rebinds the same forward
    assert {n: p.shape for n, p in other.state_dict().items()} == {n: p.shape for n, p in plain.state_dict().items()}
    assert all(before[n] is p for n, p in other.named_parameters())  # no new or replaced parameter
    assert all(fused.is_fused(layer) for layer in other.model.layers)
    assert not any(fused.is_fused(layer) for layer in plain.model.layers)


def test_compiling_after_fusing_wraps_the_fused_forward(fused):
    """kolm.train.engine.compile_blocks compiles each block's instance forward: after fusing, that is the
    fused one, the same kind of bound method it wraps before (a built engine's module is the model)."""
    from kolm.train.engine import compile_blocks

    plain, other = _pair(fused, _config("sdpa"))
    compile_blocks(other)
    compile_blocks(plain)
    for a, b in zip(plain.model.layers, other.model.layers):
        assert a.forward._torchdynamo_orig_callable.__self__ is a
        assert b.forward._torchdynamo_orig_callable.__self__ is b
        assert b.forward._torchdynamo_orig_callable.__func__ is fused.fused_forward


def test_profile_labels_see_the_fused_blocks_rotary(fused, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import step_profile

    _, model = _pair(fused, _config("sdpa"))
    with step_profile.labelled_regions(), torch.profiler.profile() as prof, torch.no_grad():
        model(_inputs("causal", "sdpa")["input_ids"])
    assert sum(e.name == "kolm::rotary" for e in prof.events()) == 3  # one per block


class _Subclassed(nn.Linear):
    pass


def _break_last_fc1(model):
    fc1 = model.model.layers[-1].mlp.fc1
    swapped = _Subclassed(fc1.in_features, fc1.out_features)
    swapped.weight, swapped.bias = fc1.weight, fc1.bias
    model.model.layers[-1].mlp.fc1 = swapped


def _compile_first(model):
    from kolm.train.engine import compile_blocks

    compile_blocks(model)


def _as_zero3(model):
    # DeepSpeed ZeRO-3 gives every partitioned parameter a `ds_id` (deepspeed.runtime.zero.partition_parameters).
    model.model.layers[-1].self_attn.k_proj.weight.ds_id = 0


@pytest.mark.parametrize("breaks, message", [
    (lambda m: setattr(m.model.layers[-1].mlp, "fc1", _Subclassed(64, 256)), "fc1 is a _Subclassed"),
    (_break_last_fc1, "fp8 blocks cannot be fused"),
    (lambda m: setattr(m.model.layers[-1].self_attn.v_proj, "bias", None), "v_proj is a Linear without bias"),
    (_compile_first, "fuse the projections first, then compile"),
    (_as_zero3, "ZeRO-3"),
])
def test_fusing_refuses_what_it_cannot_compute_exactly_and_changes_nothing(fused, breaks, message):
    torch.manual_seed(0)
    model = PhiForTraining(_config("sdpa"))
    breaks(model)
    with pytest.raises(ValueError, match=message):
        fused.fuse_projections(model)
    assert not any(fused.is_fused(layer) for layer in model.model.layers)  # checked before any change


def test_fusing_refuses_other_models_and_blocks(fused):
    with pytest.raises(ValueError, match="needs a transformers PhiForCausalLM, got Linear"):
        fused.fuse_projections(nn.Linear(4, 4))
    from transformers.models.phi.modeling_phi import PhiDecoderLayer

    class Block(PhiDecoderLayer):
        pass

    torch.manual_seed(0)
    config = _config("sdpa")
    model = PhiForTraining(config)
    model.model.layers[1] = Block(config, 1)
    with pytest.raises(ValueError, match="decoder block 1: expected transformers' PhiDecoderLayer, got Block"):
        fused.fuse_projections(model)


def test_the_bench_summary_sets_the_fused_row_against_its_four_gemm_twin_only(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_bench

    def point(stage, tps, cpu, loss, fused=False, compiled=True):
        return gpu_bench.Point("phi-1.5", 2048, "sdpa", compiled, 8, tps, 0.4, 40.0, "", stage, "bf16", cpu, loss,
                               fused)

    points = [point(2, 44000.0, 100.0, 7.5), point(0, 46200.0, 105.0, 7.51), point(2, 48400.0, 110.0, 7.52, True),
              point(2, 30000.0, 70.0, 7.49, compiled=False)]
    assert gpu_bench.fused_ratios(points) == [
        "- one GEMM for q, k, v, fc1 against four (phi-1.5 seq 2048 micro batch 8, ZeRO-2, compiled): "
        f"{'tokens/s' if torch.cuda.is_available() else 'tokens per CPU-second'} 1.100x (a fused layout needs "
        ">= 1.03x); loss after the same steps 7.5200 against 7.5000"]
    ratios = gpu_bench.stage_ratios(points)
    assert len(ratios) == 1 and "ZeRO-0 1.050" in ratios[0] and "repeats" not in ratios[0]  # the fused row is no repeat
