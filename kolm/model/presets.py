"""Phi model presets, shipped with kolm so nothing is fetched from a hub.

Every field of the Hugging Face `PhiConfig` is written explicitly from here; the vocabulary
size, BOS/EOS ids and maximum positions come from the tokenizer and the run config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from kolm.errors import KolmError


@dataclass(frozen=True)
class PhiShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    partial_rotary_factor: float = 0.5
    hidden_act: str = "gelu_new"
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    vocab_size: int = 51200

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PRESETS: dict[str, PhiShape] = {
    # The published Phi-1.5 shape: 1.4B parameters with its 51,200-entry vocabulary.
    "phi-1.5": PhiShape(2048, 24, 32, 8192, partial_rotary_factor=0.5),
    # The published Phi-2 shape: 2.8B parameters.
    "phi-2": PhiShape(2560, 32, 32, 10240, partial_rotary_factor=0.4),
    # Smaller shapes of the same architecture for CPU work, benchmarks and tests.
    "phi-160m": PhiShape(768, 12, 12, 3072),
    "phi-40m": PhiShape(512, 10, 8, 2048),
    "phi-10m": PhiShape(256, 6, 4, 1024),
    "phi-tiny": PhiShape(64, 2, 4, 256),
}


# What each shape field may be, for `model_overrides`: (type, the check, the rule as the error says it).
SHAPE_RULES: dict[str, tuple[type, object, str]] = {
    "hidden_size": (int, lambda v: v >= 1, "a positive integer"),
    "num_hidden_layers": (int, lambda v: v >= 1, "a positive integer"),
    "num_attention_heads": (int, lambda v: v >= 1, "a positive integer"),
    "intermediate_size": (int, lambda v: v >= 1, "a positive integer"),
    "partial_rotary_factor": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "hidden_act": (str, lambda v: bool(v), "an activation name such as gelu_new"),
    "rope_theta": (float, lambda v: 0 < v < math.inf, "a positive number"),
    "layer_norm_eps": (float, lambda v: 0 < v < math.inf, "a positive number"),
    "max_position_embeddings": (int, lambda v: v >= 1, "a positive integer"),
    "vocab_size": (int, lambda v: v >= 1, "a positive integer"),
}


def check_overrides(overrides: dict) -> dict:
    """`model_overrides` with every field known and of the right type and range; returns them typed."""
    unknown = set(overrides) - set(SHAPE_RULES)
    if unknown:
        raise KolmError(f"unknown model field(s) {', '.join(sorted(map(str, unknown)))} in model_overrides; "
                        f"allowed: {', '.join(sorted(SHAPE_RULES))}")
    return {name: _typed(name, value) for name, value in overrides.items()}


def _typed(name: str, value):
    kind, holds, rule = SHAPE_RULES[name]
    typed = _as(kind, value)
    if typed is None or not holds(typed):
        raise KolmError(f"`model_overrides.{name}` must be {rule}, got {value!r}")
    return typed


def _as(kind: type, value):
    """``value`` as ``kind`` when it is one (numbers may come as text: YAML reads 1e-5 as a string), else None."""
    if isinstance(value, bool):
        return None
    if kind is str:
        return value if isinstance(value, str) else None
    try:
        number = float(value) if isinstance(value, (str, int, float)) else math.nan
    except ValueError:
        return None
    if kind is int:
        return int(number) if number.is_integer() else None
    return number if math.isfinite(number) else None


def check_shape(shape: PhiShape, name: str) -> None:
    """The fields of a shape must fit together (the model would not build, or would be silently wrong)."""
    if shape.hidden_size % shape.num_attention_heads:
        raise KolmError(f"{name}: hidden_size {shape.hidden_size} is not divisible by num_attention_heads "
                        f"{shape.num_attention_heads}; change either in model_overrides")
    rotary = int(shape.head_dim * shape.partial_rotary_factor)
    if rotary < 2 or rotary % 2:
        raise KolmError(f"{name}: partial_rotary_factor {shape.partial_rotary_factor} of the head dimension "
                        f"{shape.head_dim} (hidden_size / num_attention_heads) gives {rotary} rotary dimensions; "
                        "rotary embeddings need an even number, at least 2: change partial_rotary_factor")
    if shape.hidden_act != PRESETS["phi-1.5"].hidden_act:
        from transformers.activations import ACT2FN

        if shape.hidden_act not in ACT2FN:
            raise KolmError(f"{name}: hidden_act {shape.hidden_act!r} is not an activation transformers knows; "
                            f"use one of {', '.join(sorted(ACT2FN))}")


def get_shape(name: str, **overrides) -> PhiShape:
    """A preset by name, with optional field overrides (``hidden_size=...`` etc.), checked."""
    if name not in PRESETS:
        raise KolmError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    shape = replace(PRESETS[name], **check_overrides(overrides))
    check_shape(shape, f"model {name}" + (" with model_overrides" if overrides else ""))
    return shape


def padded_vocab(tokenizer_vocab: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer: rounded up to a multiple for efficient matmuls
    (Phi-1.5 itself pairs a 50,295-token tokenizer with 51,200 rows)."""
    return -(-tokenizer_vocab // multiple) * multiple


def phi_config_dict(shape: PhiShape, vocab_size: int, bos_id: int, eos_id: int, max_positions: int) -> dict:
    """Every `PhiConfig` field, explicitly, for `PhiConfig(**d)` and for `config.json`."""
    if max_positions > shape.max_position_embeddings and max_positions > 0:
        shape = replace(shape, max_position_embeddings=max_positions)
    return {
        "model_type": "phi",
        "architectures": ["PhiForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_attention_heads,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attention_dropout": 0.0,
        "hidden_act": shape.hidden_act,
        "max_position_embeddings": shape.max_position_embeddings,
        "initializer_range": 0.02,
        "layer_norm_eps": shape.layer_norm_eps,
        "use_cache": True,
        "tie_word_embeddings": False,
        "rope_theta": shape.rope_theta,
        "partial_rotary_factor": shape.partial_rotary_factor,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": shape.rope_theta,
            "partial_rotary_factor": shape.partial_rotary_factor,
        },
        "qk_layernorm": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        # No padding index: packed windows hold no padding, and `nn.Embedding(padding_idx=...)`
        # would keep that row at zero with no gradient. kolm's tokenizer pads with EOS, so a
        # padding index would freeze the EOS embedding. Padding for generation lives in
        # generation_config.json and the tokenizer files.
        "pad_token_id": None,
    }


def untie_padding(config_dict: dict) -> tuple[dict, bool]:
    """A model config from before padding was untied from EOS, with ``pad_token_id`` cleared.

    Returns (config, whether it changed). Checkpoints written that way resume and convert with
    the EOS embedding trainable from then on."""
    pad = config_dict.get("pad_token_id")
    if pad is None:
        return config_dict, False
    return {**config_dict, "pad_token_id": None}, True


def build_config(shape: PhiShape, vocab_size: int, bos_id: int, eos_id: int, max_positions: int,
                 attn_implementation: str = "sdpa"):
    """A `PhiConfig` for training; the attention kernel is a runtime choice, not part of the model."""
    from transformers import PhiConfig

    config = PhiConfig(**phi_config_dict(shape, vocab_size, bos_id, eos_id, max_positions))
    config._attn_implementation = attn_implementation
    return config
