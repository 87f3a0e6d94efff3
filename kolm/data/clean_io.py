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

import orjson
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from kolm.data.corpus import FIRST, MIDDLE, WHOLE, Chunk, Decoder, Unit, iter_chunks

CHUNK_DOCS, CHUNK_BYTES, PIECE_BYTES = 4096, 1 << 20, 1 << 20


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
        path = Path(self.counts_dir) / f"{self.name}-{rank:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps({"counts": dict(self.counts), "examples": self.examples},
                                     option=orjson.OPT_SORT_KEYS))
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
        n = 0
        pieces: list[str] = []
        for chunk in iter_chunks(self.units[rank], CHUNK_DOCS, CHUNK_BYTES, PIECE_BYTES, self.documents):
            for record in self._records(chunk, decoder, stats, pieces):
                text = record[self.text_field]
                self.counts["documents_read"] += 1
                self.counts["bytes_read"] += len(text.encode("utf-8"))
                yield Document(text=text, id=f"{rank}/{n}", metadata={"record": record})
                n += 1
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

    def __init__(self, counts_dir: str, folder: str, text_field: str, level: int = 6, step_name: str = "write"):
        super().__init__(counts_dir)
        self.folder, self.text_field, self.level, self.name = folder, text_field, level, step_name

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = Path(self.folder) / (f"{rank:05d}.jsonl.gz" if self.level else f"{rank:05d}.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as raw, self._compressor(raw) as out:
            block: list[bytes] = []
            size = 0
            for doc in data:
                record = doc.metadata["record"]
                record[self.text_field] = doc.text
                line = _dumps(record)
                block.append(line)
                size += len(line)
                if size >= self.BLOCK:
                    out.write(b"".join(block))
                    block, size = [], 0
                self.counts["documents_written"] += 1
                self.counts["bytes_written"] += len(doc.text.encode("utf-8"))
                yield doc
            out.write(b"".join(block))
        os.replace(tmp, path)
        self.save(rank)

    def _compressor(self, raw):
        if not self.level:
            return contextlib.nullcontext(raw)
        return gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=self.level, mtime=0)


class PreparedReader(PipelineStep):
    """Reads back task ``rank``'s uncompressed file written by JsonlGzWriter (one per task)."""

    type = "kolm"
    name = "read prepared"

    def __init__(self, folder: str, text_field: str):
        super().__init__()
        self.folder, self.text_field = folder, text_field

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = Path(self.folder) / f"{rank:05d}.jsonl"
        with open(path, "rb", buffering=1 << 20) as f:
            for n, line in enumerate(f):
                record = orjson.loads(line)
                yield Document(text=record[self.text_field], id=f"{rank}/{n}", metadata={"record": record})


class Count(CountingStep):
    """Counts the documents that pass this point of the pipeline."""

    def __init__(self, counts_dir: str, step_name: str):
        super().__init__(counts_dir)
        self.name = step_name

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.counts["documents"] += 1
            yield doc
        self.save(rank)


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
