"""Run `kolm shard` in a child process, write corpora in every input format, and read shards back.

Shared by test_shard.py and test_shard_bad_input.py.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import unicodedata
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np

from kolm.data.indexed import open_tokens, read_index
from kolm.data.manifest import load_shard_dir

from .cli import run_kolm

# --------------------------------------------------------------------------- running kolm


def clean_env(**extra: str) -> dict:
    """The environment for a `kolm` child: no Slurm array variables unless a test sets them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY_")}
    return {**env, **extra}


def kolm(*args, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_kolm(*args, check=check, env=env or clean_env())


def shard_args(inputs, tokenizer, out, *options) -> list[str]:
    inputs = [inputs] if isinstance(inputs, (str, Path)) else inputs
    return ["shard", "--input", *inputs, "--tokenizer", tokenizer, "--out", out, "--no-progress", *options]


def shard(inputs, tokenizer, out, *options, check: bool = True, env: dict | None = None):
    """`kolm shard` in a subprocess; by default it must succeed."""
    return kolm(*shard_args(inputs, tokenizer, out, *options), check=check, env=env)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A user-facing error: exit status 2, `kolm: error:` and every needle in the message."""
    assert proc.returncode == 2, f"expected exit 2, got {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "kolm: error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in:\n{proc.stderr}"


# --------------------------------------------------------------------------- writing corpora


def write_lines(path: Path, lines: list[str]) -> Path:
    """Lines joined by `\\n` as UTF-8, gzip-compressed when the name ends in .gz."""
    data = "".join(f"{line}\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(records)])


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=100)
    return path


def variants(lines: list[str], copies: int, tag: str) -> list[str]:
    """``copies`` distinct variations of every line (distinct texts hash to different splits)."""
    return [f"{line} ({tag}{c}-{i})" for c in range(copies) for i, line in enumerate(lines)]


def write_corpus(directory: Path, lines: list[str], files: int, copies: int) -> Path:
    """A directory of ``files`` plain-text files, each holding ``copies`` variations of ``lines``."""
    directory.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        write_lines(directory / f"part{f}.txt", variants(lines, copies, f"f{f}r"))
    return directory


def normalized(lines: list[str]) -> list[str]:
    """What a document should decode to: NFC, stripped, empty ones dropped."""
    texts = (unicodedata.normalize("NFC", line).strip() for line in lines)
    return [t for t in texts if t]


# --------------------------------------------------------------------------- reading shards


def shard_documents(prefix: Path) -> list[np.ndarray]:
    """The documents of one `.bin`/`.idx` pair, via kolm's reader."""
    index = read_index(f"{prefix}.idx")
    tokens = open_tokens(f"{prefix}.bin", index.dtype)
    ends = np.cumsum(index.sizes, dtype=np.int64)
    return [np.array(tokens[start:end]) for start, end in zip(ends - index.sizes, ends)]


def documents(out: Path) -> list[np.ndarray]:
    """Every document of every shard (train then valid), each checked to end with EOS."""
    sd = load_shard_dir(out)
    docs = []
    for entry in sd.manifest["shards"]:
        for doc in shard_documents(sd.shard_path(entry, "")):
            assert len(doc) and doc[-1] == sd.tokenizer["eos_id"], f"{entry['path']}: a document lacks EOS"
            docs.append(doc)
    return docs


@lru_cache(maxsize=4)
def hf_tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def decoded(out: Path, tokenizer_dir: Path) -> list[str]:
    """The text of every document, decoded with Hugging Face's tokenizer, EOS left out."""
    tok = hf_tokenizer(str(tokenizer_dir))
    return tok.batch_decode([doc[:-1].tolist() for doc in documents(out)])


def assert_same_documents(got: list[str], expected: list[str]) -> None:
    """Equal as multisets (the train/valid split reorders documents)."""
    missing, extra = Counter(expected) - Counter(got), Counter(got) - Counter(expected)

    def sample(c: Counter) -> list[str]:
        return [t[:80] for t in list(c)[:3]]

    assert not missing and not extra, (
        f"{sum(missing.values())} documents missing, e.g. {sample(missing)}; "
        f"{sum(extra.values())} unexpected, e.g. {sample(extra)}"
    )


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def tree_digest(root: Path, include_work: bool = False) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (without `.work/` by default)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and (include_work or p.relative_to(root).parts[0] != ".work")
    }


def assert_same_output(a: Path, b: Path) -> None:
    """Two shard directories hold byte-identical datasets (the `.work/` scratch aside)."""
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    da, db = tree_digest(a), tree_digest(b)
    assert da.keys() == db.keys()
    assert [k for k in da if da[k] != db[k]] == []


def leftovers(root: Path) -> list[str]:
    """Scratch files a finished run must not leave: shards in progress anywhere, temporary
    files beside the dataset (a killed journal write may leave one inside `.work/`)."""
    return [
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name.endswith(".partial") or (".tmp-" in p.name and p.relative_to(root).parts[0] != ".work")
    ]


def units_done(out: Path) -> int:
    return len(list((out / ".work").glob("unit-*.done.json")))
