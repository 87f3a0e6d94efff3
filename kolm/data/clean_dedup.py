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

import re

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupFilter
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupFilter, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig

from kolm.data.clean_config import DedupConfig

_SPACE = re.compile(r"\s+")
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


def batch_shingles(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """``char_shingles`` of many texts at once: all shingles in order, and the count per text."""
    squeezed = [_squeeze(t) for t in texts]
    lengths = np.array([len(t) for t in squeezed], dtype=np.int64)
    codes = _codes("".join(squeezed))
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


class KoreanMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash step 1 with character n-gram shingles, computed for many documents at a
    time: the same permutations (datatrove's parameters) and the same signature files, sorted as
    datatrove's steps 2-4 expect, at a fraction of the per-document cost."""

    name = "MinHash signatures (character n-grams)"
    BATCH_SHINGLES = 1 << 16  # rows of the (shingles x hashes) matrix per batch: ~60 MB

    def __init__(self, output_folder: str, config: MinhashConfig):
        super().__init__(output_folder, config=config, language="ko")

    def get_shingles(self, text: str) -> np.ndarray:
        return char_shingles(text, self.config.n_grams)

    def _record_dtype(self) -> np.dtype:
        fmt = f"<{self.config.hash_config.struct_format.lower().replace('q', 'u8').replace('i', 'u4')}"
        return np.dtype([(f"h{i}", fmt) for i in range(self.config.hashes_per_bucket)] + [("doc", "<u4")])

    def run(self, data, rank: int = 0, world_size: int = 1):
        files = [self.output_folder.open(f"bucket_{b:03d}/{rank:05d}.minhash.sig", mode="wb")
                 for b in range(self.config.num_buckets)]
        texts, ids, chars = [], [], 0
        for doc_idx, doc in enumerate(data):
            texts.append(doc.text)
            ids.append(doc_idx)
            chars += len(doc.text)
            if chars >= self.BATCH_SHINGLES:
                self._write_batch(texts, ids, files)
                texts, ids, chars = [], [], 0
        if texts:
            self._write_batch(texts, ids, files)
        for f in files:
            f.close()
        for b in range(self.config.num_buckets):
            self._sort_bucket(f"bucket_{b:03d}/{rank:05d}.minhash.sig")

    def _write_batch(self, texts: list[str], ids: list[int], files: list) -> None:
        shingles, counts = batch_shingles(texts, self.config.n_grams)
        keep = counts > 0  # a document without text has no signature (as in datatrove)
        if not keep.any():
            return
        a, b = self.parameters
        with np.errstate(over="ignore"):
            phv = (shingles.reshape(-1, 1) * a + b) % _MERSENNE
        if self.config.hash_config.precision == 32:
            phv = np.bitwise_and(phv, self.config.hash_config.max)
        counts = counts[keep]
        mins = np.minimum.reduceat(phv, np.cumsum(counts) - counts, axis=0)
        doc_ids = np.asarray(ids, dtype=np.uint32)[keep]
        hpb, dtype = self.config.hashes_per_bucket, self._record_dtype()
        for bucket, f in enumerate(files):
            records = np.empty(len(doc_ids), dtype=dtype)
            for i in range(hpb):
                records[f"h{i}"] = mins[:, bucket * hpb + i]
            records["doc"] = doc_ids
            f.write(records.tobytes())

    def _sort_bucket(self, path: str) -> None:
        dtype = self._record_dtype()
        with self.output_folder.open(path, mode="rb") as f:
            records = np.frombuffer(f.read(), dtype=dtype).copy()
        records.sort(order=dtype.names)
        with self.output_folder.open(path, mode="wb") as f:
            f.write(records.tobytes())


class ExactFilter(ExactDedupFilter):
    """datatrove's exact-dedup step 3 without its per-document statistics (kolm counts documents
    itself; datatrove's counters cost more than the filtering)."""

    def stat_update(self, *labels, value: int = 1, unit: str | None = None) -> None:
        pass


class MinhashFilter(MinhashDedupFilter):
    """datatrove's MinHash step 4 without its per-document statistics."""

    def stat_update(self, *labels, value: int = 1, unit: str | None = None) -> None:
        pass
