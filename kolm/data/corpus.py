"""Corpus reading: find input files, cut them into work units, stream raw records, normalize text.

Reading (bytes off disk, in order) happens in one process; normalizing and tokenizing happen in
workers. Everything here is deterministic: the same inputs give the same units, chunks and
documents whatever the number of workers or array tasks.

A plain-text file holds documents in one of three ways (``documents``): one per line (``lines``),
runs of non-blank lines separated by blank lines (``paragraphs``), or one per file (``files``).
JSONL lines and parquet/arrow rows are always one document each.
"""

from __future__ import annotations

import glob
import gzip
import importlib.metadata
import itertools
import json
import os
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kolm.errors import KolmError

FORMATS = {
    ".txt": ("text", False),
    ".txt.gz": ("text", True),
    ".jsonl": ("jsonl", False),
    ".jsonl.gz": ("jsonl", True),
    ".parquet": ("parquet", False),
    ".arrow": ("arrow", False),
}
FORMAT_HELP = ", ".join(FORMATS)
NORMALIZATION = "utf8-replace+nfc+strip"
# How plain text (.txt, .txt.gz) is cut into documents; the first is the default.
DOCUMENTS = ("lines", "paragraphs", "files")

# Piece flags for documents longer than the piece size: they travel as several chunks.
WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str
    compressed: bool
    size: int
    mtime_ns: int

    @property
    def splittable(self) -> bool:
        return self.format in ("text", "jsonl") and not self.compressed


@dataclass(frozen=True)
class Segment:
    """A byte range of one file: the records whose first byte lies in [start, end)."""

    file: InputFile
    start: int = 0
    end: int | None = None


@dataclass(frozen=True)
class Unit:
    """The unit of resumable work and of array-task partitioning."""

    index: int
    segments: tuple[Segment, ...]


@dataclass
class Chunk:
    """Raw records handed to a tokenizer worker.

    ``records`` are bytes lines (text, jsonl) or strings (parquet, arrow). ``first_line`` is the
    1-based line (or row) number of the first record when known, for error messages.
    """

    kind: str
    records: list
    source: str
    first_line: int | None
    start_offset: int
    piece: int = WHOLE


def format_of(path: str) -> tuple[str, bool] | None:
    name = path.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix]
    return None


def find_inputs(specs: list[str]) -> list[InputFile]:
    """Expand files, directories and globs into a sorted list of readable corpus files."""
    if not specs:
        raise KolmError("no --input given: pass corpus files, directories or globs")
    paths: set[str] = set()
    for spec in specs:
        paths.update(_expand(spec))
    files = []
    for p in sorted(paths):
        fmt, compressed = format_of(p)
        if not os.access(p, os.R_OK):
            raise KolmError(f"{p}: file is not readable (check its permissions)")
        st = os.stat(p)
        files.append(InputFile(p, fmt, compressed, st.st_size, st.st_mtime_ns))
    return files


def _expand(spec: str) -> list[str]:
    if os.path.isdir(spec):
        found = _files_below(spec)
        if not found:
            raise KolmError(f"{spec}: directory holds no corpus files ({FORMAT_HELP})")
        return found
    if any(c in spec for c in "*?["):
        matched = sorted(glob.glob(spec, recursive=True))
        found = [str(Path(m).resolve()) for m in matched if os.path.isfile(m) and format_of(m)]
        if not found:
            raise KolmError(f"{spec}: pattern matches no corpus files ({FORMAT_HELP})")
        return found
    if not os.path.exists(spec):
        raise KolmError(f"{spec}: no such file or directory")
    if not format_of(spec):
        raise KolmError(f"{spec}: unknown corpus format; supported: {FORMAT_HELP}")
    return [str(Path(spec).resolve())]


def _files_below(directory: str) -> list[str]:
    """Corpus files in ``directory`` and its subdirectories, skipping hidden names below it (work
    and cache folders such as an unfinished `kolm clean`'s ``.work/``); a hidden directory named
    on the command line is still read."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names = [f for f in files if not f.startswith(".") and format_of(f)]
        if names:
            _refuse_unfinished_clean(root)
        found.extend(str(Path(root, f).resolve()) for f in names if os.path.isfile(os.path.join(root, f)))
    return found


def _refuse_unfinished_clean(directory: str) -> None:
    """A `kolm clean` output is complete once its report.json exists; before that it holds part of the corpus."""
    plan = Path(directory, ".work", "plan.json")
    if not plan.is_file() or Path(directory, "report.json").exists():
        return
    try:
        recorded = json.loads(plan.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(recorded, dict) and {"config", "tasks"} <= recorded.keys():
        raise KolmError(f"{directory} is the output of a `kolm clean` that has not finished (it has .work/ but no "
                        "report.json), so it holds only part of the corpus: re-run that kolm clean command to finish "
                        "it, then read its output")


def check_documents(documents: str, files: list[InputFile]) -> None:
    """Refuse an unknown ``documents`` choice, or one that none of ``files`` is read with."""
    if documents not in DOCUMENTS:
        raise KolmError(f"--documents {documents!r}: choose one of {', '.join(DOCUMENTS)}")
    if documents != "lines" and not any(f.format == "text" for f in files):
        raise KolmError(
            f"--documents {documents} applies to .txt and .txt.gz inputs, and none was given (a JSONL line "
            "or a parquet/arrow row is always one document): drop --documents"
        )


def plan_units(files: list[InputFile], unit_bytes: int, documents: str = "lines") -> list[Unit]:
    """Cut the inputs into units of about ``unit_bytes``: big plain files split into byte
    ranges (never a file that is one document), small files grouped in order. Depends only on
    the file list, the sizes and ``documents``."""
    units: list[Unit] = []
    group: list[Segment] = []
    group_bytes = 0

    def flush() -> None:
        nonlocal group, group_bytes
        if group:
            units.append(Unit(len(units), tuple(group)))
            group, group_bytes = [], 0

    for f in files:
        if f.splittable and f.size > unit_bytes and not (documents == "files" and f.format == "text"):
            flush()
            for start in range(0, f.size, unit_bytes):
                units.append(Unit(len(units), (Segment(f, start, min(f.size, start + unit_bytes)),)))
        elif f.size >= unit_bytes:
            flush()
            units.append(Unit(len(units), (Segment(f),)))
        else:
            if group_bytes + f.size > unit_bytes:
                flush()
            group.append(Segment(f))
            group_bytes += f.size
    flush()
    return units


def iter_chunks(
    unit: Unit, chunk_docs: int, chunk_bytes: int, piece_bytes: int, documents: str = "lines"
) -> Iterator[Chunk]:
    """Stream a unit's records as chunks of at most ``chunk_docs`` records / ``chunk_bytes``; a
    plain-text record is one document as ``documents`` says. A document longer than
    ``piece_bytes`` travels alone, as FIRST, MIDDLE... and LAST piece chunks."""
    for is_text, group in itertools.groupby(unit.segments, key=lambda s: s.file.format == "text"):
        if is_text and documents == "files":
            yield from _file_chunks(list(group), chunk_docs, chunk_bytes, piece_bytes)
            continue
        for seg in group:
            if is_text and documents == "paragraphs":
                yield from _paragraph_chunks(seg, chunk_docs, chunk_bytes, piece_bytes)
            elif seg.file.format in ("text", "jsonl"):
                yield from _line_chunks(seg, chunk_docs, chunk_bytes, piece_bytes)
            elif seg.file.format == "parquet":
                yield from _parquet_chunks(seg, chunk_docs)
            else:
                yield from _arrow_chunks(seg, chunk_docs)


def _open_binary(f: InputFile):
    try:
        return gzip.open(f.path, "rb") if f.compressed else open(f.path, "rb", buffering=1 << 20)
    except OSError as e:
        raise KolmError(f"{f.path}: cannot open ({e.strerror or e})") from e


def _line_chunks(seg: Segment, chunk_docs: int, chunk_bytes: int, piece_bytes: int) -> Iterator[Chunk]:
    kind, path = seg.file.format, seg.file.path
    records: list[bytes] = []
    size = 0
    first_line: int | None = 1 if seg.start == 0 else None
    line_no = 1
    chunk_offset = seg.start
    try:
        with _open_binary(seg.file) as f:
            pos = _seek_to_line(f, seg.start)
            # JSON lines must be parsed whole; plain text lines are streamed in pieces.
            limit = piece_bytes if kind == "text" else -1
            while seg.end is None or pos < seg.end:
                line = f.readline(limit)
                if not line:
                    break
                if len(line) == limit and not line.endswith(b"\n"):
                    # A line longer than a piece: flush what we have, then stream it in pieces.
                    if records:
                        yield Chunk(kind, records, path, first_line, chunk_offset)
                    pos += yield from _long_pieces(_line_blocks(f, line), kind, path, line_no, pos, piece_bytes)
                    records, size = [], 0
                else:
                    if not records:
                        chunk_offset = pos
                        first_line = line_no if seg.start == 0 else None
                    pos += len(line)
                    records.append(line)
                    size += len(line)
                    if len(records) >= chunk_docs or size >= chunk_bytes:
                        yield Chunk(kind, records, path, first_line, chunk_offset)
                        records, size = [], 0
                line_no += 1
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise _read_failed(path, e) from e
    if records:
        yield Chunk(kind, records, path, first_line, chunk_offset)


def _seek_to_line(f, start: int) -> int:
    """Position ``f`` at the first line that starts at or after ``start``; return the offset."""
    if start == 0:
        return 0
    f.seek(start - 1)
    return start - 1 + sum(len(block) for block in _line_blocks(f, f.readline(1 << 20)))


def _line_blocks(f, head: bytes) -> Iterator[bytes]:
    """The bytes of one line, ``head`` (its first block, read with a size limit) and then the
    rest in blocks of at most ``len(head)`` bytes, up to its newline or the end of the file."""
    block, limit = head, len(head)
    while block:
        yield block
        if block.endswith(b"\n"):
            return
        block = f.readline(limit)


# Whitespace-only pieces after a line's content are held back (they may be its trailing
# whitespace, which is stripped); past this many they are passed on as interior whitespace.
MAX_HELD_PIECES = 16


def _long_pieces(blocks: Iterator[bytes], kind: str, path: str, line_no: int | None, pos: int, piece_bytes: int):
    """Yield one over-long document, given as its raw bytes in ``blocks``, as FIRST/MIDDLE/LAST
    piece chunks of bounded size, stripping its leading and trailing whitespace as a short one
    would be. Returns the number of bytes consumed (when ``blocks`` are the file's bytes)."""
    started = False
    held: list[tuple[bytes, int]] = []  # whitespace that is trailing unless content follows
    end = pos
    for piece, offset, last in _raw_pieces(blocks, pos, piece_bytes):
        end = offset + len(piece)
        if not started:
            stripped = piece.lstrip()
            offset += len(piece) - len(stripped)
            piece = stripped
        body = piece.rstrip()
        if last:
            if body:
                yield from _flush(held, kind, path, line_no)
            yield Chunk(kind, [body], path, line_no, offset, LAST if started else WHOLE)
            return end - pos
        if body:
            yield from _flush(held, kind, path, line_no)
            yield Chunk(kind, [body], path, line_no, offset, MIDDLE if started else FIRST)
            started = True
        if started and len(body) < len(piece):
            held.append((piece[len(body):], offset + len(body)))
            if len(held) > MAX_HELD_PIECES:
                yield from _flush(held, kind, path, line_no)
    return end - pos


def _flush(held: list[tuple[bytes, int]], kind: str, path: str, line_no: int | None) -> Iterator[Chunk]:
    """Pass on held whitespace as interior pieces of the document."""
    for piece, offset in held:
        yield Chunk(kind, [piece], path, line_no, offset, MIDDLE)
    held.clear()


def _raw_pieces(blocks: Iterator[bytes], pos: int, piece_bytes: int):
    """The bytes of one long document as (piece, offset, is_last), each piece at most
    ``piece_bytes``. Pieces are cut just before a space when there is one (byte-level BPE
    starts a word at its leading space, so the tokens match those of the whole line), else at
    a character boundary."""
    blocks = iter(blocks)
    buf, offset = next(blocks, b""), pos
    # About one piece is buffered here; blocks run to the document's end.
    for more in blocks:
        buf += more
        # Cut only once the next bytes are here, so a cut never splits a character.
        while len(buf) > piece_bytes:
            cut = _cut_point(buf[:piece_bytes])
            yield buf[:cut], offset, False
            offset += cut
            buf = buf[cut:]
    yield buf, offset, True


def _cut_point(buf: bytes) -> int:
    space = buf.rfind(b" ", len(buf) // 2)
    if space > 0:
        return space
    cut = len(buf)
    while cut > 0 and (buf[cut - 1] & 0xC0) == 0x80:
        cut -= 1
    # buf[cut-1] is now a lead byte whose sequence may be incomplete: cut before it.
    if cut > 0 and buf[cut - 1] >= 0xC0:
        cut -= 1
    return cut or len(buf)


# --------------------------------------------------------------------------- paragraphs and files


def _read_failed(path: str, e: Exception) -> KolmError:
    return KolmError(f"{path}: read failed ({e}); the file is truncated or corrupt")


def _file_chunks(segs: list[Segment], chunk_docs: int, chunk_bytes: int, piece_bytes: int) -> Iterator[Chunk]:
    """Whole plain-text files as documents, small ones several to a chunk; a file longer than a
    piece travels alone, in pieces, so memory stays bounded."""
    records: list[bytes] = []
    size, source = 0, ""
    for seg in segs:
        path = seg.file.path
        try:
            with _open_binary(seg.file) as f:
                blocks = iter(lambda f=f: f.read(piece_bytes), b"")
                head, more = next(blocks, b""), next(blocks, b"")
                if more:
                    if records:
                        yield Chunk("text", records, source, 1, 0)
                        records, size = [], 0
                    yield from _long_pieces(itertools.chain((head, more), blocks), "text", path, 1, 0, piece_bytes)
                    continue
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise _read_failed(path, e) from e
        if not records:
            source = path
        records.append(head)
        size += len(head)
        if len(records) >= chunk_docs or size >= chunk_bytes:
            yield Chunk("text", records, source, 1, 0)
            records, size = [], 0
    if records:
        yield Chunk("text", records, source, 1, 0)


def _paragraph_chunks(seg: Segment, chunk_docs: int, chunk_bytes: int, piece_bytes: int) -> Iterator[Chunk]:
    """Runs of non-blank lines as documents, each line stripped, joined with a newline; a
    paragraph longer than a piece travels alone, in pieces."""
    path = seg.file.path
    records: list[bytes] = []
    size, first_line, offset = 0, None, seg.start
    try:
        with _open_binary(seg.file) as f:
            for at, line_no, head, rest in _paragraphs(f, seg, piece_bytes):
                if rest is not None:
                    if records:
                        yield Chunk("text", records, path, first_line, offset)
                        records, size = [], 0
                    yield from _long_pieces(itertools.chain(head, rest), "text", path, line_no, at, piece_bytes)
                    continue
                if not records:
                    offset, first_line = at, line_no
                records.append(b"".join(head))
                size += len(records[-1])
                if len(records) >= chunk_docs or size >= chunk_bytes:
                    yield Chunk("text", records, path, first_line, offset)
                    records, size = [], 0
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise _read_failed(path, e) from e
    if records:
        yield Chunk("text", records, path, first_line, offset)


def _paragraphs(f, seg: Segment, piece_bytes: int):
    """(offset, line number, head, rest) of each paragraph the segment owns: those whose first
    line starts inside it, each read to its end (past the segment's end if need be). ``head``
    holds its text up to a little over a piece; ``rest`` is None when that is all of it, else
    the generator of the remainder, to be consumed before the next paragraph."""
    lines = _Lines(f, _paragraph_start(f, seg.start, piece_bytes), piece_bytes, seg.start == 0)
    while seg.end is None or lines.pos < seg.end:
        at, line_no = lines.pos, lines.line_no
        block = lines.read()
        if not block:
            return
        if lines.blank(block):
            continue
        text = lines.paragraph(block)
        head, size = [], 0
        for part in text:
            head.append(part)
            size += len(part)
            if size > piece_bytes:
                yield at, line_no, head, text
                break
        else:
            yield at, line_no, head, None


class _Lines:
    """A plain-text file read line by line in blocks of at most ``limit`` bytes. A line is blank
    when it fits in one block and holds nothing but ASCII whitespace."""

    def __init__(self, f, pos: int, limit: int, numbered: bool):
        self.f, self.pos, self.limit = f, pos, limit
        self.line_no = 1 if numbered else None  # known only when reading from the file's start

    def read(self) -> bytes:
        """The first block of the next line (empty at the end of the file)."""
        block = self.f.readline(self.limit)
        self.pos += len(block)
        if self.line_no is not None and block:
            self.line_no += 1
        return block

    def long(self, block: bytes) -> bool:
        return len(block) == self.limit and not block.endswith(b"\n")

    def blank(self, block: bytes) -> bool:
        return not self.long(block) and not block.strip()

    def rest(self, block: bytes) -> Iterator[bytes]:
        """The blocks that follow ``block`` on its line."""
        while self.long(block):
            block = self.f.readline(self.limit)
            if not block:
                return
            self.pos += len(block)
            yield block

    def paragraph(self, block: bytes) -> Iterator[bytes]:
        """A paragraph's text from the first block of its first line on: lines stripped and
        joined with a newline. Reads through the blank line that ends it."""
        readline, limit, sep = self.f.readline, self.limit, b""
        while block:
            if len(block) == limit and not block.endswith(b"\n"):  # a long line
                yield sep + block.lstrip()
                yield from _rstrip_last(self.rest(block))
            else:
                stripped = block.strip()
                if not stripped:
                    return  # the blank line that ends the paragraph
                yield sep + stripped
            sep = b"\n"
            # The inner loop of paragraph reading: `read` inlined.
            block = readline(limit)
            self.pos += len(block)
            if self.line_no is not None and block:
                self.line_no += 1


def _rstrip_last(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """The blocks of the rest of a long line without its trailing whitespace (exactly, unless
    that whitespace spans more than ``MAX_HELD_PIECES`` blocks)."""
    last: bytes | None = None  # the last block with content, held back to be stripped
    held: list[bytes] = []  # whitespace-only blocks after it
    for block in blocks:
        if block.strip() or len(held) >= MAX_HELD_PIECES:
            yield from ([last] if last is not None else []) + held
            last, held = block, []
        else:
            held.append(block)
    if last is not None:
        yield last.rstrip()


def _paragraph_start(f, start: int, limit: int) -> int:
    """Position ``f`` at the first line at or after ``start`` that does not continue a paragraph
    begun before ``start`` (whose segment reads it); return its offset."""
    pos = _seek_to_line(f, start)
    if pos == 0 or _blank_before(f, pos, limit):
        f.seek(pos)
        return pos
    f.seek(pos)
    lines = _Lines(f, pos, limit, False)
    for _ in lines.paragraph(lines.read()):
        pass
    return lines.pos


def _blank_before(f, pos: int, limit: int) -> bool:
    """Whether the line that ends at ``pos`` is blank as `_Lines` judges it, read backwards."""
    low = max(0, pos - 1 - limit)
    f.seek(low)
    window = f.read(pos - 1 - low)
    newline = window.rfind(b"\n")
    if newline < 0 and low > 0:
        return False  # longer than a block: never blank
    line = window[newline + 1 :]
    return len(line) < limit and not line.strip()


def _parquet_chunks(seg: Segment, chunk_docs: int) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    path = seg.file.path
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise KolmError(f"{path}: not a readable parquet file ({e})") from e
    yield from _table_chunks(path, pf.iter_batches(batch_size=chunk_docs), chunk_docs, "parquet")


def _arrow_chunks(seg: Segment, chunk_docs: int) -> Iterator[Chunk]:
    import pyarrow as pa

    path = seg.file.path
    try:
        reader = pa.ipc.open_stream(pa.memory_map(path))
    except Exception:
        try:
            reader = pa.ipc.open_file(pa.memory_map(path))
            reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except Exception as e:
            raise KolmError(f"{path}: not a readable Arrow file ({e})") from e
    yield from _table_chunks(path, reader, chunk_docs, "arrow")


def _table_chunks(path: str, batches, chunk_docs: int, kind: str) -> Iterator[Chunk]:
    """Rows of a columnar file as chunks; the worker picks the text column out of each row."""
    row = 1
    pending: list = []
    for batch in batches:
        pending.extend(batch.to_pylist())
        while len(pending) >= chunk_docs:
            yield Chunk(kind, pending[:chunk_docs], path, row, 0)
            row += chunk_docs
            pending = pending[chunk_docs:]
    if pending:
        yield Chunk(kind, pending, path, row, 0)


class Decoder:
    """Turns raw records into normalized document text, counting what it repaired or skipped."""

    def __init__(self, text_field: str = "text", skip_malformed: bool = False):
        self.text_field = text_field
        self.skip_malformed = skip_malformed

    def text(self, chunk: Chunk, i: int, record, stats: dict) -> str | None:
        """Normalized text of record ``i`` of ``chunk``, or None for a skipped record."""
        if chunk.kind == "text":
            return self._normalize(self._decode(record, stats), chunk.piece)
        if chunk.kind == "jsonl":
            value = self._json_field(chunk, i, self._decode(record, stats), stats)
        else:
            value = self._row_field(chunk, i, record, stats)
        return None if value is None else self._normalize(value, WHOLE)

    @staticmethod
    def _decode(raw: bytes, stats: dict) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            stats["repaired_utf8"] += 1
            return raw.decode("utf-8", errors="replace")

    @staticmethod
    def _normalize(text: str, piece: int) -> str:
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        if piece == WHOLE:
            return text.strip()
        if piece == FIRST:
            return text.lstrip()
        if piece == LAST:
            return text.rstrip()
        return text

    def record(self, chunk: Chunk, i: int, raw, stats: dict) -> dict | None:
        """Record ``i`` of ``chunk`` whole, as a dict whose text field is normalized (a plain text
        line becomes ``{text_field: line}``), or None for a skipped record."""
        if chunk.kind == "text":
            return {self.text_field: self._normalize(self._decode(raw, stats), chunk.piece)}
        if chunk.kind == "jsonl":
            obj = self._json_record(chunk, i, self._decode(raw, stats), stats)
            if obj is None:
                return None
        else:
            value = self._row_field(chunk, i, raw, stats)
            obj = {**raw, self.text_field: value}
        obj[self.text_field] = self._normalize(obj[self.text_field], WHOLE)
        return obj

    def _json_field(self, chunk: Chunk, i: int, line: str, stats: dict) -> str | None:
        obj = self._json_record(chunk, i, line, stats)
        return None if obj is None else obj[self.text_field]

    def _json_record(self, chunk: Chunk, i: int, line: str, stats: dict) -> dict | None:
        if not line.strip():
            return {self.text_field: ""}
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            return self._malformed(chunk, i, f"invalid JSON ({e.msg})", stats)
        value = obj.get(self.text_field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            return self._malformed(chunk, i, f"no string field {self.text_field!r}", stats)
        return obj

    def _row_field(self, chunk: Chunk, i: int, row: dict, stats: dict) -> str | None:
        value = row.get(self.text_field)
        if value is None and self.text_field not in row:
            columns = ", ".join(row)
            raise KolmError(
                f"{chunk.source}: no column {self.text_field!r} (columns: {columns}); "
                "pass --text-field NAME"
            )
        if not isinstance(value, str):
            return ""
        return value

    def _malformed(self, chunk: Chunk, i: int, why: str, stats: dict) -> None:
        if self.skip_malformed:
            stats["malformed_skipped"] += 1
            return None
        where = (
            f"line {chunk.first_line + i}"
            if chunk.first_line is not None
            else f"record {i + 1} of the block at byte {chunk.start_offset}"
        )
        raise KolmError(
            f"{chunk.source}, {where}: {why}. Fix the line, choose the field with --text-field, "
            "or pass --skip-malformed to skip and count such lines"
        )


def bundled_corpus_files() -> list[str]:
    """The Korean texts shipped inside the konlpy wheel (constitution and bills), as paths.

    Located through the installed distribution's metadata; konlpy's code is never imported.
    """
    try:
        dist = importlib.metadata.distribution("konlpy")
    except importlib.metadata.PackageNotFoundError as e:
        raise KolmError(
            "the bundled demo corpus comes from the `konlpy` package, which is not installed: "
            "`pip install 'kolm[demo]'` (or `pip install konlpy`), or pass --corpus PATH"
        ) from e
    files = sorted(
        str(dist.locate_file(f))
        for f in dist.files or []
        if "/data/corpus/" in str(f).replace(os.sep, "/") and str(f).endswith(".txt")
    )
    if not files:
        raise KolmError("the installed konlpy package has no corpus files; pass --corpus PATH")
    return files
