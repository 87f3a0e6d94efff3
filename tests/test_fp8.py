"""``precision: fp8``: torchao's float8 layers in the decoder blocks only, the parameter names of plain
PhiForCausalLM, a clear refusal where the GPU cannot run it, and a checkpoint that converts to a
loadable Hugging Face model. torchao's emulation (and torch's CPU float8 matrix product) runs the
same layers on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.cli import run_kolm
from helpers.dist import write_recipe

from kolm.errors import KolmError
from kolm.model.fp8 import convert_blocks, fp8_unavailable
from kolm.model.phi import PhiForTraining
from kolm.model.presets import build_config, get_shape
from kolm.train.config import RunConfig, load_config
from kolm.train.setup import check_kernels

VOCAB, EOS = 320, 2


def _float8_linear() -> type:
    """torchao's Float8Linear (the `fp8` extra; `make install` installs it)."""
    return pytest.importorskip("torchao.float8.float8_linear").Float8Linear


def _model() -> PhiForTraining:
    torch.manual_seed(0)
    return PhiForTraining(build_config(get_shape("phi-tiny"), VOCAB, EOS, EOS, 64, "sdpa"))


@pytest.mark.unit
def test_blocks_convert_with_unchanged_names_and_the_head_stays_plain():
    from transformers import PhiForCausalLM

    float8_linear = _float8_linear()
    model = _model()
    plain_keys = list(PhiForCausalLM(model.config).state_dict())
    swapped = convert_blocks(model, emulate=True)
    assert swapped == 6 * model.config.num_hidden_layers  # q, k, v, dense, fc1, fc2 of every block
    assert list(model.state_dict()) == plain_keys
    outside = [m for name, m in model.named_modules() if not name.startswith("model.layers")]
    assert outside and not any(isinstance(m, float8_linear) for m in outside)
    assert type(model.lm_head).__name__ == "LossHead"


@pytest.mark.unit
def test_emulated_fp8_trains_close_to_bf16():
    _float8_linear()
    x = torch.randint(3, VOCAB, (2, 33), generator=torch.Generator().manual_seed(1))
    losses = {}
    for fp8 in (False, True):
        model = _model()
        if fp8:
            convert_blocks(model, emulate=True)
        model = model.to(torch.bfloat16)
        loss = model(input_ids=x[:, :-1], targets=x[:, 1:])
        loss.backward()
        grads = [p.grad for p in model.model.layers.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        losses[fp8] = loss.item()
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)


@pytest.mark.unit
def test_fp8_is_refused_without_a_hopper_gpu_naming_the_device(monkeypatch):
    cfg = RunConfig(data="d", tokenizer="t", run_dir="r", precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(KolmError, match="cannot run here: this machine has no CUDA device.*use precision=bf16"):
            check_kernels(cfg)
    # What a pre-Hopper card is told (the device queries answer as an A100 would).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert "NVIDIA A100-SXM4-80GB, has compute capability 8.0" in fp8_unavailable()
    with pytest.raises(KolmError, match="A100-SXM4-80GB"):
        check_kernels(cfg)


@pytest.mark.unit
def test_fp8_config_is_bf16_outside_the_blocks_and_not_with_zero3():
    from kolm.train import dsconfig

    cfg = load_config(None, ["data=/d", "tokenizer=/t", "run_dir=/r", "precision=fp8"])
    assert dsconfig.build(cfg, 1, 64, True)["bf16"]["enabled"] is True
    with pytest.raises(KolmError, match="precision=fp8 works with zero_stage 0, 1 or 2"):
        load_config(None, ["data=/d", "tokenizer=/t", "run_dir=/r", "precision=fp8", "zero_stage=3"])


# The device check is lifted (torch's CPU float8 matrix product runs the same layers) so that a real
# fp8 run writes a real checkpoint; everything else is `kolm train` as it is.
TRAIN_FP8 = textwrap.dedent("""
    import sys
    import kolm.model.fp8
    kolm.model.fp8.fp8_unavailable = lambda: None
    from kolm.train.config import load_config
    from kolm.train.loop import train
    sys.exit(train(load_config(sys.argv[1])))
""")


@pytest.mark.dist
def test_fp8_checkpoint_converts_to_a_loadable_hf_model(tmp_path, shards, tokenizer_dir):
    float8_linear = _float8_linear()
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir, precision="fp8", zero_stage=2,
                          train_steps=4, save_every=4, eval_every=4, global_batch=4)
    script = tmp_path / "train_fp8.py"
    script.write_text(TRAIN_FP8)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29500 + os.getpid() % 1000), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(recipe)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MFU is bf16-equivalent" in proc.stderr
    from kolm.train.metrics import read_metrics

    timed = [r for r in read_metrics(run_dir).train if "mfu" in r]
    assert timed and all(r["mfu_basis"] == "bf16-equivalent" for r in timed)
    out = tmp_path / "hf"
    assert "verified" in run_kolm("convert", run_dir, "--out", out, "--dtype", "fp32", check=True).stdout
    from transformers import AutoModelForCausalLM, PhiForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(loaded) is PhiForCausalLM and not any(isinstance(m, float8_linear) for m in loaded.modules())
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=torch.tensor([[5, 6, 7, 8]])).logits).all()
