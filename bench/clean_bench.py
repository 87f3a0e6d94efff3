"""Cleaning throughput: `kolm clean` (near dedup, exact dedup only, no dedup) beside `kolm shard` on the
same input and the same cores, and the share of documents each cleaning step removed.

The input is the first ``--lines`` lines of the NSMC reviews (short, sentence-like documents) as an
uncompressed text file, so that both commands can split it into parallel work. Both commands run
as subprocesses with all workers, interleaved over ``--repeats`` rounds; a run is timed from start
to exit. Documents/s count input documents; tokens/s count the input's content tokens (from the
shard manifest, EOS excluded), so every row is measured in the same units. The table is printed
and added to ``bench/RESULTS.md``.

    .venv/bin/python bench/clean_bench.py                      # 100,000 NSMC lines, 2 rounds
    .venv/bin/python bench/clean_bench.py --lines 20000 --repeats 1 --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from common import (
    DEFAULT_CORPUS,
    OUT,
    bench_env,
    command_line,
    cpu_model,
    ensure_tokenizer,
    git_revision,
    kolm_cmd,
    library_versions,
    open_text,
    publish,
    rounds,
    run_timed,
    timestamp,
)

HEADING = "## Cleaning throughput"
METHODS = {
    "shard": "kolm shard (baseline)",
    "clean-near": "kolm clean (filters, PII, exact + near dedup)",
    "clean-exact": "kolm clean --dedup exact",
    "clean-none": "kolm clean --dedup none (filters and PII only)",
}


@dataclass
class Run:
    method: str
    seconds: float
    cpu: float
    background: float
    report: dict | None = None


def plain_corpus(corpus: Path, lines: int) -> Path:
    """The first ``lines`` lines of ``corpus`` as an uncompressed (splittable) text file, cached."""
    target = OUT / f"clean-corpus-{corpus.name.split('.')[0]}-{lines}.txt"
    if not target.is_file():
        OUT.mkdir(parents=True, exist_ok=True)
        with open_text(corpus) as src, open(target.with_suffix(".tmp"), "w", encoding="utf-8") as dst:
            for _, line in zip(range(lines), src):
                dst.write(line)
        os.replace(target.with_suffix(".tmp"), target)
    return target


def command(method: str, corpus: Path, tok: Path, out: Path, workers: int, unit_bytes: int) -> list[str]:
    if method == "shard":
        return kolm_cmd("shard", "--input", str(corpus), "--tokenizer", str(tok), "--out", str(out), "--workers",
                        str(workers), "--no-progress", "--valid-fraction", "0")
    dedup = method.removeprefix("clean-")
    return kolm_cmd("clean", "--input", str(corpus), "--out", str(out), "--workers", str(workers), "--no-progress",
                    "--dedup", dedup, "--unit-bytes", str(unit_bytes))


def measure(method: str, corpus: Path, tok: Path, workers: int, unit_bytes: int) -> Run:
    out = OUT / f"clean-bench-{method}"
    shutil.rmtree(out, ignore_errors=True)
    timed = run_timed(command(method, corpus, tok, out, workers, unit_bytes), bench_env())
    report = None
    if method == "shard":
        report = json.loads((out / "manifest.json").read_text())["corpus"]
    else:
        report = json.loads((out / "report.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return Run(method, timed.wall, timed.cpu, timed.background, report)


def table(runs: list[Run], documents: int, tokens: int, workers: int) -> list[str]:
    shard = statistics.median(r.seconds for r in runs if r.method == "shard")
    lines = ["| command | workers | median s | best s | docs/s | content tok/s | vs kolm shard | CPU s | "
             "others busy (cores) |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for method, label in METHODS.items():
        mine = [r for r in runs if r.method == method]
        med, best = statistics.median(r.seconds for r in mine), min(r.seconds for r in mine)
        lines.append(f"| {label} | {workers} | {med:.2f} | {best:.2f} | {documents / med:,.0f} | {tokens / med:,.0f} "
                     f"| {100 * shard / med:.1f}% | {statistics.median(r.cpu for r in mine):.1f} "
                     f"| {max(r.background for r in mine):.2f} |")
    return lines


def removed_shares(report: dict) -> list[str]:
    read = report["documents"]["read"]
    lines = ["| step | documents removed | share of input |", "|---|--:|--:|"]
    for step, n in report["removed"].items():
        lines.append(f"| {step} | {n:,} | {100 * n / read:.2f}% |")
    removed = report["documents"]["removed"]
    lines.append(f"| **all** | {removed:,} | {100 * removed / read:.2f}% |")
    masked = ", ".join(f"{k} {v:,}" for k, v in report["pii"].items() if v) or "none"
    lines.append(f"\nPII masked: {masked}; text bytes {report['bytes']['read']:,} before, "
                 f"{report['bytes']['written']:,} after.")
    return lines


def format_report(runs: list[Run], args: argparse.Namespace, corpus: Path, tok: Path, command_text: str) -> str:
    shard = next(r.report for r in runs if r.method == "shard")
    near = next(r.report for r in runs if r.method == "clean-near")
    documents, tokens = near["documents"]["read"], shard["tokens"] - shard["documents"]
    shard_med = statistics.median(r.seconds for r in runs if r.method == "shard")
    near_med = statistics.median(r.seconds for r in runs if r.method == "clean-near")
    verdict = "met" if shard_med / near_med >= 0.5 else "not met"
    return "\n".join([
        f"### {timestamp(utc=True)}", "",
        f"- machine: {os.cpu_count()} CPUs, {cpu_model()}, Python {sys.version.split()[0]}, "
        f"{library_versions(['datatrove', 'kiwipiepy', 'tokenizers'])}",
        f"- corpus: first {args.lines:,} lines of `{args.corpus}` ({documents:,} documents, {tokens:,} content tokens "
        f"with `{tok.name}`), uncompressed; kolm clean --unit-bytes {args.unit_bytes}",
        f"- kolm revision: {git_revision()}",
        f"- command: `{command_text}`",
        f"- {args.repeats} interleaved round(s); docs/s and tok/s are input documents and tokens per wall second; "
        "kolm clean's workers are started by datatrove's forkserver, not reaped by the command, so its 'CPU s' is "
        "the main process only and its workers count in 'others busy'",
        "", *table(runs, documents, tokens, args.workers), "",
        f"Goal (the whole cleaning pass, near dedup included, at no less than half of kolm shard's throughput): "
        f"**{verdict}** ({100 * shard_med / near_med:.1f}% of kolm shard).", "",
        "Documents removed per step (near-dedup run):", "", *removed_shares(near), ""])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--lines", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--unit-bytes", type=int, default=None, help="kolm clean's task size (default: a quarter "
                   "of the corpus per worker, so every worker has tasks)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--no-record", action="store_true", help="print only; do not add to bench/RESULTS.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    corpus = plain_corpus(args.corpus, args.lines)
    args.unit_bytes = args.unit_bytes or max(1 << 16, corpus.stat().st_size // (4 * args.workers))
    tok = ensure_tokenizer(corpus, args.vocab_size)
    runs = []
    for r, method in rounds(list(METHODS), args.repeats):
        run = measure(method, corpus, tok, args.workers, args.unit_bytes)
        print(f"round {r + 1}: {METHODS[method]}: {run.seconds:.2f} s", file=sys.stderr)
        runs.append(run)
    text = format_report(runs, args, corpus, tok, command_line("python", "bench/clean_bench.py", argv))
    publish(text, HEADING, "bench/clean_bench.py", not args.no_record)


if __name__ == "__main__":
    main()
