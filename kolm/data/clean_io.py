"""Reading and writing for `kolm clean`, as datatrove pipeline steps.

One datatrove task is one work unit of kolm's corpus reader (`kolm.data.corpus.plan_units`), so
the tasks, and every file written per task, depend only on the inputs, never on the number of
workers. Records keep all their fields: a document carries its input record in
``metadata["record"]`` and the writers put the cleaned text back into that record.

Each kolm step counts what it did per task into ``counts/STEP-TASK.json`` in the work directory;
the report adds those files up.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from kolm.data.corpus import FIRST, MIDDLE, WHOLE, Chunk, Decoder, Unit, iter_chunks

CHUNK_DOCS, CHUNK_BYTES, PIECE_BYTES = 4096, 1 << 20, 1 << 20
OUTPUT_LEVEL = 6  # gzip level of the output files


class CountingStep(PipelineStep):
    """A kolm step that counts per task and keeps a few examples of what it removed."""

    type = "kolm"
    name = "step"

    def __init__(self, counts_dir: str, examples: int = 0):
        super().__init__()
        self.counts_dir = counts_dir
        self.examples_wanted = examples
        self.counts: Counter = Counter()
        self.examples: dict[str, list[dict]] = {}

    def removed(self, why: str, doc: Document) -> None:
        """Count a dropped document under ``removed_<why>``, keeping the first few as examples."""
        self.counts[f"removed_{why}"] += 1
        kept = self.examples.setdefault(why, [])
        if len(kept) < self.examples_wanted:
            kept.append({"id": doc.id, "text": doc.text[:2000]})

    def save(self, rank: int) -> None:
        """Write this task's counts (called once the step has seen every document)."""
        save_counts(self.counts_dir, self.name, rank, self.counts, self.examples)


def save_counts(counts_dir: str, step: str, rank: int, counts: Counter, examples: dict[str, list[dict]]) -> None:
    """Write a step's counts for task ``rank`` to ``counts_dir/STEP-TASK.json``."""
    path = Path(counts_dir) / f"{step}-{rank:05d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps({"counts": dict(counts), "examples": examples}, option=orjson.OPT_SORT_KEYS))
    os.replace(tmp, path)


class CorpusReader(CountingStep):
    """Reads work unit ``rank`` of the corpus (kolm's formats) as documents, whole records kept."""

    name = "read"

    def __init__(self, counts_dir: str, units: list[Unit], text_field: str, skip_malformed: bool,
                 documents: str = "lines"):
        super().__init__(counts_dir)
        self.units, self.text_field, self.skip_malformed = units, text_field, skip_malformed
        self.documents = documents

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        decoder = Decoder(self.text_field, self.skip_malformed)
        stats: Counter = Counter()
        n = size = 0  # counted in locals: a Counter update per document costs more than the reading
        pieces: list[str] = []
        for chunk in iter_chunks(self.units[rank], CHUNK_DOCS, CHUNK_BYTES, PIECE_BYTES, self.documents):
            for record in self._records(chunk, decoder, stats, pieces):
                text = record[self.text_field]
                size += len(text.encode("utf-8"))
                yield Document(text=text, id=f"{rank}/{n}", metadata={"record": record})
                n += 1
        if n:
            self.counts.update(documents_read=n, bytes_read=size)
        self.counts.update({k: v for k, v in stats.items() if k in ("repaired_utf8", "malformed_skipped")})
        self.save(rank)

    def _records(self, chunk: Chunk, decoder: Decoder, stats: Counter, pieces: list[str]):
        """Records of a chunk; the pieces of an over-long plain-text document are joined back into one."""
        for i, raw in enumerate(chunk.records):
            record = decoder.record(chunk, i, raw, stats)
            if record is None:
                continue
            if chunk.piece == WHOLE:
                yield record
            elif chunk.piece in (FIRST, MIDDLE):
                pieces.append(record[self.text_field])
            else:
                yield {self.text_field: "".join([*pieces, record[self.text_field]])}
                pieces.clear()


def _dumps(record: dict) -> bytes:
    return orjson.dumps(record, default=str) + b"\n"


class JsonlGzWriter(CountingStep):
    """Writes each task's documents to ``FOLDER/TASK.jsonl.gz`` (``level=0``: ``TASK.jsonl``,
    uncompressed), byte for byte the same on every run (no time or name in the gzip header); the
    cleaned text replaces the record's text field."""

    name = "write"
    BLOCK = 1 << 20  # bytes handed to the compressor at a time

    def __init__(self, counts_dir: str, folder: str, text_field: str, level: int = OUTPUT_LEVEL,
                 step_name: str = "write"):
        super().__init__(counts_dir)
        self.folder, self.text_field, self.level, self.name = folder, text_field, level, step_name

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = Path(self.folder) / (f"{rank:05d}.jsonl.gz" if self.level else f"{rank:05d}.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as raw, compressor(raw, self.level) as out:
            block: list[bytes] = []
            size = docs = text_bytes = 0
            for doc in data:
                record = doc.metadata["record"]
                record[self.text_field] = doc.text
                line = _dumps(record)
                block.append(line)
                size += len(line)
                if size >= self.BLOCK:
                    out.write(b"".join(block))
                    block, size = [], 0
                docs += 1
                text_bytes += len(doc.text.encode("utf-8"))
                yield doc
            out.write(b"".join(block))
        if docs:
            self.counts.update(documents_written=docs, bytes_written=text_bytes)
        os.replace(tmp, path)
        self.save(rank)


def compressor(raw, level: int):
    """A writer into the open file ``raw``: gzip at ``level`` with no time or name in the header (the
    same bytes on every run), or ``raw`` itself for level 0."""
    if not level:
        return contextlib.nullcontext(raw)
    return gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=level, mtime=0)


class PreparedWriter(PipelineStep):
    """The write stage: task ``rank``'s prepared file less the documents that ``drop(rank, lines)``
    names (line numbers), compressed into ``FOLDER/TASK.jsonl.gz``. The prepared lines are already
    the output records, so they are copied as bytes, in the blocks JsonlGzWriter would hand the
    compressor: the file is byte for byte the one that parsing and rewriting them gives."""

    type = "kolm"
    name = "write prepared"

    def __init__(self, counts_dir: str, prepared: str, folder: str, text_field: str, drop=None,
                 kept_name: str | None = None):
        super().__init__()
        self.counts_dir, self.prepared, self.folder, self.text_field = counts_dir, prepared, folder, text_field
        self.drop, self.kept_name = drop, kept_name

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        raw = (Path(self.prepared) / f"{rank:05d}.jsonl").read_bytes()
        ends = np.flatnonzero(np.frombuffer(raw, dtype=np.uint8) == 0x0A) + 1
        starts = np.concatenate([[0], ends[:-1]]).astype(ends.dtype)
        dropped = self.drop(rank, len(ends)) if self.drop else np.zeros(0, dtype=np.int64)
        kept = np.delete(np.arange(len(ends)), dropped)
        path = Path(self.folder) / f"{rank:05d}.jsonl.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as f, compressor(f, OUTPUT_LEVEL) as out:
            for block in _blocks(raw, starts, ends, kept, JsonlGzWriter.BLOCK):
                out.write(block)
        os.replace(tmp, path)
        prepared = json.loads((Path(self.counts_dir) / f"prepared-{rank:05d}.json").read_bytes())["counts"]
        text_bytes = prepared.get("bytes_written", 0) - sum(
            len(orjson.loads(raw[starts[i]:ends[i]])[self.text_field].encode("utf-8")) for i in dropped.tolist())
        if self.kept_name:
            save_counts(self.counts_dir, self.kept_name, rank, Counter(documents=len(kept)), {})
        save_counts(self.counts_dir, "write", rank, Counter(documents_written=len(kept), bytes_written=text_bytes), {})


def _blocks(raw: bytes, starts: np.ndarray, ends: np.ndarray, kept: np.ndarray, size: int):
    """The kept lines of ``raw`` joined into blocks, each ending with the line that brings it to
    ``size`` bytes or more (the last one shorter), as JsonlGzWriter hands them to the compressor."""
    total = np.cumsum(ends[kept] - starts[kept])
    first, base = 0, 0
    while first < len(kept):
        last = min(int(np.searchsorted(total, base + size, side="left")), len(kept) - 1)
        lines = kept[first:last + 1]
        gaps = np.flatnonzero(np.diff(lines) > 1)  # runs of consecutive lines are copied as one slice
        run_starts, run_ends = lines[np.concatenate([[0], gaps + 1])], lines[np.concatenate([gaps, [len(lines) - 1]])]
        yield b"".join(raw[starts[a]:ends[b]] for a, b in zip(run_starts.tolist(), run_ends.tolist()))
        first, base = last + 1, int(total[last])


def load_counts(counts_dir: Path, step: str, tasks: int) -> tuple[Counter, dict[str, list[dict]]]:
    """A step's counts summed over tasks, and its examples in task order."""
    total: Counter = Counter()
    examples: dict[str, list[dict]] = {}
    for rank in range(tasks):
        path = counts_dir / f"{step}-{rank:05d}.json"
        if not path.is_file():
            continue
        saved = json.loads(path.read_bytes())
        total.update(saved["counts"])
        for why, items in saved["examples"].items():
            examples.setdefault(why, []).extend(items)
    return total, examples
