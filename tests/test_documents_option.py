"""`--documents lines|paragraphs|files`: where a plain-text corpus's documents begin and end.

A book corpus with one sentence per line holds its books as paragraphs (runs of non-blank lines)
or as files. The shards must hold one document per book, each ending with its only EOS, the same
whatever the worker count or unit size (paragraphs cross unit boundaries), and the choice must
be part of what identifies a shard directory.
"""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import run_kolm
from helpers.shard import (
    assert_same_documents,
    assert_same_output,
    assert_user_error,
    decoded,
    manifest,
    shard,
    shard_documents,
    write_jsonl,
    write_lines,
)

from kolm.data.corpus import LAST, WHOLE, find_inputs, iter_chunks, plan_units
from kolm.data.manifest import load_shard_dir, seal

BOOKS = 24


def books(korean_lines: list[str]) -> list[list[str]]:
    """``BOOKS`` books of 1 to 30 sentences each (one sentence per line), some sentences NFD."""
    rng = random.Random(7)
    out, i = [], 0
    for b in range(BOOKS):
        n = rng.choice([1, 2, 3, 8, 30])
        sentences = [korean_lines[(i + k) % len(korean_lines)] + f" ({b}-{k})" for k in range(n)]
        out.append([unicodedata.normalize("NFD", s) if k % 5 == 1 else s for k, s in enumerate(sentences)])
        i += n
    return out


def book_text(book: list[str]) -> str:
    """What a book's document decodes to: its sentences NFC and stripped, joined by newlines."""
    return "\n".join(unicodedata.normalize("NFC", s).strip() for s in book)


def paragraph_file(path: Path, books: list[list[str]]) -> Path:
    """Books separated by blank lines of every kind: several, whitespace-only, CRLF ones; some
    sentences carry surrounding whitespace."""
    rng = random.Random(3)
    lines: list[str] = ["", "   "]
    for book in books:
        lines += [f"  {s}\t" if k % 4 == 2 else s for k, s in enumerate(book)]
        lines += rng.choice([[""], ["", ""], [" \t"], ["\r"], ["", "  ", ""]])
    return write_lines(path, lines)


def eos_positions(out: Path) -> list[list[int]]:
    """For every document of every shard (manifest order), the positions of EOS in it."""
    sd = load_shard_dir(out)
    eos = sd.tokenizer["eos_id"]
    return [np.flatnonzero(doc == eos).tolist() for e in sd.manifest["shards"]
            for doc in shard_documents(sd.shard_path(e, ""))]


def token_stream(out: Path) -> dict[str, list[list[int]]]:
    """Every split's documents as token lists, in order (independent of how units were cut)."""
    sd = load_shard_dir(out)
    return {s: [doc.tolist() for e in sd.shards(s) for doc in shard_documents(sd.shard_path(e, ""))]
            for s in ("train", "valid")}


def assert_one_eos_at_the_end(out: Path, count: int) -> None:
    positions = eos_positions(out)
    assert len(positions) == count
    sd = load_shard_dir(out)
    lengths = [len(doc) for e in sd.manifest["shards"] for doc in shard_documents(sd.shard_path(e, ""))]
    assert positions == [[n - 1] for n in lengths], "an EOS inside a document, or a document without one"


# --------------------------------------------------------------------------- the reader itself


def _reader_documents(path: Path, documents: str, unit_bytes: int, piece_bytes: int) -> list[bytes]:
    """Every document kolm's reader yields for ``path`` (pieces put back together)."""
    docs, pieces = [], []
    for unit in plan_units(find_inputs([str(path)]), unit_bytes, documents):
        for chunk in iter_chunks(unit, 5, 400, piece_bytes, documents):
            if chunk.piece == WHOLE:
                docs.extend(chunk.records)
                continue
            pieces.append(chunk.records[0])
            if chunk.piece == LAST:
                docs.append(b"".join(pieces))
                pieces = []
    return docs


@pytest.mark.unit
def test_paragraphs_do_not_depend_on_where_units_are_cut(tmp_path):
    """Random text with blank, whitespace-only and over-long lines: every unit size gives the
    paragraphs a plain split on blank lines gives."""
    rng = random.Random(11)
    words = ["대한민국", "헌법", "제1조", "국민", "  ", "\t", "주권은"]
    lines = []
    for _ in range(600):
        r = rng.random()
        if r < 0.25:
            lines.append(rng.choice(["", "  ", "\t", " \r"]))
        elif r < 0.28:
            lines.append("가" * rng.randint(30, 120))  # over a 128-byte block: read in pieces
        else:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))))
    path = tmp_path / "p.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    limit = 128
    expected, current = [], []
    for line in path.read_bytes().split(b"\n"):
        if len(line) + 1 <= limit and not line.strip():
            expected += [b"\n".join(current)] if current else []
            current = []
        else:
            current.append(line.strip())
    expected += [b"\n".join(current)] if current else []
    whole = _reader_documents(path, "paragraphs", 1 << 30, limit)
    assert [d.strip() for d in whole] == expected
    for unit_bytes in (1, 7, 50, 129, 400, 3000):
        assert _reader_documents(path, "paragraphs", unit_bytes, limit) == whole, unit_bytes


@pytest.mark.unit
def test_files_are_whole_documents_and_never_split(tmp_path):
    (tmp_path / "c").mkdir()
    texts = ["첫째 줄\n\n둘째 단락\n", "", "긴 " * 400, "마지막"]
    for i, t in enumerate(texts):
        (tmp_path / "c" / f"{i}.txt").write_text(t, encoding="utf-8")
    units = plan_units(find_inputs([str(tmp_path / "c")]), 16, "files")
    assert all(s.start == 0 and s.end is None for u in units for s in u.segments)
    got = _reader_documents(tmp_path / "c", "files", 16, 256)
    assert [d.decode() for d in got] == texts[:2] + [texts[2].rstrip()] + texts[3:]


# --------------------------------------------------------------------------- kolm shard


@pytest.mark.cli
def test_paragraphs_give_one_document_per_book_whatever_the_workers_and_units(tmp_path, korean_lines, tokenizer_dir):
    corpus = books(korean_lines)
    path = paragraph_file(tmp_path / "books.txt", corpus)
    opts = ("--documents", "paragraphs", "--valid-fraction", "0.2", "--piece-bytes", "1024")
    one = tmp_path / "one"
    shard(path, tokenizer_dir, one, *opts, "--workers", "1")
    assert manifest(one)["options"]["documents"] == "paragraphs"
    assert manifest(one)["corpus"]["documents"] == BOOKS
    assert manifest(one)["corpus"]["long_documents"] > 0  # the long books went the piece path
    assert manifest(one)["splits"]["valid"]["documents"] > 0
    assert_same_documents(decoded(one, tokenizer_dir), [book_text(b) for b in corpus])
    assert_one_eos_at_the_end(one, BOOKS)
    two = tmp_path / "two"
    shard(path, tokenizer_dir, two, *opts, "--workers", "2")
    assert_same_output(one, two)
    # Units of 300 bytes: nearly every book starts in one unit and ends in another.
    tiny = tmp_path / "tiny"
    shard(path, tokenizer_dir, tiny, *opts, "--workers", "2", "--unit-bytes", "300")
    assert len(json.loads((tiny / ".work" / "plan.json").read_text())["units"]) > BOOKS
    assert token_stream(tiny) == token_stream(one)


@pytest.mark.cli
def test_files_give_one_document_per_file(tmp_path, korean_lines, tokenizer_dir):
    corpus = books(korean_lines)
    d = tmp_path / "books"
    d.mkdir()
    for i, book in enumerate(corpus):  # blank lines inside a file stay inside its document
        name = f"{i:02d}.txt.gz" if i % 3 == 0 else f"{i:02d}.txt"
        write_lines(d / name, ["", *book[:2], "", *book[2:], "  "])
    (d / "empty.txt").write_text(" \n\n", encoding="utf-8")
    expected = []
    for book in corpus:
        text = "\n".join([*book[:2], "", *book[2:], "  "]) + "\n"
        expected.append(unicodedata.normalize("NFC", text).strip())
    opts = ("--documents", "files", "--valid-fraction", "0.2", "--piece-bytes", "1024", "--unit-bytes", "500")
    one = tmp_path / "one"
    shard(d, tokenizer_dir, one, *opts, "--workers", "1")
    m = manifest(one)
    assert m["options"]["documents"] == "files"
    assert m["corpus"]["documents"] == BOOKS and m["corpus"]["skipped_empty"] == 1
    assert m["corpus"]["long_documents"] > 0
    assert_same_documents(decoded(one, tokenizer_dir), expected)
    assert_one_eos_at_the_end(one, BOOKS)
    two = tmp_path / "two"
    shard(d, tokenizer_dir, two, *opts, "--workers", "2")
    assert_same_output(one, two)


@pytest.mark.cli
def test_the_choice_identifies_the_shard_directory(tmp_path, korean_lines, tokenizer_dir):
    corpus = books(korean_lines)
    path = paragraph_file(tmp_path / "books.txt", corpus)
    out = tmp_path / "shards"
    shard(path, tokenizer_dir, out)
    lines = manifest(out)
    assert lines["options"]["documents"] == "lines"
    assert lines["corpus"]["documents"] == sum(len(b) for b in corpus)
    before = (out / "manifest.json").read_bytes()
    refused = shard(path, tokenizer_dir, out, "--documents", "paragraphs", check=False)
    assert_user_error(refused, "different options", "--overwrite")
    assert (out / "manifest.json").read_bytes() == before
    shard(path, tokenizer_dir, out, "--documents", "paragraphs", "--overwrite")
    assert manifest(out)["corpus"]["documents"] == BOOKS
    again = shard(path, tokenizer_dir, out, "--documents", "paragraphs")
    assert "already complete" in again.stderr
    # A directory made before the option existed recorded no choice: it was one per line.
    old = tmp_path / "old"
    shard(path, tokenizer_dir, old)
    recorded = manifest(old)
    del recorded["options"]["documents"]
    (old / "manifest.json").write_text(json.dumps(seal({k: v for k, v in recorded.items() if k != "checksum"})))
    assert "already complete" in shard(path, tokenizer_dir, old).stderr
    assert_user_error(shard(path, tokenizer_dir, old, "--documents", "files", check=False), "different options")


@pytest.mark.cli
def test_documents_needs_plain_text_input(tmp_path, tokenizer_dir):
    records = write_jsonl(tmp_path / "c.jsonl", [{"text": "대한민국 헌법"}, {"text": "제1조"}])
    proc = shard(records, tokenizer_dir, tmp_path / "out", "--documents", "paragraphs", check=False)
    assert_user_error(proc, "--documents paragraphs", ".txt")
    assert not (tmp_path / "out").exists()
    bad = run_kolm("shard", "--input", records, "--tokenizer", tokenizer_dir, "--out", tmp_path / "x",
                   "--documents", "sentences")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


# --------------------------------------------------------------------------- kolm tokenizer train


@pytest.mark.cli
def test_tokenizer_train_reads_the_same_documents(tmp_path, korean_lines):
    corpus = books(korean_lines)
    path = paragraph_file(tmp_path / "books.txt", corpus)
    counts = {}
    for choice in ("lines", "paragraphs"):
        proc = run_kolm("tokenizer", "train", "--input", path, "--vocab-size", 600, "--out", tmp_path / choice,
                        "--documents", choice, check=True)
        trained = int(proc.stdout.split("trained on ")[1].split()[0])
        held = proc.stdout.split("on ")[-1].split()[0]
        counts[choice] = trained + (int(held) if held.isdigit() else 0)
    assert counts == {"lines": sum(len(b) for b in corpus), "paragraphs": BOOKS}
