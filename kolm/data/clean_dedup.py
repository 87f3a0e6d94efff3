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
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig

from kolm.data.clean_config import DedupConfig

_SPACE = re.compile(r"\s+")
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


def char_shingles(text: str, n: int) -> np.ndarray:
    """Hashes of the distinct character n-grams of ``text`` without whitespace, shape (N, 1)."""
    codes = np.frombuffer(_SPACE.sub("", text.lower()).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) < n:
        codes = codes if len(codes) else np.zeros(0, dtype=np.uint64)
        n = max(len(codes), 1)
    count = len(codes) - n + 1
    if count <= 0:
        return np.zeros((0, 1), dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = np.zeros(count, dtype=np.uint64)
        for k in range(n):
            h = h * _MULT + codes[k:k + count]
        return np.unique(_mix(h)).reshape(-1, 1)


class KoreanMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash step 1 with character n-gram shingles instead of word n-grams."""

    name = "MinHash signatures (character n-grams)"

    def __init__(self, output_folder: str, config: MinhashConfig):
        super().__init__(output_folder, config=config, language="ko")

    def get_shingles(self, text: str) -> np.ndarray:
        return char_shingles(text, self.config.n_grams)
