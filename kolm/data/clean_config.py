"""`kolm clean`'s settings: every filter threshold, PII kind and dedup parameter, with its default.

This is the one place the defaults live. The command line's ``--filters``, ``--pii`` and
``--dedup`` pick presets; ``--set key=value`` tunes any single field below (a threshold of 0, or
an empty list, turns that check off). Everything here is recorded in ``report.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields

from kolm.errors import KolmError

PII_KINDS = ("rrn", "phone", "card", "account", "email")
# What each kind is replaced with; `kolm tokenizer train` makes the ones it sees special tokens.
PII_TOKENS = {kind: f"<|{kind}|>" for kind in PII_KINDS}
DEDUP_MODES = ("near", "exact", "none")

# Phrases that mark gambling, adult and loan spam in Korean web text. Extend with
# --set spam_phrases_file=PATH (one phrase per line).
SPAM_PHRASES = (
    "카지노사이트", "바카라사이트", "토토사이트", "먹튀검증", "온라인카지노", "슬롯사이트", "사설토토",
    "출장안마", "출장마사지", "조건만남", "성인용품", "비아그라", "시알리스", "작업대출", "무직자대출",
    "당일대출", "스포츠중계", "야동", "텔레그램 문의",
)

# Navigation and boilerplate lines of Korean web pages, matched against a whole (short) line.
BOILERPLATE_LINES = (
    "로그인", "로그아웃", "회원가입", "마이페이지", "장바구니", "이전글", "다음글", "목록", "목록으로", "메뉴",
    "전체메뉴", "본문 바로가기", "주메뉴 바로가기", "맨위로", "TOP", "공유하기", "스크랩", "인쇄", "댓글",
    "댓글쓰기", "좋아요", "구독", "구독하기", "검색", "닫기", "더보기", "사이트맵", "개인정보처리방침",
    "이용약관", "고객센터", "무단 전재 및 재배포 금지", "무단전재 및 재배포금지", "무단 전재-재배포 금지",
    "All rights reserved", "Copyright", "ⓒ", "©",
)


@dataclass(frozen=True)
class FilterConfig:
    """Document filters, applied in this order; each drops a document and is named in the report."""

    enabled: bool = True
    # length: characters after normalization
    min_chars: int = 10
    max_chars: int = 1_000_000
    # Hangul syllables and jamo among letters (Latin, Hangul, Han, ...); 0 turns it off
    min_hangul_share: float = 0.5
    # runs of run_min or more of one character (ㅋㅋㅋㅋ, ㅎㅎㅎㅎ, !!!!) are cut to run_keep characters
    # (run_min=0: off); a document whose runs of letters held over max_run_share of it is dropped
    run_min: int = 4
    run_keep: int = 3
    max_run_share: float = 0.5
    # navigation/boilerplate lines are removed; a document that was mostly boilerplate is dropped
    boilerplate_lines: tuple[str, ...] = BOILERPLATE_LINES
    boilerplate_max_line_chars: int = 40
    max_boilerplate_share: float = 0.5
    # Gopher-style repetition on lines and on words: "eojeol" (space-separated units, fast) or "kiwi"
    # (Kiwi's morphemes, with the model kiwipiepy-model ships; about 20k characters a second per core)
    words: str = "eojeol"
    max_dup_line_share: float = 0.3
    max_dup_line_char_share: float = 0.2
    max_top_ngram_char_share: tuple[float, float, float] = (0.2, 0.18, 0.16)  # for word 2-, 3-, 4-grams
    max_dup_ngram_char_share: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)  # for 5- to 10-grams
    repetition_min_words: int = 10
    # spam phrases: a document with at least spam_min_hits occurrences is dropped
    spam_phrases: tuple[str, ...] = SPAM_PHRASES
    spam_phrases_file: str = ""
    spam_min_hits: int = 2
    examples_per_filter: int = 5


@dataclass(frozen=True)
class DedupConfig:
    """Exact duplicates (a hash of the normalized text), then near duplicates (MinHash LSH)."""

    mode: str = "near"
    # MinHash over character n-grams of the text with whitespace removed (see kolm/data/clean_dedup.py)
    ngram_chars: int = 5
    num_buckets: int = 14
    hashes_per_bucket: int = 8
    seed: int = 1


@dataclass(frozen=True)
class CleanConfig:
    """Everything that changes `kolm clean`'s output."""

    text_field: str = "text"
    skip_malformed: bool = False
    documents: str = "lines"  # how .txt input holds documents: lines, paragraphs or files
    filters: FilterConfig = field(default_factory=FilterConfig)
    pii: tuple[str, ...] = PII_KINDS
    dedup: DedupConfig = field(default_factory=DedupConfig)
    unit_bytes: int = 32 << 20  # input bytes per task: fixes the tasks whatever the worker count

    def validate(self) -> None:
        f, d = self.filters, self.dedup
        if d.mode not in DEDUP_MODES:
            raise KolmError(f"--dedup {d.mode!r}: choose one of {', '.join(DEDUP_MODES)}")
        unknown = set(self.pii) - set(PII_KINDS)
        if unknown:
            raise KolmError(f"unknown PII kinds {sorted(unknown)}; known: {', '.join(PII_KINDS)}")
        if not 0 <= f.min_hangul_share <= 1 or not 0 <= f.max_run_share <= 1:
            raise KolmError("min_hangul_share and max_run_share must lie in [0, 1]")
        if f.run_min and (f.run_keep < 1 or f.run_min <= f.run_keep):
            raise KolmError(f"run_min ({f.run_min}) must exceed run_keep ({f.run_keep}), which must be at least 1")
        if f.words not in ("eojeol", "kiwi"):
            raise KolmError(f"words={f.words!r}: choose eojeol or kiwi")
        if f.min_chars < 0 or f.max_chars < f.min_chars:
            raise KolmError(f"min_chars {f.min_chars} and max_chars {f.max_chars} do not make a range")
        if d.ngram_chars < 1 or d.num_buckets < 1 or d.hashes_per_bucket < 1:
            raise KolmError("ngram_chars, num_buckets and hashes_per_bucket must be positive")
        if self.unit_bytes < 1:
            raise KolmError(f"unit_bytes must be positive, got {self.unit_bytes}")

    def as_dict(self) -> dict:
        return asdict(self)


def preset(filters: str = "default", pii: str = "mask", dedup: str = "near", text_field: str = "text",
           skip_malformed: bool = False, overrides: list[str] | None = None, documents: str = "lines") -> CleanConfig:
    """The configuration the command line asks for: presets, then ``key=value`` overrides."""
    if filters not in ("default", "none"):
        raise KolmError(f"--filters {filters!r}: choose default or none")
    if pii not in ("mask", "keep"):
        raise KolmError(f"--pii {pii!r}: choose mask or keep")
    cfg = CleanConfig(text_field=text_field, skip_malformed=skip_malformed, documents=documents,
                      filters=FilterConfig(enabled=filters == "default"),
                      pii=PII_KINDS if pii == "mask" else (), dedup=DedupConfig(mode=dedup))
    cfg = apply_overrides(cfg, overrides or [])
    cfg.validate()
    return cfg


def apply_overrides(cfg: CleanConfig, overrides: list[str]) -> CleanConfig:
    """Apply ``key=value`` settings; a key names a field of FilterConfig, DedupConfig or CleanConfig."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise KolmError(f"--set {item!r}: write key=value")
        cfg = _set(cfg, key.strip(), value.strip())
    return cfg


def _set(cfg: CleanConfig, key: str, value: str) -> CleanConfig:
    for part in ("filters", "dedup"):
        sub = getattr(cfg, part)
        if key in {f.name for f in fields(sub)}:
            return dataclasses.replace(cfg, **{part: dataclasses.replace(sub, **{key: _parse(sub, key, value)})})
    if key in {f.name for f in fields(cfg)} - {"filters", "dedup"}:
        return dataclasses.replace(cfg, **{key: _parse(cfg, key, value)})
    known = sorted({f.name for f in fields(FilterConfig)} | {f.name for f in fields(DedupConfig)} | {"pii"})
    raise KolmError(f"--set {key}: no such setting; known: {', '.join(known)}")


def _parse(obj, key: str, value: str):
    """A string from the command line as the type of the field's current value."""
    current = getattr(obj, key)
    try:
        if isinstance(current, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if isinstance(current, tuple):
            items = [v.strip() for v in value.split(",") if v.strip()]
            kind = type(current[0]) if current else str
            return tuple(kind(v) for v in items)
        return type(current)(value)
    except ValueError as e:
        raise KolmError(f"--set {key}={value}: expected {type(current).__name__} like {current!r}") from e
