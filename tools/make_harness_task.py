#!/usr/bin/env python3
"""Write kolm's example lm-evaluation-harness task from the constitution text kolm already bundles.

    python tools/make_harness_task.py        # rewrites kolm/export/tasks/ko_constitution_cloze.jsonl

Each item is one clause of the Korean constitution cut at a space near its middle: the model sees
the first part and chooses its true ending among four (the other three are endings of other
clauses, drawn with a fixed seed). The output is deterministic: rerunning it changes nothing.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from kolm.data.corpus import bundled_corpus_files

OUT = Path(__file__).resolve().parent.parent / "kolm" / "export" / "tasks" / "ko_constitution_cloze.jsonl"
ITEMS = 60


def clauses() -> list[str]:
    path = next(f for f in bundled_corpus_files() if f.endswith("constitution.txt"))
    found = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        text = re.sub(r"^(제\d+조(의\d+)?\s*)?[①-⑳]?\s*", "", line.strip())  # article and clause numbers
        if 30 <= len(text) <= 90 and text.endswith("."):
            found.append(text)
    return found


def split(text: str) -> tuple[str, str]:
    spaces = [i for i, c in enumerate(text) if c == " "]
    cut = min(spaces, key=lambda i: abs(i - len(text) // 2))
    return text[:cut], text[cut + 1:]


def main() -> None:
    rng = random.Random(20261129)
    pool = clauses()
    chosen = rng.sample(pool, ITEMS)
    endings = [split(t)[1] for t in pool]
    with open(OUT, "w", encoding="utf-8") as f:
        for text in chosen:
            context, ending = split(text)
            distractors = rng.sample([e for e in endings if e != ending], 3)
            choices = [ending, *distractors]
            rng.shuffle(choices)
            item = {"context": context, "choices": choices, "answer": choices.index(ending)}
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"{OUT}: {ITEMS} items from {len(pool)} clauses")


if __name__ == "__main__":
    main()
