"""PII masking: each kind of personal number or address becomes one special token.

Kinds and tokens: resident registration numbers ``<|rrn|>``, mobile and landline numbers
``<|phone|>``, card numbers ``<|card|>``, bank account numbers ``<|account|>`` and e-mail
addresses ``<|email|>``. The patterns are anchored on what makes each kind distinctive (a birth
date and a sex digit, an area or mobile prefix, the Luhn check, a bank's digit grouping or a
bank word nearby) so that dates, prices, years and counts are never masked.
"""

from __future__ import annotations

import re
from datetime import date

from datatrove.data import DocumentsPipeline

from kolm.data.clean_config import PII_TOKENS
from kolm.data.clean_io import CountingStep

TOKENS = PII_TOKENS

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}(?![\w-])")
# YYMMDD, a hyphen (or nothing), then a sex/century digit and six more digits.
_RRN = re.compile(r"(?<![\d-])(\d{2})(\d{2})(\d{2})(-?)\s?([1-8])(\d{6})(?![\d-])")
_CARD = re.compile(r"(?<![\d-])(?:\d{4}([- ])\d{4}\1\d{4}\1\d{4}|\d{4}([- ])\d{6}\2\d{5}|\d{16})(?![\d-])")
_MOBILE = re.compile(r"(?<![\d+-])(?:\+82[- ]?|\(\+82\)\s?)?0?1[016789]([-. ]?)\d{3,4}\1\d{4}(?![\d-])")
_AREA = r"(?:2|[3-6][1-5]|70|50\d|80)"
_LANDLINE = re.compile(rf"(?<![\d-])(?:\(0{_AREA}\)\s?|(?:\+82[- ]?0?|0){_AREA}[-. ])\d{{3,4}}[-. ]\d{{4}}(?![\d-])")
# Korean banks' account layouts (digit groups joined by hyphens).
_ACCOUNT_LAYOUTS = ("6-2-6", "3-3-6", "4-3-6", "3-6-5", "3-4-4-2", "3-6-2-3", "4-2-7", "3-2-6", "3-6-3", "6-2-7",
                    "3-2-4-3", "4-4-5", "3-2-5-1")
_ACCOUNT = re.compile(r"(?<![\d-])(?:" + "|".join("-".join(rf"\d{{{n}}}" for n in layout.split("-"))
                                                  for layout in _ACCOUNT_LAYOUTS) + r")(?![\d-])")
_BANK_WORDS = r"(?:계좌|계좌번호|통장|입금|송금|예금주|은행|뱅크|농협|국민|신한|우리|하나|기업|새마을|우체국|신협|수협)"
_ACCOUNT_NEAR_BANK = re.compile(_BANK_WORDS + r"[^\d\n]{0,12}(?<![\d-])(\d[\d-]{8,17}\d)(?![\d-])")
_MAYBE = re.compile(r"[@\d](?:(?<=@)|\d\d)")  # "@" or three digits; starting on a character set scans fast


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def rrn_ok(m: re.Match) -> bool:
    """A real birth date and sex digit; without the hyphen the checksum must hold too (numbers
    issued since October 2020 carry no checksum, so a hyphenated one is masked on the date alone)."""
    yy, mm, dd, hyphen, sex, rest = m.groups()
    century = {"1": 1900, "2": 1900, "5": 1900, "6": 1900}.get(sex, 2000)
    try:
        date(century + int(yy), int(mm), int(dd))
    except ValueError:
        return False
    if hyphen:
        return True
    digits = yy + mm + dd + sex + rest
    check = sum(int(d) * w for d, w in zip(digits, (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)))
    return (11 - check % 11) % 10 == int(digits[12])


def _account_sub(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group(1))
    if not 10 <= len(digits) <= 14:
        return m.group(0)
    return m.group(0)[: m.start(1) - m.start(0)] + TOKENS["account"]


class PiiMasker:
    """Replaces the enabled PII kinds in text, counting replacements per kind."""

    def __init__(self, kinds: tuple[str, ...]):
        self.kinds = kinds

    def __call__(self, text: str, counts) -> str:
        if not _MAYBE.search(text):
            return text
        for kind in ("email", "rrn", "card", "phone", "account"):
            if kind in self.kinds:
                text, n = getattr(self, f"_{kind}")(text)
                if n:
                    counts[f"pii_{kind}"] += n
        return text

    @staticmethod
    def _email(text: str) -> tuple[str, int]:
        return _EMAIL.subn(TOKENS["email"], text) if "@" in text else (text, 0)

    @staticmethod
    def _rrn(text: str) -> tuple[str, int]:
        return _counted_sub(_RRN, lambda m: TOKENS["rrn"] if rrn_ok(m) else m.group(0), text)

    @staticmethod
    def _card(text: str) -> tuple[str, int]:
        return _counted_sub(_CARD, lambda m: TOKENS["card"] if luhn_ok(re.sub(r"\D", "", m.group(0)))
                            else m.group(0), text)

    @staticmethod
    def _phone(text: str) -> tuple[str, int]:
        text, a = _MOBILE.subn(TOKENS["phone"], text)
        text, b = _LANDLINE.subn(TOKENS["phone"], text)
        return text, a + b

    @staticmethod
    def _account(text: str) -> tuple[str, int]:
        text, a = _ACCOUNT.subn(TOKENS["account"], text)
        text, b = _counted_sub(_ACCOUNT_NEAR_BANK, _account_sub, text)
        return text, a + b


def _counted_sub(pattern: re.Pattern, repl, text: str) -> tuple[str, int]:
    """``pattern.sub`` counting only the matches ``repl`` actually changed."""
    changed = 0

    def wrapped(m: re.Match) -> str:
        nonlocal changed
        out = repl(m)
        changed += out != m.group(0)
        return out

    return pattern.sub(wrapped, text), changed


class PiiMask(CountingStep):
    """The masking as a datatrove step."""

    name = "pii"

    def __init__(self, counts_dir: str, kinds: tuple[str, ...]):
        super().__init__(counts_dir)
        self.masker = PiiMasker(kinds)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            doc.text = self.masker(doc.text, self.counts)
            yield doc
        self.save(rank)
