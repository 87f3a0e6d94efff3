"""A Hugging Face `PhiForCausalLM` directory on disk (a downloaded Phi-1.5 or Phi-2, a `kolm model
expand` output, a kolm export): its shape, its rows, its tokenizer and its weights, read without
building the model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kolm.errors import KolmError
from kolm.model.presets import PhiShape

WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors")


@dataclass(frozen=True)
class PretrainedPhi:
    path: Path
    config: dict  # config.json as written

    @property
    def rows(self) -> int:
        """Embedding rows (the model's vocab_size; may exceed its tokenizer)."""
        return int(self.config["vocab_size"])

    @property
    def base_vocab_size(self) -> int | None:
        """Ids below this predate a tokenizer extension (`kolm model expand` records it); None otherwise."""
        value = (self.config.get("kolm") or {}).get("base_vocab_size")
        return int(value) if value is not None else None

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.path if (self.path / "tokenizer.json").is_file() else None

    def shape(self) -> PhiShape:
        return shape_of(self.config)

    def weight_files(self) -> list[Path]:
        files = sorted(f for pattern in WEIGHT_PATTERNS for f in self.path.glob(pattern))
        if not files:
            raise KolmError(f"{self.path}: no model.safetensors (or model-*-of-*.safetensors) weights; kolm reads "
                            "safetensors only (re-save a .bin model with save_pretrained(safe_serialization=True))")
        return files

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every weight by its Hugging Face name, as stored (or cast to ``dtype``)."""
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in self.weight_files():
            try:
                state.update(load_file(str(f)))
            except Exception as e:  # safetensors raises its own error types for a damaged file
                raise KolmError(f"{f}: cannot be read as safetensors ({e})") from e
        return {k: v.to(dtype) if dtype is not None else v for k, v in state.items()}


def shape_of(config: dict) -> PhiShape:
    """A Phi model config (config.json, or a kolm checkpoint's) as a kolm preset shape; its
    vocab_size is the row count."""
    c, rope = config, config.get("rope_parameters") or {}
    return PhiShape(
        hidden_size=int(c["hidden_size"]), num_hidden_layers=int(c["num_hidden_layers"]),
        num_attention_heads=int(c["num_attention_heads"]), intermediate_size=int(c["intermediate_size"]),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.5))),
        hidden_act=c.get("hidden_act", "gelu_new"),
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        layer_norm_eps=float(c.get("layer_norm_eps", 1e-5)),
        max_position_embeddings=int(c.get("max_position_embeddings", 2048)), vocab_size=int(c["vocab_size"]))


def read_pretrained(path: str | Path) -> PretrainedPhi:
    """A Hugging Face Phi directory, checked to be a `PhiForCausalLM` kolm can train."""
    p = Path(path)
    config_file = p / "config.json"
    if not config_file.is_file():
        raise KolmError(f"{p}: no config.json; expected a Hugging Face PhiForCausalLM directory "
                        "(save_pretrained output, a kolm export, or `kolm model expand` output)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise KolmError(f"{config_file}: not valid JSON ({e})") from e
    check_phi(config, p)
    return PretrainedPhi(p, config)


def check_phi(config: dict, where: Path) -> None:
    """Refuse what is not a plain PhiForCausalLM: another architecture, or Phi options kolm's training
    and export do not carry (grouped-query heads, q/k LayerNorm, tied embeddings)."""
    architectures = config.get("architectures") or []
    if config.get("model_type") != "phi" or (architectures and "PhiForCausalLM" not in architectures):
        found = ", ".join(architectures) or config.get("model_type") or "unknown"
        raise KolmError(f"{where}: a {found} model, not PhiForCausalLM; kolm continues pretraining of Phi models only "
                        "(Phi-1.5, Phi-2, or a kolm export)")
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    unsupported = [name for name, bad in (("num_key_value_heads != num_attention_heads", kv not in (None, heads)),
                                          ("qk_layernorm", bool(config.get("qk_layernorm"))),
                                          ("tie_word_embeddings", bool(config.get("tie_word_embeddings"))))
                   if bad]
    if unsupported:
        raise KolmError(f"{where}: this Phi uses {', '.join(unsupported)}, which kolm does not train")


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash over every tensor's name, dtype, shape and bytes, in name order: the same weights
    give the same hash whatever files or checkpoint layout they came from."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
