"""Shared fixtures: real Korean text from the bundled corpus and a tokenizer trained on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kolm.data.corpus import bundled_corpus_files
from kolm.data.tokenizer import train_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def korean_corpus_files() -> list[str]:
    return bundled_corpus_files()


@pytest.fixture(scope="session")
def korean_lines() -> list[str]:
    """Non-empty lines of the bundled Korean corpus (constitution and bills), in order."""
    lines = []
    for path in bundled_corpus_files():
        with open(path, encoding="utf-8") as f:
            lines.extend(line.rstrip("\n") for line in f if line.strip())
    return lines


@pytest.fixture(scope="session")
def korean_corpus(tmp_path_factory, korean_lines) -> Path:
    """The bundled corpus as one .txt file (one document per line)."""
    path = tmp_path_factory.mktemp("corpus") / "ko.txt"
    path.write_text("\n".join(korean_lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 2,000-token byte-level BPE trained on the bundled corpus."""
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(bundled_corpus_files(), out, vocab_size=2000, progress=False)
    return out


@pytest.fixture(scope="session")
def shards(tmp_path_factory, korean_corpus, tokenizer_dir) -> Path:
    """The bundled corpus sharded with 5% held out for validation (enough to evaluate)."""
    from kolm.data.shard import ShardOptions, run_shard

    out = tmp_path_factory.mktemp("shards") / "shards"
    run_shard([str(korean_corpus)], str(tokenizer_dir), out, ShardOptions(valid_fraction=0.05), workers=1,
              progress=False)
    return out


def run_kolm(*args: str, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run the `kolm` command line in a fresh interpreter, capturing its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "kolm", *map(str, args)], capture_output=True, text=True, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kolm {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc
