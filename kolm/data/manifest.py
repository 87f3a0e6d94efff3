"""The shard directory's manifest.json: its format (owned here: written by `kolm shard` through
`build`, read by everything else through `load_shard_dir`), verification of every shard against
it, and its statistics."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kolm.data.indexed import open_tokens, read_index
from kolm.errors import KolmError
from kolm.files import read_json, sha256_file

FORMAT = "kolm-shards"
VERSION = 1
SPLITS = ("train", "valid")
CHECKSUM = "checksum"
MANIFEST = "manifest.json"
# The fields that identify what a shard directory was built from (a rerun must match them).
IDENTITY_KEYS = ("format", "version", "tokenizer", "dtype", "options", "inputs")


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's content without its own checksum (canonical JSON)."""
    import hashlib
    import json

    body = {k: v for k, v in manifest.items() if k != CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def seal(manifest: dict) -> dict:
    """The manifest with its checksum, so that a hand edit is caught when it is loaded."""
    return {**manifest, CHECKSUM: manifest_checksum(manifest)}


def identity(tokenizer: dict, dtype: str, options: dict, inputs: list[dict]) -> dict:
    """What a shard directory is built from; recorded in its plan and its manifest."""
    return {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer, "dtype": dtype, "options": options,
            "inputs": inputs}


def build(plan: dict, shards: list[dict], stats: dict) -> dict:
    """The sealed manifest of a finished sharding run: its identity, every shard, the totals."""
    shards = sorted(shards, key=lambda e: (SPLITS.index(e["split"]), e["path"]))
    splits = {s: _split_totals(shards, s) for s in SPLITS}
    manifest = {**{k: plan[k] for k in IDENTITY_KEYS}, "shards": shards, "splits": splits,
                "corpus": _corpus_totals(stats, splits)}
    if manifest["corpus"]["documents"] == 0:
        raise KolmError("the corpus holds no text: every line was empty or skipped")
    return seal(manifest)


def _split_totals(shards: list[dict], split: str) -> dict:
    mine = [e for e in shards if e["split"] == split]
    return {key: sum(e[key] for e in mine) for key in ("documents", "tokens", "characters")} | {"shards": len(mine)}


def _corpus_totals(stats: dict, splits: dict) -> dict:
    counted = ("skipped_empty", "repaired_utf8", "long_documents", "malformed_skipped")
    return {"records": stats.get("records", 0),
            **{key: sum(v[key] for v in splits.values()) for key in ("documents", "tokens", "characters")},
            **{key: stats.get(key, 0) for key in counted}}


@dataclass
class ShardDir:
    path: Path
    manifest: dict

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def tokenizer(self) -> dict:
        return self.manifest["tokenizer"]

    def shards(self, split: str) -> list[dict]:
        if split not in SPLITS:
            raise KolmError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return [s for s in self.manifest["shards"] if s["split"] == split]

    def shard_path(self, entry: dict, suffix: str) -> Path:
        return self.path / f"{entry['path']}{suffix}"


def load_shard_dir(path: str | os.PathLike) -> ShardDir:
    """Open a finished shard directory; a missing or hand-broken manifest is a clear error."""
    p = Path(path)
    mf = p / MANIFEST
    if not p.is_dir():
        raise KolmError(f"{p}: no such shard directory; create it with `kolm shard`")
    if not mf.is_file():
        hint = "sharding is unfinished: re-run the same `kolm shard` command" if (p / ".work").is_dir() else (
            "run `kolm shard` first"
        )
        raise KolmError(f"{p}: no manifest.json ({hint})")
    try:
        manifest = read_json(mf)
    except (ValueError, UnicodeDecodeError) as e:
        raise KolmError(f"{mf}: not valid JSON ({e}); re-run `kolm shard --overwrite` to rebuild") from e
    required = ("format", "tokenizer", "dtype", "shards", "splits")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or any(k not in manifest for k in required):
        raise KolmError(f"{mf}: not a kolm shard manifest (missing {', '.join(required)})")
    # Manifests written before the checksum existed have none; every newer one must match it.
    if CHECKSUM in manifest and manifest[CHECKSUM] != manifest_checksum(manifest):
        raise KolmError(
            f"{mf} was changed after `kolm shard` wrote it (its checksum does not match its content): the "
            "counts and hashes it lists can no longer be trusted. Restore the original file, or rebuild "
            "with `kolm shard --overwrite` (or `kolm shard merge` when .work/ is still there)"
        )
    return ShardDir(p, manifest)


def check_tokenizer(shards: ShardDir, tokenizer_fingerprint: dict, tokenizer_path: str = "the tokenizer") -> None:
    """Refuse a tokenizer that differs from the one the shards were made with."""
    mine = shards.tokenizer
    if mine != tokenizer_fingerprint:
        diffs = [k for k in ("vocab_size", "eos_id", "sha256") if mine.get(k) != tokenizer_fingerprint.get(k)]
        raise KolmError(
            f"{tokenizer_path} does not match the tokenizer of {shards.path} "
            f"(differs in {', '.join(diffs)}); use the tokenizer the shards were made with, "
            "or re-shard with this one"
        )


def verify(path: str | os.PathLike, tokenizer_fingerprint: dict | None = None) -> list[str]:
    """Check every shard against the manifest. Returns a list of problems (empty when sound)."""
    sd = load_shard_dir(path)
    problems: list[str] = []
    if tokenizer_fingerprint is not None:
        try:
            check_tokenizer(sd, tokenizer_fingerprint)
        except KolmError as e:
            problems.append(str(e))
    vocab = sd.tokenizer["vocab_size"]
    eos = sd.tokenizer["eos_id"]
    for entry in sd.manifest["shards"]:
        problems.extend(_verify_shard(sd, entry, vocab, eos))
    return problems


def _verify_shard(sd: ShardDir, entry: dict, vocab: int, eos: int) -> list[str]:
    name = entry["path"]
    bin_path, idx_path = sd.shard_path(entry, ".bin"), sd.shard_path(entry, ".idx")
    for p in (bin_path, idx_path):
        if not p.is_file():
            return [f"{p}: missing"]
    problems = []
    if bin_path.stat().st_size != entry["bin_bytes"]:
        problems.append(f"{bin_path}: {bin_path.stat().st_size} bytes, manifest says {entry['bin_bytes']} (truncated?)")
    if sha256_file(bin_path) != entry["bin_sha256"]:
        problems.append(f"{bin_path}: sha256 differs from the manifest (corrupt)")
    if sha256_file(idx_path) != entry["idx_sha256"]:
        problems.append(f"{idx_path}: sha256 differs from the manifest (corrupt)")
    try:
        index = read_index(idx_path)
    except KolmError as e:
        return problems + [str(e)]
    if index.dtype != sd.dtype:
        problems.append(f"{idx_path}: dtype {index.dtype} but manifest says {sd.dtype}")
        return problems
    if len(index.sizes) != entry["documents"] or index.num_tokens != entry["tokens"]:
        counts = f"{len(index.sizes)} docs, {index.num_tokens} tokens"
        problems.append(f"{name}: index counts ({counts}) differ from the manifest")
        return problems
    expected_ptr = np.concatenate([[0], np.cumsum(index.sizes[:-1], dtype=np.int64)]) * sd.dtype.itemsize
    if len(index.sizes) and not np.array_equal(index.pointers, expected_ptr):
        problems.append(f"{idx_path}: byte pointers are inconsistent with the lengths")
    if not np.array_equal(index.doc_idx, np.arange(len(index.sizes) + 1)):
        problems.append(f"{idx_path}: document indices are not 0..n")
    if problems or bin_path.stat().st_size != index.num_tokens * sd.dtype.itemsize:
        return problems or [f"{bin_path}: size does not match its index"]
    tokens = open_tokens(bin_path, sd.dtype)
    if len(tokens):
        top = int(tokens.max())
        if top >= vocab:
            problems.append(f"{bin_path}: token id {top} is outside the vocabulary ({vocab})")
        ends = np.cumsum(index.sizes, dtype=np.int64) - 1
        if not np.all(tokens[ends] == eos):
            problems.append(f"{bin_path}: a document does not end with EOS ({eos})")
    return problems


def stats_table(path: str | os.PathLike) -> str:
    """Documents, tokens, characters and characters per token per split, as a text table."""
    sd = load_shard_dir(path)
    rows = [("split", "shards", "documents", "tokens", "characters", "chars/token")]
    for split in SPLITS:
        s = sd.manifest["splits"][split]
        cpt = s["characters"] / s["tokens"] if s["tokens"] else 0.0
        rows.append((split, s["shards"], s["documents"], s["tokens"], s["characters"], f"{cpt:.3f}"))
    c = sd.manifest["corpus"]
    lines = ["  ".join(f"{v:>12}" if i else f"{v:<6}" for i, v in enumerate(r)) for r in rows]
    lines.append(
        f"corpus: {c['records']} records, {c['skipped_empty']} empty skipped, "
        f"{c['repaired_utf8']} repaired (invalid UTF-8), {c['long_documents']} long documents, "
        f"{c['malformed_skipped']} malformed skipped; dtype {sd.dtype.name}, vocab {sd.tokenizer['vocab_size']}"
    )
    return "\n".join(lines)


@dataclass(frozen=True)
class ShardSummary:
    """What a sharding run (or `kolm shard merge`) wrote, for the command's output."""

    out: str
    manifest: dict
    seconds: float = 0.0

    def __str__(self) -> str:
        m, c = self.manifest, self.manifest["corpus"]
        lines = [f"shards written to {self.out}: {len(m['shards'])} shards, {c['documents']} documents, "
                 f"{c['tokens']} tokens, {c['characters']} characters "
                 f"({c['characters'] / max(c['tokens'], 1):.3f} chars/token) in {self.seconds:.1f}s"]
        for split, s in m["splits"].items():
            lines.append(f"  {split}: {s['documents']} documents, {s['tokens']} tokens in {s['shards']} shards")
        lines.append(f"  skipped {c['skipped_empty']} empty lines, repaired {c['repaired_utf8']} lines with invalid "
                     f"UTF-8, {c['long_documents']} long documents streamed in pieces, {c['malformed_skipped']} "
                     "malformed skipped")
        if m["splits"]["valid"]["documents"] == 0:
            lines.append("  warning: the validation split is empty; raise --valid-fraction for evaluation")
        return "\n".join(lines)
