"""Korean quality filters as one datatrove step: each check drops a document under its own name.

Order: runs of one character are shortened (a document they dominate is dropped), boilerplate
lines are removed (a document that was mostly boilerplate is dropped), then length, Hangul
share, Gopher-style repetition and spam phrases. Thresholds live in
`kolm.data.clean_config.FilterConfig`.

Words here are eojeol, the space-separated units of Korean text: a repeated spam block repeats
whole eojeol, so Gopher's word rules work on them unchanged, and splitting on spaces runs at
memory speed where a morphological analyser (Kiwi) handles about 20 thousand characters a second.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
from datatrove.data import Document, DocumentsPipeline

from kolm.data.clean_config import FilterConfig
from kolm.data.clean_io import CountingStep
from kolm.data.clean_normalize import CharClass

FILTER_NAMES = ("runs", "boilerplate", "length", "hangul", "repetition", "spam")

_HANGUL = CharClass("[\uac00-\ud7a3\u1100-\u11ff\u3131-\u318e]+")  # syllables and jamo
_LETTERS = CharClass(r"[^\W\d_]+")  # letters of any script (no digits, spaces, punctuation or "_")
_SEPARATORS = re.compile(r"\s*[|·/>›»]\s*")
_HAS_SEPARATOR = re.compile("[|·/>›»]")


def count(pattern: re.Pattern, text: str) -> int:
    """Matches of ``pattern`` in ``text``, counted in C."""
    return pattern.subn("", text)[1]


def hangul_share(text: str) -> float:
    """Hangul among letters (digits, spaces and punctuation do not count); 0 for no letters."""
    return hangul_shares([text])[0]


def _codes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The code points of all ``texts`` in one array, and where each text starts (plus the end)."""
    codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    bounds = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in texts], out=bounds[1:])
    return codes, bounds


def _per_text(mask: np.ndarray, bounds: np.ndarray) -> list[int]:
    total = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    return (total[bounds[1:]] - total[bounds[:-1]]).tolist()


def hangul_shares(texts: list[str]) -> list[float]:
    """``hangul_share`` of many texts, the characters classified in numpy over all of them at once."""
    codes, bounds = _codes(texts)
    letters = _per_text(_LETTERS(codes), bounds)
    hangul = _per_text(_HANGUL(codes), bounds)
    return [h / n if n else 0.0 for h, n in zip(hangul, letters)]


def with_runs(texts: list[str], run_min: int) -> set[int]:
    """The texts holding ``run_min`` equal characters in a row (the only ones a run pattern can
    match; a few more where a run crosses from one text into the next)."""
    codes, bounds = _codes(texts)
    same = codes[1:] == codes[:-1]
    for _ in range(run_min - 2):
        same = same[:-1] & same[1:]
    return set((np.searchsorted(bounds, np.flatnonzero(same), side="right") - 1).tolist())


def shorten_runs(text: str, run: re.Pattern, keep: int) -> tuple[str, int]:
    """Runs of one character (ㅋㅋㅋㅋ, !!!!) cut to ``keep``; also returns how many characters runs of
    letters (jamo, syllables) held: punctuation runs are shortened but never make a document junk."""
    held = 0

    def cut(m: re.Match) -> str:
        nonlocal held
        if m.group(1).isalpha():
            held += len(m.group(0))
        return m.group(0)[:keep]

    return run.sub(cut, text), held


class BoilerplateLines:
    """Recognises navigation and boilerplate lines: menu words, breadcrumbs, copyright lines."""

    def __init__(self, phrases: tuple[str, ...], max_chars: int):
        self.phrases = {p.lower() for p in phrases}
        self.max_chars = max_chars

    def __call__(self, line: str) -> bool:
        if not line or len(line) > self.max_chars:
            return False
        low = line.lower()
        if low in self.phrases or low.startswith(("copyright", "ⓒ", "©")):
            return True
        if not _HAS_SEPARATOR.search(low):
            return False
        parts = [p for p in _SEPARATORS.split(low) if p]
        if len(parts) >= 2 and all(p in self.phrases for p in parts):
            return True
        crumbs = low.split(" > ")
        return len(crumbs) >= 3 and all(0 < len(p) <= 10 for p in crumbs)


class KiwiWords:
    """Kiwi's morphemes as words. Kiwi's default model is the one the kiwipiepy-model package ships
    (datatrove's KiwiTokenizer asks for the "sbg" model, which that package does not hold), so this
    runs offline. Loaded on first use, in the worker process."""

    def __init__(self):
        self._kiwi = None

    def __call__(self, text: str) -> list[str]:
        if self._kiwi is None:
            from kiwipiepy import Kiwi

            self._kiwi = Kiwi()
        return [token.form for token in self._kiwi.tokenize(text)]


def repetition_failure(text: str, cfg: FilterConfig, split_words=str.split) -> bool:
    """Gopher's repetition rules over lines and word n-grams."""
    lines = [line for line in text.split("\n") if line]
    if len(lines) > 1:
        counts = Counter(lines)
        dup_lines = sum(c - 1 for c in counts.values())
        dup_chars = sum(len(line) * (c - 1) for line, c in counts.items())
        if dup_lines / len(lines) > cfg.max_dup_line_share or dup_chars / len(text) > cfg.max_dup_line_char_share:
            return True
    words = split_words(text)
    if len(words) < cfg.repetition_min_words:
        return False
    if len(set(words)) == len(words):
        return False  # no word repeats, so no n-gram does
    total = sum(map(len, words))
    for n, limit in enumerate(cfg.max_top_ngram_char_share, start=2):
        if limit and _top_ngram_share(words, n, total) > limit:
            return True
    for n, limit in enumerate(cfg.max_dup_ngram_char_share, start=5):
        share = _dup_ngram_share(words, n, total)
        if limit and share > limit:
            return True
        if share == 0:
            return False  # no repeated n-gram, so no longer one repeats either
    return False


def _top_ngram_share(words: list[str], n: int, total: int) -> float:
    grams = Counter(zip(*(words[i:] for i in range(n))))
    if not grams:
        return 0.0
    gram, times = grams.most_common(1)[0]
    return sum(map(len, gram)) * times / total if times > 1 else 0.0


def _dup_ngram_share(words: list[str], n: int, total: int) -> float:
    """Share of word characters inside repeated occurrences of an n-gram (overlaps counted once)."""
    seen: set = set()
    covered = bytearray(len(words))
    for i, gram in enumerate(zip(*(words[i:] for i in range(n)))):
        if gram in seen:
            covered[i:i + n] = b"\x01" * n
        else:
            seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered) if c) / total if total else 0.0


class QualityFilter(CountingStep):
    """Applies the FilterConfig checks in order; the first that fails drops the document."""

    name = "filters"
    BATCH = 1024  # documents checked together (the character counts run in numpy over a batch)

    def __init__(self, counts_dir: str, cfg: FilterConfig):
        super().__init__(counts_dir, cfg.examples_per_filter)
        self.cfg = cfg
        self.run_re = re.compile(rf"([^\s\d])\1{{{cfg.run_min - 1},}}") if cfg.run_min else None
        self.boilerplate = BoilerplateLines(cfg.boilerplate_lines, cfg.boilerplate_max_line_chars)
        phrases = sorted(set(cfg.spam_phrases), key=len, reverse=True)
        self.spam = re.compile("|".join(map(re.escape, phrases))) if phrases else None
        self.words = KiwiWords() if cfg.words == "kiwi" else str.split

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        batch: list[Document] = []
        for doc in data:
            batch.append(doc)
            if len(batch) == self.BATCH:
                yield from self._passed(batch)
                batch = []
        yield from self._passed(batch)
        self.save(rank)

    def _passed(self, docs: list[Document]):
        for doc, why in zip(docs, self.check_batch(docs)):
            if why:
                self.removed(why, doc)
            else:
                yield doc

    def check(self, doc: Document) -> str | None:
        """The name of the first failing filter (the text may be rewritten on the way), or None."""
        return self.check_batch([doc])[0]

    def check_batch(self, docs: list[Document]) -> list[str | None]:
        """``check`` of each document; the checks that count characters run over the whole batch."""
        cfg = self.cfg
        why: list[str | None] = [None] * len(docs)
        if self.run_re is not None:
            for i in with_runs([doc.text for doc in docs], cfg.run_min):
                if self._runs(docs[i]):
                    why[i] = "runs"
        for i, doc in enumerate(docs):
            if why[i]:
                continue
            if cfg.max_boilerplate_share < 1 and self._boilerplate(doc):
                why[i] = "boilerplate"
            elif not cfg.min_chars <= len(doc.text) <= cfg.max_chars:
                why[i] = "length"
        live = [i for i, w in enumerate(why) if w is None]
        shares = hangul_shares([docs[i].text for i in live]) if cfg.min_hangul_share else [1.0] * len(live)
        for i, share in zip(live, shares):
            why[i] = self._late(docs[i].text, share)
        return why

    def _late(self, text: str, hangul: float) -> str | None:
        """The checks after length, in order, given the text's Hangul share."""
        cfg = self.cfg
        if cfg.min_hangul_share and hangul < cfg.min_hangul_share:
            return "hangul"
        if repetition_failure(text, cfg, self.words):
            return "repetition"
        if self.spam is not None and cfg.spam_min_hits and count(self.spam, text) >= cfg.spam_min_hits:
            return "spam"
        return None

    def _runs(self, doc: Document) -> bool:
        text, held = shorten_runs(doc.text, self.run_re, self.cfg.run_keep)
        if held and held / len(doc.text) > self.cfg.max_run_share:
            return True
        if len(text) < len(doc.text):
            self.counts["runs_shortened"] += 1
            doc.text = text
        return False

    def _boilerplate(self, doc: Document) -> bool:
        lines = doc.text.split("\n")
        kept = [line for line in lines if not self.boilerplate(line)]
        dropped = len(lines) - len(kept)
        if not dropped:
            return False
        if dropped / len(lines) > self.cfg.max_boilerplate_share or not any(kept):
            return True
        self.counts["boilerplate_lines_removed"] += dropped
        doc.text = "\n".join(kept).strip()
        return False
