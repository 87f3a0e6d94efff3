"""The recipe's `trainable` key: which parameter groups a run trains. Everything else is frozen
(requires_grad off before the engine starts), so it gets no gradient, no weight decay and no
optimizer state. The new rows of an extended vocabulary are their own parameters
(kolm.model.split_rows), so freezing the old rows needs no gradient hook under any ZeRO stage."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kolm.errors import KolmError
from kolm.model.split_rows import split_input_rows, split_output_rows

GROUPS = ("new_input_embeddings", "new_output_embeddings", "input_embeddings", "output_embeddings", "layers")
NEW_ROWS = ("new_input_embeddings", "new_output_embeddings")


@dataclass(frozen=True)
class Trainable:
    groups: tuple[str, ...] | None  # None: everything
    base_vocab: int | None = None  # ids below it are the old rows (new_* groups need it)

    @property
    def everything(self) -> bool:
        return self.groups is None

    def describe(self) -> str:
        return "all" if self.everything else ", ".join(self.groups)


def parse_groups(value: str | list) -> tuple[str, ...] | None:
    """``all``, a list of group names, or the same as a comma-separated string."""
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value)
    names = [n for n in names if n]
    if names == ["all"]:
        return None
    unknown = [n for n in names if n not in GROUPS]
    if unknown or not names:
        problem = f"unknown group(s) {', '.join(map(repr, unknown))}" if unknown else "no group given"
        raise KolmError(f"`trainable`: {problem}; write `all` or a list of {', '.join(GROUPS)}")
    return tuple(dict.fromkeys(names))


def resolve(value: str | list, base_vocab: int | None, rows: int, source: str) -> Trainable:
    """The recipe's groups, checked against the model: new rows exist only in a model whose
    source records the vocabulary it was extended from."""
    groups = parse_groups(value)
    wanted = [g for g in NEW_ROWS if groups and g in groups]
    if wanted and base_vocab is None:
        raise KolmError(f"`trainable` names {', '.join(wanted)}, but {source} records no base vocabulary "
                        "(config.json's kolm.base_vocab_size): make the model with `kolm model expand --model "
                        "HF_DIR --tokenizer EXTENDED --out DIR` and set init_from to its output")
    if wanted and not 0 < base_vocab < rows:
        raise KolmError(f"`trainable` names {', '.join(wanted)}, but {source} has no new rows (base vocabulary "
                        f"{base_vocab}, {rows} rows)")
    return Trainable(groups, base_vocab if wanted else None)


def apply(model: nn.Module, trainable: Trainable) -> None:
    """Freeze what the run does not train, splitting embedding rows where only new ones train."""
    if trainable.everything:
        return
    groups = trainable.groups
    model.requires_grad_(False)
    if "layers" in groups:
        model.model.layers.requires_grad_(True)
        model.model.final_layernorm.requires_grad_(True)
    if "input_embeddings" in groups:
        model.model.embed_tokens.requires_grad_(True)
    elif "new_input_embeddings" in groups:
        emb = split_input_rows(model, trainable.base_vocab).requires_grad_(False)
        emb.new_rows.requires_grad_(True)
    if "output_embeddings" in groups:
        model.lm_head.requires_grad_(True)
    elif "new_output_embeddings" in groups:
        head = split_output_rows(model, trainable.base_vocab).requires_grad_(False)
        for p in (head.new_rows, head.new_bias):
            if p is not None:
                p.requires_grad_(True)


def group_of(name: str) -> str:
    """The group a parameter belongs to, by its name in the training model."""
    if name.startswith("model.embed_tokens."):
        return "input embeddings"
    if name.startswith("lm_head."):
        return "output embeddings"
    return "layers"


def count(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per group: (trainable parameters, all parameters)."""
    counts: dict[str, tuple[int, int]] = {}
    for name, p in model.named_parameters():
        trained, total = counts.get(group_of(name), (0, 0))
        counts[group_of(name)] = (trained + (p.numel() if p.requires_grad else 0), total + p.numel())
    return counts


def count_table(counts: dict[str, tuple[int, int]]) -> str:
    rows = [f"  {name:<20}{trained:>14,} of {total:>14,}" for name, (trained, total) in counts.items()]
    trained, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
    return "\n".join(["trainable parameters:", *rows, f"  {'total':<20}{trained:>14,} of {total:>14,}"])
