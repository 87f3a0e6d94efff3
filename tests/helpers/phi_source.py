"""A small stand-in for Phi's tokenizer: a GPT-2-style byte-level BPE that never saw Korean.

Like Phi-1.5/Phi-2's, it has no normalizer, a ByteLevel pre-tokenizer without a prefix space,
``<|endoftext|>`` as the last entry of the BPE vocabulary, non-special multi-space added tokens
after it, merges stored as "a b" strings, and a tokenizer_config.json naming CodeGenTokenizer
with ``<|endoftext|>`` as BOS, EOS and UNK. It is trained on English text only (the standard
library's docstrings), so it splits Korean into bytes, as Phi does.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

EOS = "<|endoftext|>"
# Phi adds 38 tokens of runs of spaces and tabs after <|endoftext|>; a few of them do here.
WHITESPACE_TOKENS = (" " * 8, " " * 4, " " * 2, "\t\t\t\t", "\t\t")
STDLIB_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email.message", "fractions",
                  "functools", "heapq", "http.client", "inspect", "itertools", "json", "logging", "pathlib",
                  "random", "shutil", "statistics", "string", "subprocess", "textwrap", "threading", "unittest",
                  "urllib.parse", "zipfile")


def english_documents() -> list[str]:
    """Deterministic English text: the docstrings of a fixed list of standard-library modules."""
    docs = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *(getattr(module, a) for a in sorted(vars(module)) if not a.startswith("_"))]:
            doc = inspect.getdoc(obj) if inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj) else None
            if doc:
                docs.append(doc)
    return docs


def make_base_tokenizer(out: Path, vocab_size: int = 1000) -> Path:
    """Write a Phi-like English byte-level BPE to ``out``: ``vocab_size`` BPE entries (the last is
    ``<|endoftext|>``) followed by the whitespace added tokens. Returns ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(english_documents(), trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    eos_id = len(vocab)
    vocab[EOS] = eos_id
    spec["model"]["merges"] = [" ".join(pair) for pair in spec["model"]["merges"]]
    spec["added_tokens"] = [_added(eos_id, EOS, special=True)] + [
        _added(eos_id + 1 + i, text, special=False) for i, text in enumerate(WHITESPACE_TOKENS)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = {"add_prefix_space": False, "bos_token": EOS, "eos_token": EOS, "unk_token": EOS,
              "clean_up_tokenization_spaces": True, "model_max_length": 2048, "tokenizer_class": "CodeGenTokenizer"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    specials = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return out


def _added(token_id: int, content: str, special: bool) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": not special, "special": special}
