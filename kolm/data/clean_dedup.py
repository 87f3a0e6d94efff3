"""Deduplication on datatrove: exact (a 64-bit hash of the normalized text), then near (datatrove's
four MinHash steps).

Shingles for Korean: character n-grams (default 5) of the text with all whitespace removed.
Word n-grams would need a segmentation: eojeol carry particles and endings, so one edited
particle changes a whole word and spacing varies between copies of the same text, and Kiwi's
morphemes cost about 20 thousand characters a second. Five Hangul syllables span about two
eojeol, are rare enough not to collide across unrelated documents, and ignore spacing
differences. The shingles are hashed in numpy, so signatures cost little beyond datatrove's
own permutation step.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig

from kolm.data.clean_config import DedupConfig
from kolm.data.clean_normalize import CharClass

_SPACE = re.compile(r"\s+")
_SPACES = CharClass(r"\s+")
_JOIN = "\ue000"
_MERSENNE = np.uint64((1 << 61) - 1)  # datatrove's modulus for the permutations
_MULT = np.uint64(0x100000001B3)


def exact_content(doc: Document) -> str:
    """What exact dedup hashes: the whole normalized text."""
    return doc.text


def exact_config() -> ExactDedupConfig:
    return ExactDedupConfig(content_getter=exact_content, hash_config=HashConfig(precision=64, hash_fc="xxhash"))


def minhash_config(cfg: DedupConfig) -> MinhashConfig:
    return MinhashConfig(n_grams=cfg.ngram_chars, num_buckets=cfg.num_buckets,
                         hashes_per_bucket=cfg.hashes_per_bucket, seed=cfg.seed,
                         hash_config=HashConfig(precision=64, hash_fc="xxhash"))


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads a polynomial hash over all 64 bits."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _squeeze(text: str) -> str:
    return _SPACE.sub("", text.lower())


def _ngram_hashes(codes: np.ndarray, n: int) -> np.ndarray:
    """Mixed polynomial hashes of every length-``n`` window of ``codes`` (len(codes) >= n)."""
    count = len(codes) - n + 1
    with np.errstate(over="ignore"):
        h = np.zeros(count, dtype=np.uint64)
        for k in range(n):
            h = h * _MULT + codes[k:k + count]
        return _mix(h)


def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)


def char_shingles(text: str, n: int) -> np.ndarray:
    """Hashes of the character n-grams of ``text`` without whitespace, shape (N, 1); a text shorter
    than ``n`` is one shingle, an empty one none."""
    codes = _codes(_squeeze(text))
    if not len(codes):
        return np.zeros((0, 1), dtype=np.uint64)
    return _ngram_hashes(codes, min(n, len(codes))).reshape(-1, 1)


def _squeezed_codes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The code points of ``_squeeze`` of every text, concatenated, and each text's length: the
    texts joined by a private-use character (which, like the ends of a text, no case rule looks
    across), lowercased and stripped of whitespace in one go."""
    joined = _JOIN.join(texts)
    if joined.count(_JOIN) != max(len(texts) - 1, 0):  # a text holds the joiner itself: one by one
        squeezed = [_squeeze(t) for t in texts]
        return _codes("".join(squeezed)), np.array([len(t) for t in squeezed], dtype=np.int64)
    codes = np.frombuffer(joined.lower().encode("utf-32-le"), dtype=np.uint32)
    joints = np.flatnonzero(codes == ord(_JOIN))
    kept = ~_SPACES(codes)
    kept[joints] = False
    total = np.concatenate([[0], np.cumsum(kept, dtype=np.int64)])
    starts, ends = np.concatenate([[0], joints + 1]), np.concatenate([joints, [len(codes)]])
    lengths = total[ends] - total[starts] if texts else np.zeros(0, dtype=np.int64)
    return codes[kept].astype(np.uint64), lengths


def batch_shingles(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """``char_shingles`` of many texts at once: all shingles in order, and the count per text."""
    codes, lengths = _squeezed_codes(texts)
    if len(codes) < n or (lengths < n).any():  # rare: texts shorter than n, one by one
        parts = [char_shingles(t, n).ravel() for t in texts]
        return (np.concatenate(parts) if parts else np.zeros(0, np.uint64)), np.array([len(p) for p in parts])
    hashes = _ngram_hashes(codes, n)
    # keep the windows that start and end inside one text
    ends = np.cumsum(lengths)
    valid = np.zeros(len(hashes), dtype=bool)
    counts = lengths - n + 1
    starts = ends - lengths
    idx = np.repeat(starts, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    valid[idx] = True
    return hashes[valid], counts


def sig_dtype(config: MinhashConfig) -> np.dtype:
    """One record of datatrove's signature files: a bucket's hashes, then the document index."""
    fmt = "<u8" if config.hash_config.precision == 64 else "<u4"
    return np.dtype([(f"h{i}", fmt) for i in range(config.hashes_per_bucket)] + [("doc", "<u4")])


def sort_order(keys: list[np.ndarray]) -> np.ndarray:
    """``np.lexsort(keys[::-1])`` (the first key most significant) for keys that together are
    unique, several times faster: sorts on the first key, then only the runs of equal values on the
    next key, and so on. The runs shrink fast: after two hashes, only exact copies tie."""
    order = np.arange(len(keys[0]))
    at = order.copy()  # positions (in the order so far) inside runs of equal keys
    run = np.zeros(len(order), dtype=np.int64)  # each such position's run, ascending
    for level, key in enumerate(keys):
        sub = order[at]
        values = key[sub]
        perm = np.argsort(values) if level == 0 else np.lexsort([values, run])
        order[at] = sub[perm]
        values = values[perm]
        same = (values[1:] == values[:-1]) & (run[1:] == run[:-1])
        if not same.any():
            break
        tied = np.zeros(len(at), dtype=bool)
        tied[1:] = same
        tied[:-1] |= same
        starts = np.concatenate([[True], ~same])
        run = np.cumsum(starts)[tied]
        at = at[tied]
    return order


class KoreanMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash step 1 with character n-gram shingles, computed for many documents at a
    time: the same permutations (datatrove's parameters) and the same signature files, sorted as
    datatrove's steps 2-4 expect, at a fraction of the per-document cost."""

    name = "MinHash signatures (character n-grams)"
    BATCH_SHINGLES = 1 << 16  # characters of text shingled at a time
    BLOCK_ROWS = 256  # shingles permuted at a time: each (rows x hashes) array (~230 KB) stays in a core's cache
    HELD_BYTES = 1 << 27  # signature records a task holds in memory to sort them before writing (~140k documents)

    def __init__(self, output_folder: str, config: MinhashConfig):
        super().__init__(output_folder, config=config, language="ko")

    def get_shingles(self, text: str) -> np.ndarray:
        return char_shingles(text, self.config.n_grams)

    def run(self, data, rank: int = 0, world_size: int = 1):
        names = [f"bucket_{b:03d}/{rank:05d}.minhash.sig" for b in range(self.config.num_buckets)]
        files = [self.output_folder.open(name, mode="wb") for name in names]
        held: list[list[np.ndarray]] = [[] for _ in names]  # each bucket's records not yet on disk
        spilled = False
        texts, ids, chars, size = [], [], 0, 0
        for doc_idx, doc in enumerate(data):
            texts.append(doc.text)
            ids.append(doc_idx)
            chars += len(doc.text)
            if chars >= self.BATCH_SHINGLES:
                size += self._add_batch(texts, ids, held)
                texts, ids, chars = [], [], 0
                if size > self.HELD_BYTES:  # a big task: to disk now, sorted from the files at the end
                    self._write(held, files, sort=False)
                    spilled, size = True, 0
        if texts:
            self._add_batch(texts, ids, held)
        self._write(held, files, sort=not spilled)
        for f in files:
            f.close()
        if spilled:
            for name in names:
                self._sort_bucket(name)

    def _add_batch(self, texts: list[str], ids: list[int], held: list[list[np.ndarray]]) -> int:
        """Each bucket's signature records of a batch of documents, added to ``held``; returns their bytes."""
        shingles, counts = batch_shingles(texts, self.config.n_grams)
        keep = counts > 0  # a document without text has no signature (as in datatrove)
        if not keep.any():
            return 0
        counts = counts[keep]
        mins = self._minima(shingles, counts)
        doc_ids = np.asarray(ids, dtype=np.uint32)[keep]
        hpb, dtype = self.config.hashes_per_bucket, sig_dtype(self.config)
        for bucket, kept in enumerate(held):
            records = np.empty(len(doc_ids), dtype=dtype)
            for i in range(hpb):
                records[f"h{i}"] = mins[:, bucket * hpb + i]
            records["doc"] = doc_ids
            kept.append(records)
        return len(doc_ids) * dtype.itemsize * len(held)

    def _write(self, held: list[list[np.ndarray]], files: list, sort: bool) -> None:
        """Append the held records to the bucket files (sorted, where they are all of the task's)."""
        dtype = sig_dtype(self.config)
        for kept, f in zip(held, files):
            records = np.concatenate(kept) if kept else np.zeros(0, dtype=dtype)
            if sort:
                records = records[sort_order([records[name] for name in dtype.names])]
            f.write(records.tobytes())
            kept.clear()

    def _minima(self, shingles: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Each document's minimum over its shingles of every permutation (a document's shingles
        are ``counts[i]`` consecutive entries), in blocks of rows that stay in the CPU cache."""
        starts = np.cumsum(counts) - counts
        mins = np.empty((len(counts), self.num_hashes), dtype=np.uint64)
        cuts = np.searchsorted(starts, np.arange(self.BLOCK_ROWS, len(shingles), self.BLOCK_ROWS))
        cuts = np.unique(np.concatenate([[0], cuts, [len(counts)]]))
        for d0, d1 in zip(cuts[:-1], cuts[1:]):
            r1 = starts[d1] if d1 < len(counts) else len(shingles)
            phv = self._permute(shingles[starts[d0]:r1].reshape(-1, 1))
            np.minimum.reduceat(phv, starts[d0:d1] - starts[d0], axis=0, out=mins[d0:d1])
        return mins

    def _buffers(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Two (rows x hashes) work arrays, reused across blocks: allocating arrays of this size
        anew for every block costs more than the arithmetic (fresh pages from the OS each time)."""
        if getattr(self, "_work", None) is None or len(self._work[0]) < rows:
            shape = (max(rows, self.BLOCK_ROWS), self.num_hashes)
            self._work = (np.empty(shape, dtype=np.uint64), np.empty(shape, dtype=np.uint64))
        return self._work[0][:rows], self._work[1][:rows]

    def _permute(self, x: np.ndarray) -> np.ndarray:
        """datatrove's ``(x * a + b) % (2**61 - 1)`` (with its 64-bit wraparound), the modulus taken
        with shifts and masks: the same values, without a division per entry. The result is a view
        of a work buffer, valid until the next call."""
        a, b = self.parameters
        v, high = self._buffers(len(x))
        with np.errstate(over="ignore"):
            np.multiply(x, a, out=v)
            v += b
        np.right_shift(v, np.uint64(61), out=high)
        v &= _MERSENNE
        v += high  # now at most modulus + 7: subtract it where it fits (almost never: a read to check)
        if v.max() >= _MERSENNE:
            np.subtract(v, _MERSENNE, out=high)  # unsigned: v - M wraps above v where v < M
            np.minimum(v, high, out=v)
        if self.config.hash_config.precision == 32:
            v &= np.uint64(self.config.hash_config.max)
        return v

    def _sort_bucket(self, path: str) -> None:
        dtype = sig_dtype(self.config)
        with self.output_folder.open(path, mode="rb") as f:
            records = np.frombuffer(f.read(), dtype=dtype)
        records = records[sort_order([records[name] for name in dtype.names])]
        with self.output_folder.open(path, mode="wb") as f:
            f.write(records.tobytes())


class ExactDrops:
    """The line numbers of task ``rank``'s exact copies, from exact dedup's step 2 files: the
    documents datatrove's step 3 (ExactDedupFilter) drops."""

    def __init__(self, dups_folder: str):
        self.folder = Path(dups_folder)

    def __call__(self, rank: int, lines: int) -> np.ndarray:
        files = sorted(self.folder.glob(f"*/{rank:05d}.c4_dup"))
        found = np.sort(np.concatenate([np.fromfile(f, dtype="<u4") for f in files] or [np.zeros(0, "<u4")]))
        if len(np.unique(found)) != len(found) or (len(found) and found[-1] >= lines):
            raise RuntimeError(f"exact dedup: task {rank}'s duplicate list does not fit its {lines} documents")
        return found.astype(np.int64)


class MinhashDrops:
    """The line numbers of task ``rank``'s documents that MinHash clustering removes (step 3's
    ``.remove`` file), as datatrove's step 4 (MinhashDedupFilter) reads them: in file order, until
    a number does not exceed the one before."""

    def __init__(self, remove_folder: str):
        self.folder = Path(remove_folder)

    def __call__(self, rank: int, lines: int) -> np.ndarray:
        path = self.folder / f"{rank:06d}.remove"
        found = np.fromfile(path, dtype="<u4").astype(np.int64) if path.is_file() else np.zeros(0, np.int64)
        rising = np.flatnonzero(np.diff(found) <= 0)
        if len(rising):
            found = found[:rising[0] + 1]
        return found[found < lines]


class MinhashBuckets(MinhashDedupBuckets):
    """datatrove's MinHash step 2 (one task per bucket), vectorized: instead of merging the sorted
    signature files record by record in a heap, each range of first hashes is sorted in numpy and
    equal neighbours become duplicate pairs. The pairs, and their order, are the ones datatrove's
    heap writes (its order is signature, then file, then document), so step 3 reads the same file."""

    WINDOW_RECORDS = 1 << 22  # records sorted at a time: ~300 MB

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if world_size != self.config.num_buckets:
            raise ValueError(f"one task per bucket: {world_size} tasks for {self.config.num_buckets} buckets")
        files = self.input_folder.list_files(subdirectory=f"bucket_{rank:03d}")
        dtype = sig_dtype(self.config)
        sigs = [self._load(f, dtype) for f in files]
        stems = np.array([int(Path(f).name.removesuffix(".minhash.sig")) for f in files], dtype=np.uint32)
        windows = max(1, math.ceil(sum(len(s) for s in sigs) / self.WINDOW_RECORDS))
        bounds = [int(i * (1 << 64) / windows) for i in range(windows)] + [1 << 64]
        with self.output_folder.open(f"{rank:05d}_00.dups", mode="wb") as out:
            for lo, hi in zip(bounds, bounds[1:]):
                out.write(self._pairs(sigs, stems, lo, hi).tobytes())

    def _load(self, name: str, dtype: np.dtype) -> np.ndarray:
        path = os.path.join(self.input_folder.path, name)
        if os.path.getsize(path) == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def _pairs(self, sigs: list[np.ndarray], stems: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """(file, doc, file, doc) of each pair of neighbours with equal signatures whose first hash
        lies in [lo, hi), as uint32 rows."""
        hpb = self.config.hashes_per_bucket
        parts, owners = [], []
        for i, s in enumerate(sigs):
            first = s["h0"]
            a = int(np.searchsorted(first, np.uint64(lo), "left"))
            b = len(s) if hi >= 1 << 64 else int(np.searchsorted(first, np.uint64(hi), "left"))
            if b > a:
                parts.append(np.asarray(s[a:b]))
                owners.append(np.full(b - a, i, dtype=np.uint32))
        if not parts:
            return np.zeros((0, 4), dtype=np.uint32)
        rec, owner = np.concatenate(parts), np.concatenate(owners)
        hashes = [rec[f"h{i}"] for i in range(hpb)]
        order = sort_order([*hashes, owner, rec["doc"]])
        same = np.ones(len(order) - 1, dtype=bool)
        for h in hashes:
            sorted_h = h[order]
            same &= sorted_h[1:] == sorted_h[:-1]
        k = np.nonzero(same)[0]
        docs, files = rec["doc"][order], stems[owner[order]]
        return np.stack([files[k], docs[k], files[k + 1], docs[k + 1]], axis=1).astype("<u4")


class ExactSignature(ExactDedupSignature):
    """datatrove's exact-dedup step 1, passing the documents on, so that the MinHash signatures can
    be computed in the same pass."""

    def run(self, data, rank: int = 0, world_size: int = 1):
        if self.config.document_priority is not None:
            raise ValueError("kolm's exact dedup gives every document the same priority")
        signatures = []
        content, digest = self.config.content_getter, self.hash_fc
        for doc_idx, doc in enumerate(data):
            signatures.append((digest(content(doc)), 1, doc_idx))  # get_hashes, without its call overhead
            yield doc
        self.save_hashes(rank, signatures)


def count_exact_duplicates(dups_folder: Path) -> int:
    """Documents exact dedup marks as copies (datatrove's step 2 writes one uint32 per copy)."""
    return sum(p.stat().st_size // 4 for p in dups_folder.rglob("*.c4_dup")) if dups_folder.is_dir() else 0


class TaskSplit(PipelineStep):
    """Several independent steps as the tasks of one stage: ``parts`` lists (step, tasks), and
    task ``rank`` runs the step it falls to as that step's own task (so that one pool of workers
    runs them side by side, instead of one stage after another)."""

    type = "kolm"
    name = "task split"

    def __init__(self, parts: list[tuple[PipelineStep, int]]):
        super().__init__()
        self.parts = parts

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if world_size != sum(tasks for _, tasks in self.parts):
            raise ValueError(f"{world_size} tasks for parts of {[tasks for _, tasks in self.parts]} tasks")
        for step, tasks in self.parts:
            if rank < tasks:
                return step.run(data, rank, tasks)
            rank -= tasks
