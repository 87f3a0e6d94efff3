"""A `PhiForCausalLM` made by transformers itself, standing in for a downloaded Phi: random weights,
an untied LM head with a (non-zero) bias, and embedding rows padded past its tokenizer, saved as a
Hugging Face directory with the tokenizer beside it."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
         "max_position_embeddings": 256, "partial_rotary_factor": 0.5}


def make_base_model(tokenizer_dir: Path, out: Path, spare_rows: int = 100, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Save a small random Phi for ``tokenizer_dir`` at ``out`` (rows: the tokenizer plus ``spare_rows``)."""
    from tokenizers import Tokenizer
    from transformers import PhiConfig, PhiForCausalLM

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    config = PhiConfig(vocab_size=tok.get_vocab_size(True) + spare_rows, bos_token_id=eos, eos_token_id=eos,
                       resid_pdrop=0.0, embd_pdrop=0.0, **SHAPE)
    torch.manual_seed(seed)
    model = PhiForCausalLM(config)
    with torch.no_grad():  # transformers starts biases and LayerNorms at constants: make every row distinct
        model.lm_head.bias.normal_(0.0, 0.5)
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    model.to(dtype).save_pretrained(str(out), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The saved weights by name, as stored."""
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))
