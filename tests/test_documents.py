"""Document-aware attention: a packed window computes what each of its document pieces computes alone."""

from __future__ import annotations

import pytest
import torch

from kolm.model.documents import block_causal_mask, document_inputs, document_positions
from kolm.model.phi import PhiForTraining
from kolm.model.presets import build_config, get_shape

pytestmark = pytest.mark.unit
EOS = 2


def _model(attn: str) -> PhiForTraining:
    torch.manual_seed(0)
    config = build_config(get_shape("phi-tiny", num_hidden_layers=3), 320, EOS, EOS, 256, attn)
    return PhiForTraining(config).eval()


def _windows() -> torch.Tensor:
    """Two windows: one that starts mid-document and ends inside one, one that starts with a lone EOS."""
    g = torch.Generator().manual_seed(1)
    first = torch.randint(3, 320, (16,), generator=g)
    first[[4, 11]] = EOS  # pieces of 5, 7 and 4 tokens
    second = torch.randint(3, 320, (16,), generator=g)
    second[[0, 10]] = EOS  # pieces of 1, 10 and 5 tokens
    return torch.stack([first, second])


def _pieces(window: torch.Tensor) -> list[torch.Tensor]:
    ends = [i + 1 for i, t in enumerate(window.tolist()) if t == EOS]
    bounds = [0, *[e for e in ends if e < len(window)], len(window)]
    return [window[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def test_positions_restart_at_every_document_start():
    documents, positions = document_positions(_windows(), EOS)
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]
    assert positions[1].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    assert documents[1].tolist() == [0] + [1] * 10 + [2] * 5
    mask = block_causal_mask(documents, torch.float32)
    assert mask.shape == (2, 1, 16, 16) and mask[0, 0, 6, 3] < 0 and mask[0, 0, 6, 5] == 0 and mask[0, 0, 5, 6] < 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_window_equals_its_pieces_run_alone(attn):
    model, x = _model(attn), _windows()
    with torch.no_grad():
        packed = model(input_ids=x, use_cache=False, **document_inputs(x, EOS, attn, torch.float32)).logits
        for row in range(len(x)):
            start = 0
            for piece in _pieces(x[row]):
                alone = model(input_ids=piece[None], use_cache=False).logits[0]
                torch.testing.assert_close(packed[row, start:start + len(piece)], alone, atol=1e-5, rtol=1e-5)
                start += len(piece)
        causal = model(input_ids=x, use_cache=False).logits
    assert (causal - packed).abs().max() > 1e-2  # without the mask the documents do see each other


def test_the_training_loss_is_the_sum_of_the_pieces_losses_and_trains():
    model, window = _model("sdpa"), torch.cat([_windows()[0], torch.tensor([7])])
    x, targets = window[None, :-1], window[None, 1:]
    loss = model(input_ids=x, targets=targets, **document_inputs(x, EOS, "sdpa", torch.float32))
    logits = model(input_ids=x, use_cache=False, **document_inputs(x, EOS, "sdpa", torch.float32)).logits
    reference = torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="sum")
    torch.testing.assert_close(loss, reference, atol=1e-4, rtol=1e-5)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_flash_attention_gets_the_documents_cumulative_lengths():
    kw = document_inputs(_windows(), EOS, "flash_attention_2", torch.bfloat16)
    assert kw["attention_mask"] is None
    assert kw["cu_seq_lens_q"].tolist() == [0, 5, 12, 16, 17, 27, 32] and kw["max_length_q"] == 10
