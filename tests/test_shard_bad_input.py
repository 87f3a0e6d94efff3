"""`kolm shard` on bad input: repaired or skipped and counted when harmless, a clear exit-2 error
otherwise, and never a lost or changed pre-existing dataset."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.shard import (
    assert_same_documents,
    assert_user_error,
    clean_env,
    decoded,
    kolm,
    manifest,
    normalized,
    shard,
    shard_args,
    tree_digest,
    write_lines,
)

from kolm.data.tokenizer import load_tokenizer_info

pytestmark = pytest.mark.cli
OPTIONS = ("--valid-fraction", "0.1", "--workers", "1")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, korean_corpus, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("finished") / "shards"
    shard(korean_corpus, tokenizer_dir, out, *OPTIONS)
    return out


@pytest.fixture
def existing(tmp_path, finished) -> Path:
    """A private copy of a finished dataset sitting in the --out directory of a test."""
    return Path(shutil.copytree(finished, tmp_path / "existing"))


def shard_bytes(tmp_path: Path, tokenizer_dir: Path, raw_lines: list[bytes], *options: str):
    """Shard a file written byte for byte (lines joined by `\\n`) into a fresh directory."""
    path = tmp_path / "raw.txt"
    path.write_bytes(b"\n".join(raw_lines))
    out = tmp_path / "out"
    return shard(path, tokenizer_dir, out, *options, check=False), out


def assert_succeeded(proc, out: Path, raw_lines: list[bytes], tokenizer_dir: Path) -> dict:
    """Exit 0, and the documents decode to the normalized lines (invalid UTF-8 replaced)."""
    assert proc.returncode == 0, proc.stderr
    texts = [raw.decode("utf-8", errors="replace") for raw in raw_lines]
    assert_same_documents(decoded(out, tokenizer_dir), normalized(texts))
    return manifest(out)["corpus"]


def assert_untouched(out: Path, before: dict) -> None:
    assert tree_digest(out, include_work=True) == before, f"{out} was changed"


# --------------------------------------------------------------------------- repaired or skipped


def test_invalid_utf8_and_blank_lines_are_repaired_or_skipped_and_counted(tmp_path, korean_lines, tokenizer_dir):
    good = [line.encode() for line in korean_lines[:40]]
    broken = [b"\xea\xb0\x80\xff\xfe \xed\x95\x9c\xea\xb8\x80", b"caf\xc3( " + good[0], b"\xed\x95"]
    blank = [b"", b"   ", b"\t\t", "\u3000".encode(), b"\r"]
    raw = [*good[:10], *broken, *blank, *good[10:], good[5] + b"\r"]  # and a CRLF line
    proc, out = shard_bytes(tmp_path, tokenizer_dir, raw, *OPTIONS)
    corpus = assert_succeeded(proc, out, raw, tokenizer_dir)
    assert corpus["repaired_utf8"] == len(broken)
    assert corpus["skipped_empty"] == len(blank)
    assert corpus["records"] == len(raw)


def test_lines_longer_than_a_piece_stay_whole(tmp_path, tokenizer_dir):
    piece = 64
    raw = [
        "가나다라마바사아자차카타파하" * 6,  # no spaces: pieces are cut at character boundaries
        "  한국어 문장 " * 20 + "\t",  # spaces inside, whitespace at both ends
        "x" * (piece - 1),
        "   " + "y" * (piece - 3),  # exactly one piece before its newline
        "  " + "z" * (piece - 2),  # exactly one piece, the last line, no newline after it
    ]
    raw = [line.encode() for line in raw]
    proc, out = shard_bytes(tmp_path, tokenizer_dir, raw, *OPTIONS, "--piece-bytes", str(piece))
    corpus = assert_succeeded(proc, out, raw, tokenizer_dir)
    assert corpus["records"] == len(raw)
    assert corpus["documents"] == len(raw)
    assert corpus["repaired_utf8"] == 0


def test_whitespace_longer_than_a_piece_is_stripped_too(tmp_path, tokenizer_dir):
    """Stripping must not depend on where pieces are cut: a run of whitespace longer than a
    piece at either end of a line (or filling it) goes, as it does for a short line."""
    piece = 64
    raw = [b" " * (piece * 3), (" " * (piece * 2) + "본문 텍스트" + " \t" * piece).encode(), "마지막".encode()]
    proc, out = shard_bytes(tmp_path, tokenizer_dir, raw, *OPTIONS, "--piece-bytes", str(piece))
    corpus = assert_succeeded(proc, out, raw, tokenizer_dir)
    assert corpus["skipped_empty"] == 1


def korean_words_line(korean_lines: list[str], nbytes: int) -> str:
    words = " ".join(korean_lines).split()
    rng = random.Random(0)
    picked, size = [], 0
    while size < nbytes:
        picked.append(rng.choice(words))
        size += len(picked[-1].encode()) + 1
    return " ".join(picked)


def test_an_enormous_line_is_one_document(tmp_path, korean_lines, tokenizer_dir):
    huge = korean_words_line(korean_lines, 3 << 20)
    raw = [korean_lines[0].encode(), f"  {huge} \t".encode(), korean_lines[1].encode()]
    options = ("--valid-fraction", "0", "--workers", "2", "--piece-bytes", "65536")
    proc, out = shard_bytes(tmp_path, tokenizer_dir, raw, *options)
    corpus = assert_succeeded(proc, out, raw, tokenizer_dir)
    assert corpus["documents"] == corpus["records"] == 3
    assert corpus["long_documents"] == 1
    assert corpus["repaired_utf8"] == 0


# --------------------------------------------------------------------------- refused inputs


def test_a_missing_input_is_refused_and_nothing_is_lost(tmp_path, tokenizer_dir, existing):
    before = tree_digest(existing, include_work=True)
    missing = tmp_path / "nope.txt"
    proc = shard(missing, tokenizer_dir, existing, *OPTIONS, check=False)
    assert_user_error(proc, str(missing), "no such file or directory")
    assert_untouched(existing, before)


def without_permission_override() -> list[str]:
    """A command prefix under which file permissions apply, even to root (CI runs as root)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("root reads files whatever their permissions, and setpriv is not installed to drop that")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


def test_an_unreadable_input_is_refused_and_nothing_is_lost(tmp_path, korean_lines, tokenizer_dir, existing):
    before = tree_digest(existing, include_work=True)
    locked = write_lines(tmp_path / "locked.txt", korean_lines[:5])
    locked.chmod(0)
    proc = subprocess.run([*without_permission_override(), sys.executable, "-m", "kolm",
                           *map(str, shard_args([locked], tokenizer_dir, existing, *OPTIONS))],
                          capture_output=True, text=True, env=clean_env())
    assert_user_error(proc, str(locked), "not readable")
    assert_untouched(existing, before)


def test_an_unknown_format_is_refused_and_nothing_is_lost(tmp_path, korean_lines, tokenizer_dir, existing):
    before = tree_digest(existing, include_work=True)
    odd = write_lines(tmp_path / "notes.docx", korean_lines[:5])
    proc = shard(odd, tokenizer_dir, existing, *OPTIONS, check=False)
    assert_user_error(proc, str(odd), "unknown corpus format", ".jsonl.gz", ".parquet")
    assert_untouched(existing, before)


def test_a_corpus_of_blank_lines_is_refused(tmp_path, tokenizer_dir):
    proc, out = shard_bytes(tmp_path, tokenizer_dir, [b"", b"  ", b"\t", b""], *OPTIONS)
    assert_user_error(proc, "holds no text")
    assert not (out / "manifest.json").exists()


def malformed_jsonl(tmp_path: Path, korean_lines: list[str]) -> tuple[Path, list[str]]:
    """40 good records, then invalid JSON on line 41, a record without `text` on line 43."""
    import json

    good = korean_lines[:45]
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in good]
    lines[40] = '{"text": "깨진 줄'
    lines[42] = json.dumps({"title": good[42]}, ensure_ascii=False)
    kept = [t for i, t in enumerate(good) if i not in (40, 42)]
    return write_lines(tmp_path / "records.jsonl", lines), kept


def test_malformed_json_names_the_file_and_line(tmp_path, korean_lines, tokenizer_dir):
    path, _ = malformed_jsonl(tmp_path, korean_lines)
    out = tmp_path / "out"
    proc = shard(path, tokenizer_dir, out, *OPTIONS, "--chunk-docs", "16", check=False)
    assert_user_error(proc, str(path), "line 41", "invalid JSON", "--skip-malformed")
    assert not (out / "manifest.json").exists()


def test_skip_malformed_skips_and_counts(tmp_path, korean_lines, tokenizer_dir):
    path, kept = malformed_jsonl(tmp_path, korean_lines)
    out = tmp_path / "out"
    shard(path, tokenizer_dir, out, *OPTIONS, "--chunk-docs", "16", "--skip-malformed")
    assert_same_documents(decoded(out, tokenizer_dir), normalized(kept))
    assert manifest(out)["corpus"]["malformed_skipped"] == 2


# --------------------------------------------------------------------------- an existing --out


@pytest.mark.parametrize(
    ("change", "why"),
    [("tokenizer", "a different tokenizer"), ("options", "different options")],
)
def test_a_different_dataset_in_out_is_refused_unchanged(
    change, why, korean_corpus, tokenizer_dir, other_tokenizer, existing
):
    before = tree_digest(existing, include_work=True)
    tokenizer = other_tokenizer if change == "tokenizer" else tokenizer_dir
    options = [*OPTIONS, "--max-shard-tokens", "1000"] if change == "options" else OPTIONS
    proc = shard(korean_corpus, tokenizer, existing, *options, check=False)
    assert_user_error(proc, str(existing), why, "--overwrite")
    assert_untouched(existing, before)


def test_overwrite_replaces_a_dataset_made_with_another_tokenizer(korean_corpus, other_tokenizer, existing):
    shard(korean_corpus, other_tokenizer, existing, *OPTIONS, "--overwrite")
    m = manifest(existing)
    assert m["tokenizer"] == load_tokenizer_info(other_tokenizer).fingerprint()
    on_disk = {str(p.relative_to(existing)) for s in ("train", "valid") for p in (existing / s).iterdir()}
    listed = {f"{e['path']}{suffix}" for e in m["shards"] for suffix in (".bin", ".idx")}
    assert on_disk == listed, "shards of the replaced dataset were left behind"
    assert_same_documents(decoded(existing, other_tokenizer), normalized(korean_corpus.read_text().splitlines()))
    assert kolm("shard", "verify", existing, "--tokenizer", other_tokenizer).returncode == 0


def test_running_the_same_command_twice_changes_nothing(korean_corpus, tokenizer_dir, existing):
    before = tree_digest(existing, include_work=True)
    mtime = (existing / "manifest.json").stat().st_mtime_ns
    proc = shard(korean_corpus, tokenizer_dir, existing, *OPTIONS)
    assert "already complete" in proc.stderr
    assert_untouched(existing, before)
    assert (existing / "manifest.json").stat().st_mtime_ns == mtime


# --------------------------------------------------------------------------- numbers and --out


@pytest.mark.parametrize(
    ("options", "needle"),
    [(("--workers", "-1"), "--workers -1: must be at least 1"), (("--workers", "0"), "--workers 0: must be at least 1"),
     (("--num-tasks", "0"), "--num-tasks 0: must be at least 1"),
     (("--num-tasks", "2", "--task-index", "2"), "--task-index 2 must be in [0, 2)"),
     (("--valid-fraction", "1"), "--valid-fraction 1.0 must be in [0, 1)"),
     (("--valid-fraction", "nan"), "--valid-fraction nan must be in [0, 1)")],
)
def test_bad_numbers_are_refused_before_anything_is_written(tmp_path, korean_corpus, tokenizer_dir, options, needle):
    out = tmp_path / "out"
    assert_user_error(shard(korean_corpus, tokenizer_dir, out, *options, check=False), needle)
    assert not out.exists()


def test_an_out_that_is_a_file_is_refused_unchanged(tmp_path, korean_corpus, tokenizer_dir):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine", encoding="utf-8")
    assert_user_error(shard(korean_corpus, tokenizer_dir, a_file, "--workers", "1", check=False),
                      f"--out {a_file} is a file; choose a directory for --out")
    assert a_file.read_text(encoding="utf-8") == "mine"
