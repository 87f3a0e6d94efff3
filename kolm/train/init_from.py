"""The recipe's `init_from` key: start a run at step 0 from existing weights. The source is a
Hugging Face `PhiForCausalLM` directory (a downloaded Phi, a `kolm model expand` output, a kolm
export) or a kolm run directory (its newest complete checkpoint). The model's shape, row count
and base vocabulary come from the source; the recipe's `model` may only agree with it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kolm.data.tokenizer import TokenizerInfo
from kolm.errors import KolmError
from kolm.model.presets import PhiShape, get_shape, untie_padding
from kolm.model.pretrained import PretrainedPhi, check_phi, read_pretrained, shape_of, weights_sha256
from kolm.train import checkpoint

# Fields of the architecture a recipe's model/model_overrides must agree on (rows come from the source).
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "partial_rotary_factor", "hidden_act", "rope_theta", "layer_norm_eps", "max_position_embeddings")


@dataclass(frozen=True)
class InitSource:
    path: Path
    kind: str  # "model" (a Hugging Face directory) or "run" (a kolm checkpoint)
    config: dict  # the source's model config
    base_vocab_size: int | None
    tokenizer: Path | None  # the tokenizer the source was trained with, where known
    ckpt: checkpoint.Checkpoint | None = None

    @property
    def rows(self) -> int:
        return int(self.config["vocab_size"])

    def shape(self) -> PhiShape:
        return shape_of(self.config)

    def label(self) -> str:
        where = f"{self.ckpt.path} (step {self.ckpt.step})" if self.ckpt else str(self.path)
        return f"init_from {where}"

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The source's weights in fp32 by their Hugging Face names (full precision: fp32 master
        weights of a bf16 run come from these, not from a bf16-rounded copy)."""
        if self.ckpt is not None:
            return checkpoint.consolidated_state_dict(self.ckpt)
        return PretrainedPhi(self.path, self.config).state_dict(torch.float32)

    def record(self, state: dict[str, torch.Tensor]) -> dict:
        """What the run's checkpoints keep about where it started."""
        return {"path": str(self.path.resolve()), "kind": self.kind, "step": self.ckpt.step if self.ckpt else None,
                "weights_sha256": weights_sha256(state), "base_vocab_size": self.base_vocab_size}


def resolve_source(path: str) -> InitSource:
    """The source named by `init_from`: a model directory, or a run/checkpoint directory."""
    p = Path(path)
    if not p.exists():
        raise KolmError(f"init_from {p}: no such directory (a Hugging Face PhiForCausalLM directory or a kolm run "
                        "directory)")
    if (p / "config.json").is_file():
        model = read_pretrained(p)
        return InitSource(p, "model", model.config, model.base_vocab_size, model.tokenizer_dir)
    ckpt = checkpoint.resolve_checkpoint(p)
    return _run_source(p, ckpt)


def _run_source(p: Path, ckpt: checkpoint.Checkpoint) -> InitSource:
    config, _ = untie_padding(ckpt.marker.get("model_config") or {})
    if not config:
        raise KolmError(f"init_from {ckpt.path}: the checkpoint records no model config (not written by kolm train)")
    check_phi(config, ckpt.path)
    tokenizer = ckpt.marker.get("tokenizer")
    return InitSource(p, "run", config, ckpt.marker.get("base_vocab_size"), Path(tokenizer) if tokenizer else None,
                      ckpt)


def resumed_source(ckpt: checkpoint.Checkpoint) -> InitSource:
    """A run that resumes takes its model from its own checkpoint: `init_from` is then ignored."""
    return _run_source(ckpt.path, ckpt)


def check_recipe_shape(source: InitSource, model: str, overrides: dict) -> None:
    """`model` and `model_overrides` may be omitted with `init_from`; given, they must agree."""
    if not model and not overrides:
        return
    mine = asdict(get_shape(model, **overrides)) if model else {**asdict(source.shape()), **overrides}
    theirs = asdict(source.shape())
    diffs = [f"{name} ({theirs[name]!r} vs {mine[name]!r})" for name in SHAPE_FIELDS if mine[name] != theirs[name]]
    if diffs:
        given = f"model {model}" if model else "model_overrides"
        raise KolmError(f"{source.label()} differs from the recipe's {given} in {', '.join(diffs)} (source vs "
                        "recipe): drop `model` and `model_overrides` (the shape comes from init_from) or make them "
                        "agree")


def check_tokenizer(source: InitSource, tok: TokenizerInfo) -> None:
    """The run's tokenizer must fit the source's rows and be the one the source was made for."""
    if tok.vocab_size > source.rows:
        raise KolmError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but {source.label()} has "
                        f"{source.rows} embedding rows: run `kolm model expand --model {source.path} --tokenizer "
                        f"{tok.path} --out DIR` and set init_from to DIR")
    theirs = source.tokenizer / "tokenizer.json" if source.tokenizer else None
    if theirs is None or not theirs.is_file():
        return
    from kolm.files import sha256_file

    if sha256_file(theirs) != tok.sha256:
        raise KolmError(f"the recipe's tokenizer {tok.path} (and its shards) is not the tokenizer of "
                        f"{source.label()} ({source.tokenizer}): ids would not match the model's rows. Shard with "
                        f"`kolm shard --tokenizer {source.tokenizer}`, or, if {tok.path} extends it, run `kolm model "
                        f"expand --model {source.path} --tokenizer {tok.path} --out DIR` and set init_from to DIR")
