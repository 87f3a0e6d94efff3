"""The first cleaning step: NFC, control characters and whitespace, so that copies that differ only
in encoding (an NFD crawl, CRLF line ends, stray spaces) become byte-identical."""

from __future__ import annotations

import re
import unicodedata

import numpy as np
from datatrove.data import DocumentsPipeline

from kolm.data.clean_io import CountingStep

# C0/C1 controls except tab and newline, zero-width characters and the BOM; tab becomes a space.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_SPACE = "[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]"
# Runs of spaces other than a single " " (which would be replaced by itself): the lookahead skips
# the ordinary gaps between words without a replacement each.
_SPACES = re.compile(f"(?=[\t\u00a0\u2000-\u200a\u202f\u205f\u3000]| {_SPACE}){_SPACE}+")
_BLANK_RUN = re.compile("\n{3,}")


def normalize_text(text: str) -> str:
    """NFC; controls dropped; runs of spaces as one space; lines stripped; at most one blank line."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROLS.sub("", text)
    text = _SPACES.sub(" ", text)
    if "\n" in text:
        text = "\n".join(line.strip() for line in text.split("\n"))
        text = _BLANK_RUN.sub("\n\n", text)
    return text.strip()


class Normalize(CountingStep):
    """Normalizes every document's text; documents left empty are dropped (counted as ``empty``)."""

    name = "normalize"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            doc.text = normalize_text(doc.text)
            if not doc.text:
                self.removed("empty", doc)
                continue
            yield doc
        self.save(rank)


class CharClass:
    """Which code points a one-character regex matches, looked up in numpy for many characters at
    once. The table is built by the regex itself, one Unicode plane (65,536 code points) at a time
    when a text first holds a character of it, so a process pays milliseconds, not the second that
    all 17 planes would take."""

    def __init__(self, pattern: str):
        self.pattern = re.compile(pattern)
        self.planes: dict[int, np.ndarray] = {}

    def _plane(self, plane: int) -> np.ndarray:
        if plane not in self.planes:
            table = np.zeros(1 << 16, dtype=bool)
            chars = "".join(map(chr, range(plane << 16, (plane + 1) << 16)))
            for m in self.pattern.finditer(chars):
                table[m.start():m.end()] = True
            self.planes[plane] = table
        return self.planes[plane]

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        """A mask of the ``codes`` (uint32 code points) in the class."""
        planes = codes >> 16
        if not len(codes) or not planes.any():
            return self._plane(0)[codes]
        out = np.empty(len(codes), dtype=bool)
        for plane in np.unique(planes).tolist():
            at = planes == plane
            out[at] = self._plane(plane)[codes[at] & 0xFFFF]
        return out
