"""`kolm clean`'s report: documents read and kept, removed per filter and dedup step, PII masked
per kind, bytes before and after; written as ``report.json`` and printed as a summary."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from kolm.data.clean_io import load_counts
from kolm.files import atomic_write_json

REPORT_FORMAT = 1


def finish(out: Path, work: Path, plan: dict, steps: list[str]) -> dict:
    """Add up every task's counts, write the removed examples and then ``report.json``."""
    counts: dict[str, Counter] = {}
    examples: dict[str, list[dict]] = {}
    for step in steps:
        counts[step], found = load_counts(work / "counts", step, plan["tasks"])
        for why, items in found.items():
            examples.setdefault(why, []).extend(items)
    from kolm.data.clean_dedup import count_exact_duplicates

    report = build_report(plan, counts, count_exact_duplicates(work / "exact" / "dups"))
    write_examples(out / "removed", examples, plan["config"]["filters"]["examples_per_filter"])
    atomic_write_json(out / "report.json", report)
    return report


def build_report(plan: dict, counts: dict[str, Counter], exact_copies: int) -> dict:
    read, write = counts["read"], counts["write"]
    removed: dict[str, int] = {}
    for step in ("normalize", "filters"):
        for key, value in sorted(counts.get(step, Counter()).items()):
            if key.startswith("removed_"):
                removed[key.removeprefix("removed_")] = value
    prepared = counts["prepared"]["documents_written"]
    if "after_exact" in counts:
        removed["exact_duplicate"] = prepared - counts["after_exact"]["documents"]
    if "after_near" in counts:  # the clusters hold the exact copies too; those are counted as exact
        removed["exact_duplicate"] = exact_copies
        removed["near_duplicate"] = prepared - counts["after_near"]["documents"] - exact_copies
    filters = counts.get("filters", Counter())
    return {
        "format": REPORT_FORMAT,
        "documents": {"read": read["documents_read"], "kept": write["documents_written"],
                      "removed": sum(removed.values())},
        "removed": removed,
        "modified": {"runs_shortened": filters["runs_shortened"],
                     "boilerplate_lines_removed": filters["boilerplate_lines_removed"]},
        "pii": {k.removeprefix("pii_"): v for k, v in sorted(counts.get("pii", Counter()).items())},
        "bytes": {"read": read["bytes_read"], "written": write["bytes_written"]},
        "input": {"repaired_utf8": read["repaired_utf8"], "malformed_skipped": read["malformed_skipped"]},
        "outputs": [f"{t:05d}.jsonl.gz" for t in range(plan["tasks"])],
        "plan": plan,
    }


def write_examples(folder: Path, examples: dict[str, list[dict]], per_filter: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for why, items in sorted(examples.items()):
        if items:
            atomic_write_json(folder / f"{why}.json", items[:per_filter])


def summary(out: str, report: dict, seconds: float | None = None) -> str:
    """The printed summary of a report."""
    docs, size = report["documents"], report["bytes"]
    took = f" in {seconds:.1f}s ({docs['read'] / max(seconds, 1e-9):,.0f} docs/s)" if seconds else ""
    lines = [f"cleaned {docs['read']:,} documents into {out}{took}",
             f"kept {docs['kept']:,} ({_share(docs['kept'], docs['read'])}), removed {docs['removed']:,}"]
    for why, n in report["removed"].items():
        lines.append(f"  removed by {why:<16} {n:>10,}  ({_share(n, docs['read'])})")
    for what, n in report["modified"].items():
        if n:
            lines.append(f"  {what.replace('_', ' '):<27} {n:>10,}")
    masked = ", ".join(f"{kind} {n:,}" for kind, n in report["pii"].items() if n) or "none"
    lines.append(f"PII masked: {masked}")
    lines.append(f"text bytes: {size['read']:,} before, {size['written']:,} after "
                 f"({_share(size['written'], size['read'])})")
    return "\n".join(lines)


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"
