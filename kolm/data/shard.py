"""`kolm shard`: tokenize a corpus once, offline, into MMIDIDX shards described by a manifest.

One process reads the corpus in order and writes shards; a pool of workers normalizes and
tokenizes chunks. Output depends only on the inputs, the tokenizer and the options, never on
the number of workers or array tasks. Work is journaled per unit so a killed run resumes.

Output directory::

    manifest.json                 written last: the dataset is complete when it exists
    train/UUUUUU-KKKK.bin|.idx    shard K of unit U
    valid/UUUUUU-KKKK.bin|.idx
    .work/plan.json               what is being built (checked on every restart)
    .work/unit-UUUUUU.json        journal of a unit in progress
    .work/unit-UUUUUU.done.json   a finished unit: its shards and statistics
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kolm.data import manifest as mf
from kolm.data.corpus import (
    DOCUMENTS,
    FIRST,
    LAST,
    NORMALIZATION,
    WHOLE,
    Chunk,
    Decoder,
    InputFile,
    Unit,
    check_documents,
    find_inputs,
    iter_chunks,
    plan_units,
)
from kolm.data.indexed import token_dtype, write_index
from kolm.data.jobs import check_at_least, check_out_dir, check_tasks, wait_for_plan
from kolm.data.tokenizer import TokenizerInfo, load_tokenizer_info
from kolm.errors import KolmError
from kolm.files import atomic_write_json, fsync_dir, read_json, sha256_file, sha256_update
from kolm.log import say, warn

SPLITS = mf.SPLITS
WORK = ".work"
OWNED = (mf.MANIFEST, WORK, *SPLITS)


@dataclass(frozen=True)
class ShardOptions:
    """Every option that changes the output bytes (and so is recorded in the manifest)."""

    valid_fraction: float = 0.001
    text_field: str = "text"
    skip_malformed: bool = False
    max_shard_tokens: int = 1 << 28
    unit_bytes: int = 256 << 20
    chunk_docs: int = 4096  # per chunk sent to a worker (and at most chunk_bytes of text)
    chunk_bytes: int = 1 << 20
    piece_bytes: int = 1 << 20
    documents: str = DOCUMENTS[0]  # how .txt input holds documents: lines, paragraphs or files

    def validate(self) -> None:
        if self.documents not in DOCUMENTS:
            raise KolmError(f"--documents {self.documents!r}: choose one of {', '.join(DOCUMENTS)}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise KolmError(f"--valid-fraction {self.valid_fraction} must be in [0, 1)")
        for name in ("max_shard_tokens", "unit_bytes", "chunk_docs", "chunk_bytes"):
            if getattr(self, name) < 1:
                raise KolmError(f"{name} must be positive, got {getattr(self, name)}")
        if self.piece_bytes < 64:
            raise KolmError(f"piece_bytes must be at least 64, got {self.piece_bytes}")

    def as_dict(self) -> dict:
        return {**asdict(self), "normalization": NORMALIZATION}


# --------------------------------------------------------------------------- tokenizer workers

_worker: dict = {}


def _init_worker(tokenizer_json: str, eos_id: int, dtype: str, options: ShardOptions) -> None:
    from tokenizers import Tokenizer

    _worker.update(
        tok=Tokenizer.from_file(tokenizer_json),
        eos=eos_id,
        dtype=np.dtype(dtype),
        threshold=int(options.valid_fraction * (1 << 64)),
        decoder=Decoder(options.text_field, options.skip_malformed),
    )


def _split_of(text: str) -> str:
    """Stable split by a hash of the normalized text: duplicates always land together."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"kolm-split").digest()
    return "valid" if int.from_bytes(digest, "little") < _worker["threshold"] else "train"


def tokenize_chunk(chunk: Chunk) -> dict:
    """Worker: normalize, split and tokenize one chunk; returns token arrays per split."""
    # A long document arrives as several piece chunks: count its record once, on the first.
    stats: Counter = Counter(records=len(chunk.records) if chunk.piece in (WHOLE, FIRST) else 0)
    decoder: Decoder = _worker["decoder"]
    texts = []
    for i, record in enumerate(chunk.records):
        text = decoder.text(chunk, i, record, stats)
        if text is None:
            continue
        if not text and chunk.piece == WHOLE:
            stats["skipped_empty"] += 1
            continue
        texts.append(text)
    if chunk.piece != WHOLE:
        return _tokenize_piece(texts[0] if texts else "", chunk.piece, stats)
    ids = {s: [] for s in SPLITS}
    lengths = {s: [] for s in SPLITS}
    chars = dict.fromkeys(SPLITS, 0)
    eos, hashed = _worker["eos"], _worker["threshold"] > 0
    for text, enc in zip(texts, _worker["tok"].encode_batch_fast(texts, add_special_tokens=False)):
        doc = enc.ids  # a fresh list per call: EOS can go on in place
        doc.append(eos)
        split = _split_of(text) if hashed else "train"
        ids[split].extend(doc)
        lengths[split].append(len(doc))
        chars[split] += len(text)
    dtype = _worker["dtype"]
    docs = {s: (np.array(ids[s], dtype=dtype), np.array(lengths[s], dtype=np.int32), chars[s]) for s in SPLITS}
    return {"docs": docs, "piece": None, "stats": stats}


def _tokenize_piece(text: str, piece: int, stats: Counter) -> dict:
    ids = _worker["tok"].encode(text, add_special_tokens=False).ids if text else []
    if piece == LAST:
        ids = [*ids, _worker["eos"]]
    if piece == FIRST:
        stats["long_documents"] += 1
    split = _split_of(text) if piece == FIRST else None
    tokens = np.array(ids, dtype=_worker["dtype"])
    return {"docs": None, "piece": (split, tokens, piece == LAST, len(text)), "stats": stats}


class TokenizerPool:
    """A process pool that tokenizes chunks and yields results in input order, with a bounded
    number of chunks in flight so memory stays flat however large the corpus is."""

    def __init__(self, tok: TokenizerInfo, dtype: np.dtype, options: ShardOptions, workers: int):
        # Each worker tokenizes single-threaded; parallelism comes from the pool.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.max_in_flight = 3 * workers
        self.pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(str(Path(tok.path) / "tokenizer.json"), tok.eos_id, dtype.str, options),
        )

    def map(self, chunks: Iterable[Chunk]) -> Iterator[dict]:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(self.pool.submit(tokenize_chunk, chunk))
            if len(pending) >= self.max_in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- shard writing


class _Unusable(Exception):
    """A unit's journal does not match the files on disk; the unit restarts from scratch."""


class SplitWriter:
    """Appends one unit's documents of one split to shards, rolling over at a token bound.

    A shard in progress is ``K.bin.partial`` plus a raw int32 ``K.sizes.partial``; closing it
    writes the `.idx` and renames, so a `.bin`/`.idx` pair only ever appears complete.
    """

    def __init__(self, out: Path, unit: int, split: str, dtype: np.dtype, max_tokens: int):
        self.dir = out / split
        self.unit, self.split, self.dtype, self.max_tokens = unit, split, dtype, max_tokens
        self.closed: list[dict] = []
        self.k = 0
        self._reset_open()

    def _reset_open(self) -> None:
        self.docs = self.tokens = self.chars = 0
        self.long_doc: int | None = None  # tokens written so far of a document arriving in pieces
        self.bin = self.sizes = None
        self.hasher = hashlib.sha256()

    def name(self, k: int | None = None) -> str:
        return f"{self.unit:06d}-{self.k if k is None else k:04d}"

    def path(self, suffix: str, k: int | None = None) -> Path:
        return self.dir / f"{self.name(k)}{suffix}"

    def _open(self) -> None:
        if self.bin is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.bin = open(self.path(".bin.partial"), "ab")
            self.sizes = open(self.path(".sizes.partial"), "ab")

    def add_docs(self, tokens: np.ndarray, lengths: np.ndarray, chars: int) -> None:
        if len(lengths) == 0:
            return
        self._open()
        data = tokens.tobytes()
        self.bin.write(data)
        self.hasher.update(data)
        self.sizes.write(lengths.tobytes())
        self.docs += len(lengths)
        self.tokens += len(tokens)
        self.chars += chars

    def add_piece(self, tokens: np.ndarray, last: bool, chars: int, stats: Counter) -> None:
        """Append a piece of a long document; the document ends (with EOS) on the last piece."""
        written = self.long_doc or 0
        if last and written == 0 and len(tokens) == 1:
            stats["skipped_empty"] += 1  # a long line of nothing but whitespace
            self.long_doc = None
            return
        if len(tokens):
            self._open()
            data = tokens.tobytes()
            self.bin.write(data)
            self.hasher.update(data)
            self.tokens += len(tokens)
        self.chars += chars
        self.long_doc = written + len(tokens)
        if last:
            self.sizes.write(np.array([self.long_doc], dtype=np.int32).tobytes())
            self.docs += 1
            self.long_doc = None

    @property
    def full(self) -> bool:
        return self.tokens >= self.max_tokens and self.long_doc is None

    def close_shard(self) -> None:
        """Finish the open shard: write its index, then rename both files into place."""
        if self.bin is None:
            return
        self.sync()
        self.bin.close()
        self.sizes.close()
        idx_tmp = self.path(".idx.partial")
        write_index(idx_tmp, self.path(".sizes.partial"), self.dtype)
        os.replace(self.path(".bin.partial"), self.path(".bin"))
        os.replace(idx_tmp, self.path(".idx"))
        fsync_dir(self.dir)
        self.closed.append(
            {
                "split": self.split,
                "path": f"{self.split}/{self.name()}",
                "documents": self.docs,
                "tokens": self.tokens,
                "characters": self.chars,
                "bin_bytes": self.tokens * self.dtype.itemsize,
                "bin_sha256": self.hasher.hexdigest(),
                "idx_sha256": sha256_file(self.path(".idx")),
            }
        )
        self.k += 1
        self._reset_open()

    def sync(self) -> None:
        if self.bin is not None:
            for f in (self.bin, self.sizes):
                f.flush()
                os.fsync(f.fileno())

    def state(self) -> dict:
        return {
            "closed": self.closed,
            "k": self.k,
            "docs": self.docs,
            "tokens": self.tokens,
            "chars": self.chars,
        }

    def drop_closed_scratch(self) -> None:
        """Remove the size lists of shards the journal already records as closed."""
        for k in range(self.k):
            self.path(".sizes.partial", k).unlink(missing_ok=True)

    def resume(self, state: dict) -> None:
        """Restore from a journal entry, truncating files back to what it recorded."""
        self.closed, self.k = state["closed"], state["k"]
        for entry in self.closed:
            k = int(entry["path"].rsplit("-", 1)[1])
            for suffix in (".bin", ".idx"):
                if not self.path(suffix, k).is_file():
                    raise _Unusable(f"closed shard {entry['path']}{suffix} is missing")
        self._reset_open()
        self.docs, self.tokens, self.chars = state["docs"], state["tokens"], state["chars"]
        partial, final = self.path(".bin.partial"), self.path(".bin")
        self.path(".idx").unlink(missing_ok=True)
        self.path(".idx.partial").unlink(missing_ok=True)
        if self.docs == 0:
            for p in (partial, final, self.path(".sizes.partial")):
                p.unlink(missing_ok=True)
            return
        if not partial.exists() and final.exists():
            os.replace(final, partial)  # closed after the journal was written: reopen it
        nbytes = self.tokens * self.dtype.itemsize
        sizes = self.path(".sizes.partial")
        if not partial.exists() or partial.stat().st_size < nbytes:
            raise _Unusable(f"{partial} is shorter than the journal says")
        if not sizes.exists() or sizes.stat().st_size < self.docs * 4:
            raise _Unusable(f"{sizes} is shorter than the journal says")
        os.truncate(partial, nbytes)
        os.truncate(sizes, self.docs * 4)
        self.hasher = sha256_update(hashlib.sha256(), partial)
        self._open()


class UnitJob:
    """Tokenizes one unit into shards, journaling progress so a killed run can continue."""

    def __init__(self, out: Path, unit: Unit, dtype: np.dtype, options: ShardOptions):
        self.out, self.unit, self.options = out, unit, options
        self.writers = {s: SplitWriter(out, unit.index, s, dtype, options.max_shard_tokens) for s in SPLITS}
        self.stats: Counter = Counter()
        self.chunks_done = 0
        self.long_split = "train"
        self.journal = out / WORK / f"unit-{unit.index:06d}.json"

    @property
    def done_path(self) -> Path:
        return self.out / WORK / f"unit-{self.unit.index:06d}.done.json"

    def intact(self) -> bool:
        """Whether a finished unit's shards are on disk as its record lists them (sizes, sha256)."""
        try:
            shards = read_json(self.done_path)["shards"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        for entry in shards:
            bin_path, idx_path = (self.out / f"{entry['path']}{suffix}" for suffix in (".bin", ".idx"))
            if not (bin_path.is_file() and idx_path.is_file()) or bin_path.stat().st_size != entry["bin_bytes"]:
                return False
            if sha256_file(bin_path) != entry["bin_sha256"] or sha256_file(idx_path) != entry["idx_sha256"]:
                return False
        return True

    def restore(self) -> bool:
        """Continue from the journal if it is consistent with the files; else start clean."""
        if self.journal.is_file():
            state = read_json(self.journal)
            try:
                for s in SPLITS:
                    self.writers[s].resume(state["splits"][s])
                self.stats = Counter(state["stats"])
                self.chunks_done = state["chunks"]
                return True
            except (_Unusable, KeyError) as e:
                warn(f"unit {self.unit.index}: journal unusable ({e}); restarting the unit")
                self.__init__(self.out, self.unit, self.writers["train"].dtype, self.options)
        self._purge()
        return False

    def _purge(self) -> None:
        prefix = f"{self.unit.index:06d}-"
        for s in SPLITS:
            d = self.out / s
            if d.is_dir():
                for p in d.iterdir():
                    if p.name.startswith(prefix):
                        p.unlink()
        self.journal.unlink(missing_ok=True)

    def checkpoint(self) -> None:
        for w in self.writers.values():
            w.sync()
        state = {
            "chunks": self.chunks_done,
            "stats": dict(self.stats),
            "splits": {s: w.state() for s, w in self.writers.items()},
        }
        atomic_write_json(self.journal, state)
        for w in self.writers.values():
            w.drop_closed_scratch()

    def chunks(self) -> Iterator[Chunk]:
        o = self.options
        stream = iter_chunks(self.unit, o.chunk_docs, o.chunk_bytes, o.piece_bytes, o.documents)
        return itertools.islice(stream, self.chunks_done, None)

    def apply(self, result: dict) -> bool:
        """Write one tokenized chunk; returns True when a shard was closed."""
        self.stats.update(result["stats"])
        self.chunks_done += 1
        if result["piece"] is not None:
            split, tokens, last, chars = result["piece"]
            if split is not None:
                self.long_split = split
            self.writers[self.long_split].add_piece(tokens, last, chars, self.stats)
        else:
            for s, (tokens, lengths, chars) in result["docs"].items():
                self.writers[s].add_docs(tokens, lengths, chars)
        rolled = False
        for w in self.writers.values():
            if w.full:
                w.close_shard()
                rolled = True
        return rolled

    @property
    def in_long_document(self) -> bool:
        return any(w.long_doc is not None for w in self.writers.values())

    def finish(self) -> dict:
        for w in self.writers.values():
            w.close_shard()
        shards = [e for s in SPLITS for e in self.writers[s].closed]
        done = {"unit": self.unit.index, "shards": shards, "stats": dict(self.stats)}
        atomic_write_json(self.done_path, done)
        self.journal.unlink(missing_ok=True)
        for w in self.writers.values():
            w.drop_closed_scratch()
        return done


# --------------------------------------------------------------------------- the job


def make_plan(files: list[InputFile], tok: TokenizerInfo, options: ShardOptions) -> dict:
    """Everything that determines the output; a restart must find the same plan."""
    units = plan_units(files, options.unit_bytes, options.documents)
    return {
        **_identity(files, tok, options),
        "mtimes_ns": [f.mtime_ns for f in files],
        "units": [[[s.file.path, s.start, s.end] for s in u.segments] for u in units],
    }


def _identity(files: list[InputFile], tok: TokenizerInfo, options: ShardOptions) -> dict:
    inputs = [{"path": f.path, "format": f.format, "bytes": f.size} for f in files]
    return mf.identity(tok.fingerprint(), token_dtype(tok.vocab_size).name, options.as_dict(), inputs)


def _describe_difference(old: dict, new: dict) -> str:
    keys = [k for k in mf.IDENTITY_KEYS + ("mtimes_ns",) if k in old and old.get(k) != new.get(k)]
    what = {
        "tokenizer": "a different tokenizer",
        "options": "different options",
        "inputs": "different input files",
        "mtimes_ns": "input files that changed since",
        "dtype": "a different token dtype",
    }
    return ", ".join(what.get(k, k) for k in keys) or "a different plan"


def prepare_output(out: Path, plan: dict, overwrite: bool, task_index: int = 0) -> bool:
    """Check the output directory against the plan. Returns True if it is already complete.

    --overwrite replaces output of another plan, and only array task 0 (or a single task) does it;
    the other tasks wait for task 0 to record the new plan. Output of this same plan is never
    removed: finished units stay and a requeued task continues (`run_shard` redoes damaged ones)."""
    if overwrite and _recorded_plan(out) == plan:
        (out / mf.MANIFEST).unlink(missing_ok=True)  # rewritten from the units' records once all are done
    elif overwrite and task_index > 0:
        # Task 0 alone removes: a task that removed too could delete work task 0 has just begun.
        wait_for_plan(out, lambda: _recorded_plan(out) == plan, task_index)
        return False
    elif overwrite:
        _remove_owned(out)
    manifest = out / mf.MANIFEST
    plan_file = out / WORK / "plan.json"
    if manifest.is_file():
        existing = _with_default_documents(read_json(manifest))
        if all(existing.get(k) == plan[k] for k in mf.IDENTITY_KEYS):
            return True
        raise KolmError(
            f"{out} already holds a finished dataset built from {_describe_difference(existing, plan)}; "
            "choose another --out, or pass --overwrite to replace it"
        )
    if plan_file.is_file():
        existing = _with_default_documents(read_json(plan_file))
        if existing != plan:
            raise KolmError(
                f"{out} holds unfinished work from {_describe_difference(existing, plan)}; "
                "re-run the original command to finish it, choose another --out, or pass --overwrite"
            )
        return False
    for s in SPLITS:
        if (out / s).is_dir() and any((out / s).iterdir()):
            raise KolmError(f"{out / s} already holds files not made by this run; choose another --out")
    (out / WORK).mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_file, plan)
    return False


def _recorded_plan(out: Path) -> dict | None:
    """The plan of the work in ``out`` (None when there is none, or it cannot be read)."""
    try:
        return _with_default_documents(read_json(out / WORK / "plan.json"))
    except (OSError, ValueError):
        return None


def _remove_owned(out: Path) -> None:
    for name in OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _with_default_documents(recorded: dict) -> dict:
    """A plan or manifest written before ``documents`` was an option read one document per line."""
    options = recorded.get("options")
    if isinstance(options, dict) and "documents" not in options:
        return {**recorded, "options": {**options, "documents": DOCUMENTS[0]}}
    return recorded


def run_shard(
    inputs: list[str],
    tokenizer: str,
    out: str | os.PathLike,
    options: ShardOptions = ShardOptions(),
    workers: int | None = None,
    num_tasks: int = 1,
    task_index: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    checkpoint_seconds: float = 10.0,
) -> dict | None:
    """Shard ``inputs`` into ``out``. Returns the manifest, or None when other array tasks
    still have units to finish (then `kolm shard merge` writes the manifest)."""
    options.validate()
    check_tasks(num_tasks, task_index)
    check_at_least("--workers", workers)
    out = Path(out)
    check_out_dir(out)
    workers = workers or os.cpu_count() or 1
    tok = load_tokenizer_info(tokenizer)
    files = find_inputs(inputs)
    check_documents(options.documents, files)
    plan = make_plan(files, tok, options)
    if prepare_output(out, plan, overwrite, task_index):
        say(f"{out}: already complete; nothing to do")
        return read_json(out / mf.MANIFEST)
    units = [Unit(i, _segments(files, u)) for i, u in enumerate(plan["units"]) if i % num_tasks == task_index]
    dtype = np.dtype(plan["dtype"])
    jobs = [UnitJob(out, u, dtype, options) for u in units]
    if overwrite:
        _forget_damaged(jobs)
    todo = [j for j in jobs if not j.done_path.is_file()]
    if len(todo) < len(jobs):
        say(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} units already done")
    if todo:
        _run_units(todo, tok, dtype, options, workers, progress, checkpoint_seconds)
    missing = _missing_units(out, len(plan["units"]))
    if missing:
        say(f"task {task_index}/{num_tasks} done; {len(missing)} units belong to other tasks. "
            f"After all tasks finish, run `kolm shard merge {out}`")
        return None
    return finalize(out)


def _forget_damaged(jobs: list[UnitJob]) -> None:
    """With --overwrite: a finished unit whose shards no longer match its record is done again."""
    for job in jobs:
        if job.done_path.is_file() and not job.intact():
            warn(f"unit {job.unit.index}: its shards differ from its record; rebuilding the unit")
            job.done_path.unlink()


def _segments(files: list[InputFile], unit: list) -> tuple:
    from kolm.data.corpus import Segment

    by_path = {f.path: f for f in files}
    return tuple(Segment(by_path[p], start, end) for p, start, end in unit)


def _run_units(jobs, tok, dtype, options, workers, progress, checkpoint_seconds) -> None:
    from tqdm import tqdm

    pool = TokenizerPool(tok, dtype, options, workers)
    bar = tqdm(unit="tok", unit_scale=True, disable=not progress, file=sys.stderr, mininterval=1.0)
    started, docs = time.monotonic(), 0  # documents read by this invocation, for docs/s
    try:
        for n, job in enumerate(jobs):
            resumed = job.restore()
            if resumed:
                bar.write(f"unit {job.unit.index}: continuing after {job.chunks_done} chunks")
            last = time.monotonic()
            for result in pool.map(job.chunks()):
                before = job.stats["records"]
                rolled = job.apply(result)
                docs += job.stats["records"] - before
                bar.update(_result_tokens(result))
                rate = docs / max(time.monotonic() - started, 1e-6)
                bar.set_postfix(unit=f"{n + 1}/{len(jobs)}", docs=f"{docs:,}", docs_s=f"{rate:,.0f}", refresh=False)
                due = time.monotonic() - last >= checkpoint_seconds
                if (rolled or due) and not job.in_long_document:
                    job.checkpoint()
                    last = time.monotonic()
            job.finish()
    finally:
        bar.close()
        pool.close()


def _result_tokens(result: dict) -> int:
    if result["piece"] is not None:
        return len(result["piece"][1])
    return sum(len(tokens) for tokens, _, _ in result["docs"].values())


def _missing_units(out: Path, count: int) -> list[int]:
    return [i for i in range(count) if not (out / WORK / f"unit-{i:06d}.done.json").is_file()]


def finalize(out: str | os.PathLike) -> dict:
    """Combine every unit's results into `manifest.json` (the `kolm shard merge` step)."""
    out = Path(out)
    plan_file = out / WORK / "plan.json"
    if (out / mf.MANIFEST).is_file():
        return read_json(out / mf.MANIFEST)
    if not plan_file.is_file():
        raise KolmError(f"{out}: no sharding work found (no {WORK}/plan.json); run `kolm shard` first")
    plan = read_json(plan_file)
    missing = _missing_units(out, len(plan["units"]))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise KolmError(
            f"{out}: {len(missing)} of {len(plan['units'])} units are not finished (units {shown}); "
            "re-run the array tasks that own them (unit i belongs to task i mod num_tasks)"
        )
    shards: list[dict] = []
    stats: Counter = Counter()
    for i in range(len(plan["units"])):
        done = read_json(out / WORK / f"unit-{i:06d}.done.json")
        shards.extend(done["shards"])
        stats.update(done["stats"])
    manifest = mf.build(plan, shards, stats)
    atomic_write_json(out / mf.MANIFEST, manifest)
    return manifest
