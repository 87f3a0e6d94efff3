"""A synthetic Korean corpus for `kolm clean`: distinct documents, exact, NFD and near copies of some,
documents carrying PII of every kind, documents full of ordinary numbers, and junk.

Every record carries ``group`` (documents of one duplicate group share it) and ``kind``
(distinct, copy, pii, numbers, junk) so tests can check what survived.
"""

from __future__ import annotations

import gzip
import json
import random
import unicodedata
from pathlib import Path


def rrn_with_checksum(first12: str) -> str:
    """A 13-digit resident registration number whose last digit is the checksum."""
    total = sum(int(d) * w for d, w in zip(first12, (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)))
    return first12 + str((11 - total % 11) % 10)


# Each PII string with the token that must replace it, inside real-looking sentences.
PII = [
    ("900101-1234568", "<|rrn|>", "신청인 주민등록번호 {} 확인 바랍니다."),
    (rrn_with_checksum("850515234567"), "<|rrn|>", "주민번호는 {} 입니다."),
    ("010-2345-6789", "<|phone|>", "문의는 담당자 휴대폰 {} 으로 연락 주세요."),
    ("010 9876 5432", "<|phone|>", "급한 일은 {} 로 문자 남겨 주세요."),
    ("02-345-6789", "<|phone|>", "본사 대표전화 {} 로 전화하시면 됩니다."),
    ("031-987-6543", "<|phone|>", "경기 지사 번호는 {} 입니다."),
    ("4111-1111-1111-1111", "<|card|>", "결제 카드 번호 {} 로 승인되었습니다."),
    ("5500 0000 0000 0004", "<|card|>", "카드번호 {} 유효기간 12/27."),
    ("123456-12-345678", "<|account|>", "국민은행 {} 예금주 김민수 앞으로 입금 바랍니다."),
    ("110-234-567890", "<|account|>", "신한 계좌 {} 로 송금했습니다."),
    ("minsu.kim@example.co.kr", "<|email|>", "자료는 {} 로 보내 주세요."),
    ("help+desk@mail.example.com", "<|email|>", "고객 문의 메일 {} 으로 부탁드립니다."),
]

# Numbers that are not PII and must come through unchanged.
ORDINARY = [
    "2023-10-12", "2023.10.12", "1998년", "15,000원", "1,234,567,890원", "3만 5천원", "14:30", "제12345호",
    "123-45-67890", "978-89-12345-67-8", "1588-1234", "20231012", "1234567890123", "2024년 3월 1일", "37.5%",
    "010호", "3,500명",
]


def _word(rng: random.Random) -> str:
    return "".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(rng.randint(2, 4)))


def sentence(rng: random.Random, words: int = 12) -> str:
    return " ".join(_word(rng) for _ in range(words)) + "다."


def document(rng: random.Random, sentences: int = 5) -> str:
    return "\n".join(sentence(rng, rng.randint(8, 14)) for _ in range(sentences))


def near_copy(text: str, rng: random.Random) -> str:
    """The text with one word replaced: a near duplicate (character 5-gram Jaccard above 0.9)."""
    words = text.split(" ")
    words[rng.randrange(len(words))] = _word(rng)
    return " ".join(words)


def junk(rng: random.Random) -> list[str]:
    nav = "\n".join(["로그인", "회원가입", "홈 > 뉴스 > 정치", "이전글", "다음글", "목록", sentence(rng, 10)])
    spam = f"{sentence(rng, 10)} 지금 바로 토토사이트 가입하고 먹튀검증 받으세요. {sentence(rng, 10)}"
    return [
        "ㅋ" * 40 + " " + _word(rng),
        "ㅎㅎㅎㅎㅎㅎㅎㅎㅎㅎㅎㅎㅎㅎㅎㅎㅎㅎㅎ",
        "짧다",
        "This page is written entirely in English and has no Korean text at all, so it should go.",
        "\n".join([sentence(rng, 8)] * 8),
        nav,
        spam,
        " ".join(["구매 문의 환영 합니다"] * 20),
    ]


def build(rng_seed: int = 0, distinct: int = 40, groups: int = 8) -> tuple[list[dict], list[dict]]:
    """Records for two input files; the second holds the copies, so a copy comes after its original."""
    rng = random.Random(rng_seed)
    first, second = [], []
    for i in range(distinct):
        first.append({"text": document(rng), "group": f"d{i}", "kind": "distinct", "url": f"https://example.kr/{i}"})
    for g in range(groups):
        text = document(rng, 6)
        first.append({"text": text, "group": f"g{g}", "kind": "original"})
        second.append({"text": text, "group": f"g{g}", "kind": "copy"})
        second.append({"text": unicodedata.normalize("NFD", text), "group": f"g{g}", "kind": "copy"})
        second.append({"text": near_copy(text, rng), "group": f"g{g}", "kind": "copy"})
    for i, (value, _, template) in enumerate(PII):
        first.append({"text": sentence(rng) + " " + template.format(value), "group": f"p{i}", "kind": "pii"})
    for i in range(0, len(ORDINARY), 4):
        numbers = " 그리고 ".join(ORDINARY[i:i + 4])
        first.append({"text": f"{sentence(rng)} 기록: {numbers} 입니다.", "group": f"n{i}", "kind": "numbers"})
    for i, text in enumerate(junk(rng)):
        second.append({"text": text, "group": f"j{i}", "kind": "junk"})
    return first, second


def write(folder: Path, seed: int = 0) -> list[Path]:
    """The corpus as one .jsonl and one .jsonl.gz file; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    first, second = build(seed)
    a, b = folder / "a.jsonl", folder / "b.jsonl.gz"
    a.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in first), encoding="utf-8")
    with gzip.open(b, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in second)
    return [a, b]


def read_output(out: Path) -> list[dict]:
    records = []
    for path in sorted(out.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f)
    return records
