"""The first cleaning step: NFC, control characters and whitespace, so that copies that differ only
in encoding (an NFD crawl, CRLF line ends, stray spaces) become byte-identical."""

from __future__ import annotations

import re
import unicodedata

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
