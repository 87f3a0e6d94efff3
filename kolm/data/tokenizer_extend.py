"""Extending a byte-level BPE (Phi's, GPT-2's, kolm's own) with Korean tokens.

Extension continues BPE training on top of the base: the corpus is split into words by the base's
own pre-tokenizer, each word is segmented by the base's merges, and new merges of adjacent pieces
are learned greedily by frequency. The new merges rank after every base merge, so the extended
tokenizer encodes any text exactly as the base does and then applies the new merges. Only merges
whose result can occur in Korean text alone are learned (the result pins at least one Hangul
character), so text without Hangul encodes exactly as before, and every base id keeps its token.
"""

from __future__ import annotations

import heapq
import itertools
import json
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from kolm.data.jobs import check_at_least
from kolm.data.tokenizer import (
    HOLDOUT_MAX_CHARS,
    TrainingStream,
    iter_documents,
    refuse_existing_output,
    write_dir_atomically,
)
from kolm.errors import KolmError
from kolm.files import atomic_write_json, read_json, sha256_file
from kolm.log import say

FORMAT_VERSION = 1
EXTENSION_FILE = "kolm_extension.json"
# Copied from the base beside the new tokenizer.json; the slow tokenizer's vocab.json/merges.txt are
# not, as they would describe the base vocabulary.
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_RECORD_KEYS = ("format_version", "base", "base_tokenizer_sha256", "base_vocab_size", "added", "new_id_range")
# Hangul Jamo, Compatibility Jamo, Jamo Extended-A, Syllables with Jamo Extended-B, halfwidth Hangul.
_HANGUL_RANGES = ((0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7FF), (0xFFA0, 0xFFDC))
HANGUL = re.compile("[" + "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _HANGUL_RANGES) + "]")


# --------------------------------------------------------------------------- which tokens are Korean


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE character of each byte (GPT-2's table), inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return {c: b for b, c in chars.items()}


_BYTE_OF = _byte_level_alphabet()


def token_bytes(token: str) -> bytes | None:
    """The bytes a byte-level token stands for (None for a token outside the byte-level alphabet)."""
    try:
        return bytes(_BYTE_OF[c] for c in token)
    except KeyError:
        return None


@cache
def _pins_hangul(prefix: bytes) -> bool:
    """Whether every character whose UTF-8 encoding starts with ``prefix`` (a three-byte lead and up
    to two continuation bytes) is Hangul."""
    if any(b & 0xC0 != 0x80 for b in prefix[1:]):
        return False
    found = False
    for tail in itertools.product(range(0x80, 0xC0), repeat=3 - len(prefix)):
        try:
            char = (prefix + bytes(tail)).decode("utf-8")
        except UnicodeDecodeError:  # overlong forms and surrogates never occur in text
            continue
        if not HANGUL.match(char):
            return False
        found = True
    return found


def is_korean_token(token: str) -> bool:
    """Whether any text containing this byte-level token's bytes contains Hangul: true when one of
    its bytes leads a character that, whatever bytes follow, is Hangul (all of Hangul is in the
    three-byte range of UTF-8)."""
    data = token_bytes(token)
    return data is not None and any(0xE0 <= b <= 0xEF and _pins_hangul(data[i:i + 3]) for i, b in enumerate(data))


# --------------------------------------------------------------------------- the base tokenizer


@dataclass
class _Base:
    """The tokenizer being extended."""

    directory: Path
    spec: dict  # tokenizer.json as loaded
    tok: Any  # tokenizers.Tokenizer
    sha256: str
    length: int  # ids below this are the base's: its BPE vocabulary and its added tokens
    strings: dict[int, str]  # BPE vocabulary, id -> token
    known: set[str]  # every token string the base has
    added: re.Pattern | None  # the added tokens, which the tokenizer splits off before anything else


def _load_base(directory: str | Path) -> _Base:
    from tokenizers import Tokenizer

    d = Path(directory)
    path = d / "tokenizer.json"
    if not d.is_dir():
        raise KolmError(f"--base {d}: no such directory; give a Hugging Face tokenizer or model directory")
    if not path.is_file():
        raise KolmError(f"--base {d}: no tokenizer.json; give a Hugging Face tokenizer directory, or a model "
                        "directory holding one (a model with only a slow tokenizer can be converted with "
                        "`AutoTokenizer.from_pretrained(DIR).save_pretrained(NEW_DIR)`)")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise KolmError(f"{path}: cannot be loaded as a tokenizer ({e})") from e
    _check_byte_level_bpe(path, spec)
    vocab = tok.get_vocab(with_added_tokens=True)
    contents = sorted((t.content for t in tok.get_added_tokens_decoder().values()), key=len, reverse=True)
    added = re.compile("|".join(map(re.escape, contents))) if contents else None
    strings = {i: s for s, i in spec["model"]["vocab"].items()}
    return _Base(d, spec, tok, sha256_file(path), max(vocab.values()) + 1, strings, set(vocab), added)


def _check_byte_level_bpe(path: Path, spec: dict) -> None:
    """Refuse what extension does not support, saying what it is."""
    model = spec.get("model") or {}
    supported = "only byte-level BPE tokenizers (GPT-2, Phi-1.5, Phi-2, kolm's own) can be extended"
    if model.get("type") != "BPE":
        raise KolmError(f"{path}: its model is {model.get('type') or 'of unknown type'}; {supported}")
    if not _has_byte_level(spec.get("pre_tokenizer")):
        raise KolmError(f"{path}: its pre-tokenizer is not ByteLevel; {supported}")
    for option in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(option):
            raise KolmError(f"{path}: its BPE sets {option}; {supported} (without {option})")


def _has_byte_level(pre: dict | None) -> bool:
    if not pre:
        return False
    if pre.get("type") == "Sequence":
        return any(_has_byte_level(p) for p in pre.get("pretokenizers", ()))
    return pre.get("type") == "ByteLevel"


def _korean_words(base: _Base, text: str) -> Iterator[str]:
    """The base's pre-tokenized words of ``text`` that contain Hangul, as byte-level strings."""
    for piece in base.added.split(text) if base.added else (text,):
        if not HANGUL.search(piece):
            continue
        if base.tok.normalizer is not None:
            piece = base.tok.normalizer.normalize_str(piece)
        for word, (start, end) in base.tok.pre_tokenizer.pre_tokenize_str(piece):
            if HANGUL.search(piece, start, end):
                yield word


# --------------------------------------------------------------------------- learning merges


class _MergeLearner:
    """Greedy BPE merges on top of the base segmentation, keeping pair counts up to date
    incrementally (a lazy max-heap of counts, and for each pair the words it occurs in)."""

    def __init__(self, base: _Base, min_frequency: int):
        self.base, self.min_frequency = base, min_frequency
        self.strings = dict(base.strings)
        self.new_ids: dict[str, int] = {}
        self.words: list[list[int]] = []
        self.counts: list[int] = []
        self.pairs: dict[tuple[int, int], int] = defaultdict(int)
        self.where: dict[tuple[int, int], set[int]] = defaultdict(set)
        self.eligible: dict[tuple[int, int], bool] = {}
        self.heap: list[tuple[int, int, int]] = []

    def add_words(self, words: Counter) -> None:
        """Segment each distinct word with the base BPE and count its eligible pairs."""
        model = self.base.tok.model
        for word, count in words.items():
            symbols = [t.id for t in model.tokenize(word)]
            w = len(self.words)
            self.words.append(symbols)
            self.counts.append(count)
            for pair in zip(symbols, symbols[1:]):
                if self._eligible(pair):
                    self.pairs[pair] += count
                    self.where[pair].add(w)
        self.heap = [(-n, a, b) for (a, b), n in self.pairs.items()]
        heapq.heapify(self.heap)

    def _eligible(self, pair: tuple[int, int]) -> bool:
        """A pair may merge when its result is Korean and not a token the base already has: that token's
        id and model row belong to the base, and a new Korean token needs a row of its own."""
        ok = self.eligible.get(pair)
        if ok is None:
            merged = self.strings[pair[0]] + self.strings[pair[1]]
            ok = self.eligible[pair] = merged not in self.base.known and is_korean_token(merged)
        return ok

    def learn(self, add: int, progress: bool) -> list[tuple[int, int]]:
        """Learn merges until ``add`` new tokens exist or no pair occurs ``min_frequency`` times."""
        merges = []
        while len(self.new_ids) < add:
            pair = self._best()
            if pair is None:
                break
            merged = self.strings[pair[0]] + self.strings[pair[1]]
            new = self.new_ids.get(merged)  # another split of a token already learned: same id
            if new is None:
                new = self.new_ids[merged] = self.base.length + len(self.new_ids)
                self.strings[new] = merged
            self._apply(pair, new)
            merges.append(pair)
            if progress and len(merges) % 1000 == 0:
                say(f"learned {len(self.new_ids)} of {add} tokens")
        return merges

    def _best(self) -> tuple[int, int] | None:
        """The most frequent eligible pair (None when it is below ``min_frequency``). A heap entry may
        hold a count that has since fallen: it goes back with the current count."""
        while self.heap:
            neg, a, b = heapq.heappop(self.heap)
            count = self.pairs.get((a, b), 0)
            if count == -neg:
                return (a, b) if count >= self.min_frequency else None
            if count < -neg and count > 0:  # (a count that rose has a newer entry of its own)
                heapq.heappush(self.heap, (-count, a, b))
        return None

    def _apply(self, pair: tuple[int, int], new: int) -> None:
        """Merge ``pair`` into ``new`` in every word holding it, and update the pair counts."""
        deltas: dict[tuple[int, int], int] = defaultdict(int)
        for w in self.where.pop(pair):
            count = self.counts[w]
            for p, sign in _merge_in_place(self.words[w], pair, new):
                deltas[p] += sign * count
                if sign > 0 and self._eligible(p):
                    self.where[p].add(w)
        del self.pairs[pair]
        for p, delta in deltas.items():
            if delta and p != pair and self._eligible(p):
                count = self.pairs[p] = self.pairs.get(p, 0) + delta
                if delta > 0:
                    heapq.heappush(self.heap, (-count, *p))


def _merge_in_place(symbols: list[int], pair: tuple[int, int], new: int) -> list[tuple[tuple[int, int], int]]:
    """Replace each occurrence of ``pair`` in ``symbols`` (left to right) by ``new``; return the
    neighbouring pairs that went (-1) and came (+1)."""
    a, b = pair
    changes = []
    i = -1
    while True:
        try:
            i = symbols.index(a, i + 1, len(symbols) - 1)  # list.index: the scan runs in C
        except ValueError:
            return changes
        if symbols[i + 1] != b:
            continue
        if i > 0:
            changes += [((symbols[i - 1], a), -1), ((symbols[i - 1], new), 1)]
        if i + 2 < len(symbols):
            changes += [((b, symbols[i + 2]), -1), ((new, symbols[i + 2]), 1)]
        symbols[i:i + 2] = [new]


# --------------------------------------------------------------------------- the extended tokenizer


def _extended_spec(base: _Base, learner: _MergeLearner, merges: list[tuple[int, int]]) -> dict:
    """The base's tokenizer.json with the new tokens and merges appended to its BPE model."""
    spec = json.loads(json.dumps(base.spec))
    vocab = spec["model"]["vocab"]
    # Added tokens outside the BPE vocabulary (Phi's runs of spaces) get their ids renumbered after the
    # largest vocabulary id when a tokenizer is loaded; listing them in the vocabulary keeps their ids.
    for token_id, token in base.tok.get_added_tokens_decoder().items():
        vocab.setdefault(token.content, token_id)
    vocab.update(learner.new_ids)
    as_strings = bool(spec["model"]["merges"]) and isinstance(spec["model"]["merges"][0], str)
    pairs = [[learner.strings[a], learner.strings[b]] for a, b in merges]
    spec["model"]["merges"] += [" ".join(p) for p in pairs] if as_strings else pairs
    return spec


def _check_base_kept(base: _Base, extended: Any, added: int) -> None:
    """Every base id must keep its token, and the new ids must follow the base's, with no gap."""
    for token_id in range(base.length):
        if extended.id_to_token(token_id) != base.tok.id_to_token(token_id):
            raise KolmError(f"{base.directory}: extending it would change token id {token_id} "
                            f"({base.tok.id_to_token(token_id)!r}); this tokenizer cannot be extended")
    if extended.get_vocab_size(with_added_tokens=True) != base.length + added:
        raise KolmError(f"{base.directory}: the extended vocabulary is not {base.length} + {added} tokens; "
                        "this tokenizer cannot be extended")


def _write(tmp: Path, base: _Base, spec: dict, added: int, merges: int) -> None:
    (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")
    for name in CONFIG_FILES:
        if (base.directory / name).is_file():
            shutil.copyfile(base.directory / name, tmp / name)
    atomic_write_json(tmp / EXTENSION_FILE, {
        "format_version": FORMAT_VERSION, "base": str(base.directory.resolve()),
        "base_tokenizer_sha256": base.sha256, "base_vocab_size": base.length, "added": added,
        "new_id_range": [base.length, base.length + added], "merges_added": merges})


def read_extension(directory: str | Path) -> dict | None:
    """What `kolm tokenizer extend` recorded about a tokenizer directory (None for one it did not make):
    ``base_vocab_size`` (ids below it are the base's), ``added``, ``new_id_range`` ([first, end)),
    ``base`` and ``base_tokenizer_sha256``."""
    path = Path(directory) / EXTENSION_FILE
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except (OSError, ValueError) as e:
        raise KolmError(f"{path}: cannot be read ({e}); re-run `kolm tokenizer extend`") from e
    if not isinstance(record, dict) or any(key not in record for key in _RECORD_KEYS):
        raise KolmError(f"{path}: not a kolm extension record; re-run `kolm tokenizer extend`")
    if record["format_version"] != FORMAT_VERSION:
        raise KolmError(f"{path}: format version {record['format_version']} is not {FORMAT_VERSION}; "
                        "re-run `kolm tokenizer extend` with this kolm")
    return record


# --------------------------------------------------------------------------- measuring it


@dataclass(frozen=True)
class ExtensionReport:
    """What `kolm tokenizer extend` added, and what it changes on held-back and non-Korean text."""

    out: str
    requested: int
    added: int
    merges: int
    base_vocab_size: int
    documents: int
    distinct_words: int
    heldout_documents: int
    base_chars_per_token: float
    chars_per_token: float
    round_trips: int  # held-back documents that decode(encode(x)) returns unchanged
    sample_documents: int
    non_korean_source: str
    non_korean_items: int
    non_korean_changed: int
    seconds: float

    def __str__(self) -> str:
        first, last = self.base_vocab_size, self.base_vocab_size + self.added - 1
        short = (f" (asked for {self.requested}: no other Korean pair occurs --min-frequency times in the corpus)"
                 if self.added < self.requested else "")
        sample = (f"{self.heldout_documents} held-back documents" if self.heldout_documents
                  else "the first documents (corpus too small to hold any back)")
        share = self.non_korean_changed / max(self.non_korean_items, 1)
        return (f"extended tokenizer written to {self.out}: {self.added} new tokens{short}, ids {first}..{last} "
                f"after the base's {self.base_vocab_size}; {self.merges} merges learned from {self.documents} "
                f"documents ({self.distinct_words} distinct Korean words) in {self.seconds:.1f}s\n"
                f"compression: {self.base_chars_per_token:.3f} -> {self.chars_per_token:.3f} characters per token "
                f"(base -> extended) on {sample}\n"
                f"round trip: decode(encode(x)) == x on {self.round_trips} of these {self.sample_documents} documents\n"
                f"non-Korean text: {self.non_korean_changed} of {self.non_korean_items} {self.non_korean_source} "
                f"encode differently ({share:.2%})")


def _chars_per_token(tok: Any, texts: list[str]) -> float:
    tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return sum(len(t) for t in texts) / max(tokens, 1)


def _round_trips(tok: Any, texts: list[str]) -> int:
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    decoded = tok.decode_batch([e.ids for e in encodings], skip_special_tokens=False)
    return sum(a == b for a, b in zip(texts, decoded))


def _non_korean_sample(paths: list[str] | None, holdout: list[str], text_field: str,
                       skip_malformed: bool) -> tuple[list[str], str]:
    """The given non-Korean documents, or else the runs of held-back text between Hangul characters."""
    if paths:
        docs = _take_chars(iter_documents(paths, text_field, skip_malformed, Counter()), HOLDOUT_MAX_CHARS)
        return docs, "documents of --non-korean"
    runs = [run for text in holdout for run in HANGUL.split(text) if run.strip()]
    return runs, "non-Hangul runs of the held-back text"


def _take_chars(texts: Iterable[str], limit: int) -> list[str]:
    taken, chars = [], 0
    for text in texts:
        if chars >= limit:
            break
        taken.append(text)
        chars += len(text)
    return taken


def _changed(base: Any, extended: Any, texts: list[str]) -> int:
    before = base.encode_batch(texts, add_special_tokens=False)
    after = extended.encode_batch(texts, add_special_tokens=False)
    return sum(a.ids != b.ids for a, b in zip(before, after))


# --------------------------------------------------------------------------- the command


def extend_tokenizer(
    base: str | Path,
    inputs: list[str],
    add: int,
    out: str | Path,
    *,
    text_field: str = "text",
    skip_malformed: bool = False,
    max_documents: int | None = None,
    min_frequency: int = 2,
    non_korean: list[str] | None = None,
    force: bool = False,
    progress: bool = True,
    documents: str = "lines",
) -> ExtensionReport:
    """Learn up to ``add`` Korean tokens from ``inputs`` on top of the byte-level BPE in ``base`` and
    write the extended tokenizer (and kolm_extension.json) to ``out``."""
    from tokenizers import Tokenizer

    start = time.perf_counter()
    out = Path(out)
    if add < 1:
        raise KolmError(f"--add {add}: give the number of tokens to add (at least 1)")
    check_at_least("--min-frequency", min_frequency)
    check_at_least("--max-documents", max_documents)
    refuse_existing_output(out, force, base, *inputs)
    source = _load_base(base)
    stream = TrainingStream(inputs, text_field, skip_malformed, max_documents, documents)
    words = Counter(word for text in stream for word in _korean_words(source, text))
    if stream.used == 0:
        raise KolmError("the corpus holds no text: every line was empty or skipped")
    if progress:
        say(f"{len(words)} distinct Korean words in {stream.used} documents; learning up to {add} tokens")
    learner = _MergeLearner(source, min_frequency)
    learner.add_words(words)
    merges = learner.learn(add, progress)
    if not merges:
        raise KolmError(f"no Korean pair of tokens occurs {min_frequency} times in the corpus: nothing to add; "
                        "give more Korean text or lower --min-frequency")
    spec = _extended_spec(source, learner, merges)
    extended = Tokenizer.from_str(json.dumps(spec))
    added = len(learner.new_ids)
    _check_base_kept(source, extended, added)
    report = _measure(source, extended, stream, non_korean)  # before writing: its input errors stop the command
    write_dir_atomically(out, force, lambda tmp: _write(tmp, source, spec, added, len(merges)))
    return ExtensionReport(str(out), add, added, len(merges), source.length, stream.used, len(words), **report,
                           seconds=time.perf_counter() - start)


def _measure(source: _Base, extended: Any, stream: TrainingStream, non_korean: list[str] | None) -> dict:
    """Compression and round trips on the held-back text; encodings changed on the non-Korean sample."""
    sample = stream.sample()
    others, described = _non_korean_sample(non_korean, sample, stream.text_field, stream.skip_malformed)
    return {"heldout_documents": len(stream.holdout), "base_chars_per_token": _chars_per_token(source.tok, sample),
            "chars_per_token": _chars_per_token(extended, sample), "round_trips": _round_trips(extended, sample),
            "sample_documents": len(sample), "non_korean_source": described, "non_korean_items": len(others),
            "non_korean_changed": _changed(source.tok, extended, others)}
