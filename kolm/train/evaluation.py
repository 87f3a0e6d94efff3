"""Evaluation during training: loss, perplexity and next-token accuracy on the validation split of
every data source, each on its own and together, with the attention the run trains with."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kolm.log import say
from kolm.model.loss import EvalTotals


def evaluate(engine, valid: dict, micro_batch: int, rank: int, world: int, limit: int | None,
             to_device: Callable, inputs: Callable) -> dict | None:
    """The eval record's figures: ``eval_loss`` etc. over every source's windows, and with several
    sources also ``eval_loss/NAME`` etc. for each (``limit`` windows per source; 0 or None: all).
    None, said, when no token was scored: such an evaluation has no loss to record.

    Every rank runs the same number of forwards (padding batches where the windows do not split
    evenly, run but not counted): under ZeRO-3 each forward is a collective."""
    per_source = {}
    engine.eval()
    with torch.no_grad():
        for name, dataset in valid.items():
            totals = EvalTotals()
            for batch, scored in dataset.eval_batches(micro_batch, rank, world, limit or None):
                x = to_device(batch)
                loss, correct = engine(input_ids=x[:, :-1], targets=x[:, 1:], accuracy=True, **inputs(x[:, :-1]))
                if scored:
                    totals.add(loss, correct, x[:, 1:].numel())
            per_source[name] = totals.all_reduce(engine.device)
    engine.train()
    overall = EvalTotals(*(sum(getattr(t, f) for t in per_source.values()) for f in ("loss_sum", "correct",
                                                                                      "tokens")))
    if overall.tokens < 1:
        say(f"evaluation skipped: it scored 0 tokens (eval_samples {limit}, {len(valid)} validation splits); "
            "nothing recorded")
        return None
    figures = overall.summary()
    if len(per_source) > 1:
        for name, totals in per_source.items():
            if totals.tokens >= 1:
                figures.update({f"{key}/{name}": value for key, value in totals.summary().items()})
    return figures


def describe(figures: dict, names: list[str]) -> str:
    text = (f"eval loss {figures['eval_loss']:.4f}, perplexity {figures['eval_perplexity']:.2f}, "
            f"accuracy {figures['eval_accuracy']:.4f}")
    if len(names) > 1:
        text += "; " + ", ".join(f"{n} {figures[f'eval_loss/{n}']:.4f}" for n in names if f"eval_loss/{n}" in figures)
    return text
