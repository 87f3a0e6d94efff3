"""What kolm's training forward hands to PyTorch's scaled_dot_product_attention: no mask and
``is_causal=True`` for causal attention (the argument pattern that reaches the flash and cuDNN
kernels), a block mask for document attention; and the same logits as eager attention."""

from __future__ import annotations

import pytest
import torch

from kolm.model.documents import attention_inputs
from kolm.model.phi import PhiForTraining
from kolm.model.presets import build_config, get_shape

pytestmark = pytest.mark.unit
EOS = 2
VOCAB = 320


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[dict]:
    """Every call to the real scaled_dot_product_attention, by its mask and is_causal arguments."""
    real = torch.nn.functional.scaled_dot_product_attention
    calls: list[dict] = []

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append({"attn_mask": attn_mask, "is_causal": is_causal, "seq": query.shape[-2]})
        return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


def _model(attn: str, dtype: torch.dtype = torch.float32) -> PhiForTraining:
    torch.manual_seed(0)
    config = build_config(get_shape("phi-tiny", num_hidden_layers=2), VOCAB, EOS, EOS, 256, attn)
    return PhiForTraining(config).to(dtype)


def _windows() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(3, VOCAB, (2, 33), generator=g)
    x[0, [7, 20]] = EOS  # documents end inside the first window
    return x


def _train_forward(model: PhiForTraining, x: torch.Tensor, attention: str, dtype: torch.dtype) -> torch.Tensor:
    """The training call, as kolm.train.loop makes it: summed loss from the fused head."""
    kw = attention_inputs(x[:, :-1], attention, EOS, model.config._attn_implementation, dtype)
    return model(input_ids=x[:, :-1], targets=x[:, 1:], **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_training_calls_sdpa_with_no_mask_and_is_causal(sdpa_calls, dtype):
    model = _model("sdpa", dtype)
    _train_forward(model, _windows(), "causal", dtype).backward()
    assert len(sdpa_calls) == model.config.num_hidden_layers
    assert all(c["attn_mask"] is None and c["is_causal"] is True and c["seq"] == 32 for c in sdpa_calls)


def test_document_training_calls_sdpa_with_its_block_mask(sdpa_calls):
    model = _model("sdpa")
    _train_forward(model, _windows(), "document", torch.float32)
    assert len(sdpa_calls) == model.config.num_hidden_layers
    for call in sdpa_calls:
        mask = call["attn_mask"]
        assert mask is not None and call["is_causal"] is False and mask.shape == (2, 1, 32, 32)
        # token 10 of the first window (second document) sees token 8 (its start), not token 5 (the first)
        assert mask[0, 0, 10, 8] == 0 and mask[0, 0, 10, 5] < 0 and mask[0, 0, 5, 10] < 0


@pytest.mark.parametrize("attention", ["causal", "document"])
def test_sdpa_logits_equal_eager_in_fp32(attention):
    x = _windows()[:, :-1]
    logits = {}
    for attn in ("sdpa", "eager"):
        kw = attention_inputs(x, attention, EOS, attn, torch.float32)
        with torch.no_grad():
            logits[attn] = _model(attn)(input_ids=x, use_cache=False, **kw).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], atol=1e-5, rtol=1e-5)
