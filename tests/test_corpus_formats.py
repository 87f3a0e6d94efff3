"""A Hugging Face `datasets` directory written by `save_to_disk` is a corpus input too."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.cli import run_kolm
from transformers import AutoTokenizer

from kolm.data.indexed import open_tokens, read_index
from kolm.data.manifest import load_shard_dir

pytestmark = pytest.mark.cli


def _documents(shard_dir, tokenizer_dir) -> list[str]:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    sd = load_shard_dir(shard_dir)
    docs = []
    for entry in sd.manifest["shards"]:
        index = read_index(sd.shard_path(entry, ".idx"))
        tokens = open_tokens(sd.shard_path(entry, ".bin"), sd.dtype)
        for start, size in zip(index.pointers // sd.dtype.itemsize, index.sizes, strict=True):
            docs.append(tok.decode(np.asarray(tokens[start : start + size - 1])))
    return docs


def test_saved_datasets_directory_is_read(tmp_path, korean_lines, tokenizer_dir):
    from datasets import Dataset

    lines = korean_lines[:300]
    saved = tmp_path / "saved"
    Dataset.from_dict({"id": list(range(len(lines))), "body": lines}).save_to_disk(str(saved))
    out = tmp_path / "shards"
    run_kolm("shard", "--input", saved, "--tokenizer", tokenizer_dir, "--out", out, "--text-field", "body",
             "--workers", 1, "--no-progress", check=True)
    assert sorted(_documents(out, tokenizer_dir)) == sorted(line.strip() for line in lines)
    wrong = run_kolm("shard", "--input", saved, "--tokenizer", tokenizer_dir, "--out", tmp_path / "x",
                     "--workers", 1, "--no-progress")
    assert wrong.returncode == 2 and "no column 'text'" in wrong.stderr and "--text-field" in wrong.stderr
