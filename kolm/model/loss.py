"""Next-token loss: one implementation for training, evaluation during training and `kolm eval`.

``logits[:, i]`` is the prediction for ``targets[:, i]``, i.e. token i+1 of a window; every
target is a real token (packed windows carry no padding).

Training computes the loss fused with the LM head (`linear_cross_entropy`): the hidden states
times the output matrix, the cross-entropy and its gradient, a chunk of tokens at a time, so
neither the ``[tokens, vocab]`` logits nor their fp32 copy ever exist beyond one chunk. The
gradients are formed during the forward pass (the loss is the last operation) and scaled by the
incoming gradient in the backward pass: the same three matrix products as the plain path. On
CUDA, Liger's fused kernel (which handles the LM head's bias) is used when it is installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kolm.errors import KolmError
from kolm.model.flops import CHUNK_ELEMENTS


def chunk_tokens(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, accuracy: bool = False):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets`` ([tokens, hidden],
    [vocab, hidden], [vocab], [tokens]); with ``accuracy`` (evaluation, no gradient) also the
    number of correct argmax predictions."""
    if accuracy or not torch.is_grad_enabled():
        with torch.no_grad():
            return _chunked_eval(hidden, weight, bias, targets, accuracy)
    fused = _liger() if hidden.is_cuda else None
    if fused is not None:
        return fused(hidden, weight, targets, bias, reduction="sum")
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_tokens(weight.shape[0]))


def _liger():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def _chunked_eval(hidden, weight, bias, targets, accuracy: bool):
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
    step = chunk_tokens(weight.shape[0])
    for start in range(0, hidden.shape[0], step):
        logits = F.linear(hidden[start:start + step], weight, bias).float()
        t = targets[start:start + step]
        total += F.cross_entropy(logits, t, reduction="sum")
        if accuracy:
            correct += (logits.argmax(dim=-1) == t).sum()
    return (total, correct) if accuracy else total


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        wants = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if wants[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None and wants[2] \
            else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = torch.arange(chunk, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(h, weight, bias).float()
            lse = logits.logsumexp(dim=-1, keepdim=True)
            total += (lse.squeeze(1) - logits.gather(1, t[:, None]).squeeze(1)).sum()
            # d(summed cross-entropy)/d(logits) = softmax - one-hot, formed in the logits' buffer.
            grad = logits.sub_(lse).exp_()
            grad[rows[:len(t)], t] -= 1.0
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[start:start + chunk])
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).float()
            if grad_bias is not None:
                grad_bias += grad.float().sum(dim=0)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight, grad_bias)))
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads = [(g.float() * grad_out).to(dtype) if present else None
                 for g, dtype, present in zip(ctx.saved_tensors, ctx.dtypes, ctx.present)]
        return (*grads, None, None)


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
        """Loss, perplexity and accuracy; an evaluation over no token has none (not loss 0)."""
        if self.tokens < 1:
            raise KolmError("the evaluation scored 0 tokens, so it has no loss, perplexity or accuracy; "
                            "evaluate at least one window")
        loss = self.loss_sum / self.tokens
        return {
            "eval_loss": loss,
            "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_accuracy": self.correct / self.tokens,
            "eval_tokens": int(self.tokens),
        }
