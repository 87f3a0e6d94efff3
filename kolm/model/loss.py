"""Next-token loss: one implementation for training, evaluation during training and `kolm eval`.

``logits[:, i]`` is the prediction for ``targets[:, i]``, i.e. token i+1 of a window; every
target is a real token (packed windows carry no padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over every target (training: no accuracy, no argmax)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(summed cross-entropy, correct next-token predictions, tokens) for one evaluation batch."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    return F.cross_entropy(flat, t, reduction="sum"), (flat.argmax(dim=-1) == t).sum(), t.numel()


@dataclass
class EvalTotals:
    """Running sums of an evaluation; reduced over ranks at the end."""

    loss_sum: float = 0.0
    correct: float = 0.0
    tokens: float = 0.0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, tokens: int) -> None:
        self.loss_sum += float(loss)
        self.correct += float(correct)
        self.tokens += tokens

    def all_reduce(self, device: torch.device) -> EvalTotals:
        import torch.distributed as dist

        t = torch.tensor([self.loss_sum, self.correct, self.tokens], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(t)
        return EvalTotals(*t.tolist())

    def summary(self) -> dict:
        loss = self.loss_sum / max(self.tokens, 1)
        return {
            "eval_loss": loss,
            "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_accuracy": self.correct / max(self.tokens, 1),
            "eval_tokens": int(self.tokens),
        }
