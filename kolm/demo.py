"""`kolm demo`: the whole line on the bundled Korean corpus, reusing whatever is already done."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kolm.corpus import bundled_corpus_files


def _stage(name: str) -> None:
    print(f"\n== {name}", file=sys.stderr, flush=True)


def run_demo(out: str, corpus: list[str] | None = None, vocab_size: int = 8000) -> dict:
    """Train a tokenizer and shard the corpus under ``out``; returns where things were written."""
    from kolm.cli import format_shard_summary, format_tokenizer_report
    from kolm.shard import ShardOptions, run_shard
    from kolm.tokenizer import train_tokenizer

    root = Path(out)
    inputs = corpus or bundled_corpus_files()
    tok_dir, shard_dir = root / "tokenizer", root / "shards"
    _stage(f"tokenizer: byte-level BPE, vocabulary {vocab_size}, on {len(inputs)} files")
    if (tok_dir / "tokenizer.json").is_file():
        print(f"reusing {tok_dir} (already trained)", file=sys.stderr)
    else:
        print(format_tokenizer_report(train_tokenizer(inputs, tok_dir, vocab_size)), file=sys.stderr)
    _stage("shard: tokenize once into MMIDIDX shards")
    start = time.perf_counter()
    # The bundled corpus is small: hold out 5% so validation has text to score.
    manifest = run_shard(inputs, str(tok_dir), shard_dir, ShardOptions(valid_fraction=0.05))
    print(format_shard_summary(str(shard_dir), manifest, time.perf_counter() - start), file=sys.stderr)
    result = {"tokenizer": str(tok_dir), "shards": str(shard_dir)}
    _stage("done")
    for k, v in result.items():
        print(f"{k:>10}: {v}")
    return result
