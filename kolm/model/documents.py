"""Document-aware attention for packed windows: each token attends only to earlier tokens of its
own document, and position ids restart at 0 at every document start.

A document starts at the window's first token and right after every EOS (the EOS belongs to the
document it ends, and its prediction still targets the next token in the window). Nothing is
padded: the same window, with a block-diagonal causal mask (sdpa and eager) or, for
flash-attention 2, the documents' cumulative lengths (its variable-length kernel).
"""

from __future__ import annotations

import torch

ATTENTION_MODES = ("causal", "document")


def document_positions(input_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(document index, position within the document) of every token of ``[batch, seq]`` windows."""
    batch, seq = input_ids.shape
    start = torch.zeros_like(input_ids, dtype=torch.bool)
    start[:, 0] = True
    start[:, 1:] = input_ids[:, :-1] == eos_id
    documents = start.long().cumsum(dim=-1) - 1
    index = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    first = torch.where(start, index, torch.zeros_like(index)).cummax(dim=-1).values
    return documents, index - first


def block_causal_mask(documents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[batch, 1, seq, seq]`` mask: 0 where a token may attend, the dtype's minimum where
    not (a finite minimum: eager attention adds it to the scores, and no row is ever fully masked)."""
    seq = documents.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=documents.device).tril()
    allowed = ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=documents.device).masked_fill(~allowed,
                                                                                       torch.finfo(dtype).min)


def attention_inputs(input_ids: torch.Tensor, attention: str, eos_id: int, attn_implementation: str,
                     dtype: torch.dtype) -> dict:
    """The forward pass's attention keyword arguments for a recipe's ``attention`` mode. Plain causal
    attention gets none: with no mask, sdpa calls PyTorch's kernel with ``is_causal=True``, the path to
    its flash and cuDNN kernels (an explicit mask would send it to the slower memory-efficient one)."""
    if attention != "document":
        return {}
    return document_inputs(input_ids, eos_id, attn_implementation, dtype)


def document_inputs(input_ids: torch.Tensor, eos_id: int, attn_implementation: str, dtype: torch.dtype) -> dict:
    """The keyword arguments that make a Phi forward pass document-aware for this kernel."""
    documents, positions = document_positions(input_ids, eos_id)
    if attn_implementation != "flash_attention_2":
        return {"position_ids": positions, "attention_mask": block_causal_mask(documents, dtype)}
    # flash-attention 2's variable-length kernel over the flattened batch: every row start is a
    # document start (position 0), so the cumulative lengths never cross rows.
    flat = positions.reshape(-1)
    starts = (flat == 0).nonzero().flatten()
    cumulative = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    longest = int(cumulative.diff().max())
    return {"position_ids": positions, "attention_mask": None, "cu_seq_lens_q": cumulative,
            "cu_seq_lens_k": cumulative, "max_length_q": longest, "max_length_k": longest}
