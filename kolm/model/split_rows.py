"""Embedding and LM-head modules whose rows are two parameters: the rows of the base vocabulary
(``old_rows``, ``old_bias``) and the rows a tokenizer extension added (``new_rows``,
``new_bias``). Training only the new rows is then ordinary parameter freezing: the old rows get
no gradient, no weight decay and no optimizer state, under every ZeRO stage, with no gradient
hooks (a hook under ZeRO-3 would see only a shard of the matrix).

The forward passes see the concatenated matrix, so the math is that of the unsplit module. A
state dict of a split model names the two parts; `merge_split_rows` gives back the Hugging Face
names (``model.embed_tokens.weight``, ``lm_head.weight``, ``lm_head.bias``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kolm.model.loss import linear_cross_entropy

PARTS = {"weight": ("old_rows", "new_rows"), "bias": ("old_bias", "new_bias")}


def _split(tensor: torch.Tensor, rows: int) -> tuple[nn.Parameter, nn.Parameter]:
    return nn.Parameter(tensor[:rows].clone()), nn.Parameter(tensor[rows:].clone())


class SplitEmbedding(nn.Module):
    """`nn.Embedding` over ``cat(old_rows, new_rows)``."""

    def __init__(self, weight: torch.Tensor, base_rows: int):
        super().__init__()
        self.old_rows, self.new_rows = _split(weight, base_rows)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.old_rows, self.new_rows])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class SplitLossHead(nn.Module):
    """kolm's LM head (logits, or the fused chunked loss with ``targets``) over split rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, base_rows: int):
        super().__init__()
        self.old_rows, self.new_rows = _split(weight, base_rows)
        self.old_bias, self.new_bias = _split(bias, base_rows) if bias is not None else (None, None)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.old_rows, self.new_rows])

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.old_bias is None else torch.cat([self.old_bias, self.new_bias])

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, accuracy: bool = False):
        weight, bias = self.weight, self.bias
        if targets is None:
            return F.linear(hidden, weight, bias)
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1),
                                    accuracy=accuracy)


def split_input_rows(model: nn.Module, base_rows: int) -> SplitEmbedding:
    """Replace the model's input embedding by a split one (same values)."""
    emb = model.model.embed_tokens
    if not isinstance(emb, SplitEmbedding):
        emb = model.model.embed_tokens = SplitEmbedding(emb.weight.data, base_rows)
    return emb


def split_output_rows(model: nn.Module, base_rows: int) -> SplitLossHead:
    """Replace the model's LM head by a split one (same values)."""
    head = model.lm_head
    if not isinstance(head, SplitLossHead):
        bias = head.bias.data if head.bias is not None else None
        head = model.lm_head = SplitLossHead(head.weight.data, bias, base_rows)
    return head


def merge_split_rows(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every split pair joined back under its Hugging Face name."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".old_rows") or k.endswith(".old_bias")]:
        prefix, part = key.rsplit(".", 1)
        name, (old, new) = next((n, pair) for n, pair in PARTS.items() if pair[0] == part)
        out[f"{prefix}.{name}"] = torch.cat([out.pop(f"{prefix}.{old}"), out.pop(f"{prefix}.{new}")])
    return out


def split_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of `merge_split_rows` for ``model``'s layout: Hugging Face names in, the names of
    ``model``'s (possibly split) parameters out, as views of the given tensors."""
    out = dict(state)
    for prefix, module in (("model.embed_tokens", model.model.embed_tokens), ("lm_head", model.lm_head)):
        if not isinstance(module, (SplitEmbedding, SplitLossHead)):
            continue
        rows = module.old_rows.shape[0]
        for name, (old, new) in PARTS.items():
            if getattr(module, old, None) is not None:
                full = out.pop(f"{prefix}.{name}")
                out[f"{prefix}.{old}"], out[f"{prefix}.{new}"] = full[:rows], full[rows:]
    return out
