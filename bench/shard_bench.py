"""Sharding throughput: `kolm shard` end to end vs the seed's `datasets.map` vs raw `tokenizers`.

One run trains (or reuses) a tokenizer, then measures on the same tokenizer and the same input:

* ``kolm shard``       the CLI as a subprocess, fresh output directory per repetition, N workers and 1 worker;
* ``seed datasets.map`` read the lines, ``Dataset.from_dict`` and ``.map(tokenizer, batched=True, num_proc=N)``
                       with ``AutoTokenizer``, timed from reading to the end of the map;
* ``ceiling``          ``Tokenizer.encode_batch`` (and the stricter ``encode_batch_fast``) on all cores over the
                       already-decoded, already-stripped lines in memory (reading excluded).

Every measurement runs in a fresh process, repetitions are interleaved (the order rotates each round),
and tokens are counted as content tokens (kolm's one EOS per document is subtracted; the EOS-inclusive
rate of kolm is shown too). The Markdown table is printed and added to ``bench/RESULTS.md``.

    .venv/bin/python bench/shard_bench.py                    # full NSMC corpus, 3 rounds
    .venv/bin/python bench/shard_bench.py --lines 50000 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from common import (
    DEFAULT_CORPUS,
    OUT,
    RESULTS,
    ROOT,
    append_results,
    bench_env,
    command_line,
    cpu_model,
    die,
    git_revision,
    library_versions,
    prepare_corpus,
    read_lines,
    rounds,
    run_timed,
    stem,
    timestamp,
    wait_for_quiet,
)

HEADING = "## Sharding throughput"

KOLM_ALL, KOLM_ONE, SEED, CEIL, CEIL_FAST = "kolm", "kolm-1", "seed", "ceiling", "ceiling-fast"
METHODS = (KOLM_ALL, KOLM_ONE, SEED, CEIL, CEIL_FAST)
CHILD_KINDS = (SEED, CEIL, CEIL_FAST)


@dataclass
class Measurement:
    """One timed run of one method."""

    method: str
    workers: int
    seconds: float  # the timed section (see the module docstring for what each method includes)
    cpu_seconds: float  # CPU (user + system, all processes and threads) of the timed section
    documents: int
    content_tokens: int
    eos_tokens: int  # kolm appends one EOS per document; the other methods add none
    background: float  # cores kept busy by other processes during the run (from /proc/stat)
    round: int = 0


# --------------------------------------------------------------------------- corpus and tokenizer


def kolm_executable() -> str:
    candidate = Path(sys.executable).parent / "kolm"
    found = str(candidate) if candidate.is_file() else shutil.which("kolm")
    if not found:
        die("the `kolm` command is not installed in this environment (pip install -e .)")
    return found


def ensure_tokenizer(corpus: Path, vocab_size: int, max_documents: int) -> Path:
    """Train a byte-level BPE with kolm once and cache it under bench/out/."""
    target = OUT / f"tokenizer-{stem(corpus)}-v{vocab_size}-d{max_documents}"
    if (target / "tokenizer.json").is_file():
        return target
    cmd = [kolm_executable(), "tokenizer", "train", "--input", str(corpus), "--vocab-size", str(vocab_size),
           "--max-documents", str(max_documents), "--out", str(target), "--force"]
    print(f"training the tokenizer: {shlex.join(cmd)}", file=sys.stderr)
    subprocess.run(cmd, check=True)
    return target


# --------------------------------------------------------------------------- the methods


def base_env() -> dict[str, str]:
    return bench_env(drop=("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS"))


def measure_kolm(method: str, corpus: Path, tok: Path, workers: int) -> Measurement:
    out = OUT / "shards-run"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [kolm_executable(), "shard", "--input", str(corpus), "--tokenizer", str(tok), "--out", str(out),
           "--workers", str(workers), "--no-progress"]
    timed = run_timed(cmd, base_env())
    corpus_stats = json.loads((out / "manifest.json").read_text())["corpus"]
    shutil.rmtree(out, ignore_errors=True)
    docs = corpus_stats["documents"]
    return Measurement(method, workers, timed.wall, timed.cpu, docs, corpus_stats["tokens"] - docs, docs,
                       timed.background)


def measure_child(kind: str, corpus: Path, tok: Path, workers: int) -> Measurement:
    """Run a seed or ceiling measurement in a fresh interpreter (see ``child_main``)."""
    env = base_env()
    if kind != SEED:  # the ceiling: the Rust thread pool on all cores
        env["TOKENIZERS_PARALLELISM"] = "true"
        env["RAYON_NUM_THREADS"] = str(workers)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--corpus", str(corpus),
           "--tokenizer-dir", str(tok), "--workers", str(workers)]
    timed = run_timed(cmd, env)
    report = json.loads(timed.stdout.strip().splitlines()[-1])
    return Measurement(kind, workers, report["seconds"], report["cpu_seconds"], report["documents"],
                       report["tokens"], 0, timed.background)


def own_cpu() -> float:
    """CPU seconds of this process (all threads) and of its reaped children (a pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def child_seed(corpus: Path, tok_dir: Path, workers: int) -> dict:
    """The seed's pipeline, as a Hugging Face Trainer script would tokenize (imports not timed)."""
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    start, cpu = time.perf_counter(), own_cpu()
    lines = read_lines(corpus)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    dataset = datasets.Dataset.from_dict({"text": lines})
    mapped = dataset.map(lambda b: tokenizer(b["text"]), batched=True, num_proc=workers)
    seconds, cpu = time.perf_counter() - start, own_cpu() - cpu
    lengths = pc.list_value_length(mapped.data.column("input_ids"))
    return {"seconds": seconds, "cpu_seconds": cpu, "documents": len(mapped), "tokens": pc.sum(lengths).as_py()}


def child_ceiling(corpus: Path, tok_dir: Path, fast: bool) -> dict:
    """Raw `tokenizers` on the lines already in memory: only the encode call is timed."""
    from tokenizers import Tokenizer

    lines = read_lines(corpus)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    start, cpu = time.perf_counter(), own_cpu()
    encodings = encode(lines, add_special_tokens=False)
    seconds, cpu = time.perf_counter() - start, own_cpu() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "documents": len(lines), "tokens": sum(len(e) for e in encodings)}


def child_main(kind: str, corpus: Path, tok_dir: Path, workers: int) -> None:
    report = child_seed(corpus, tok_dir, workers) if kind == SEED else child_ceiling(corpus, tok_dir, kind == CEIL_FAST)
    print(json.dumps(report))


# --------------------------------------------------------------------------- the run


def measure(method: str, corpus: Path, tok: Path, workers: int) -> Measurement:
    if method == KOLM_ALL:
        return measure_kolm(method, corpus, tok, workers)
    if method == KOLM_ONE:
        return measure_kolm(method, corpus, tok, 1)
    return measure_child(method, corpus, tok, workers)


@dataclass(frozen=True)
class LoadPolicy:
    """How the bench copes with a machine shared with other work."""

    quiet: float  # wait for the others' load to drop below this many cores before each run
    max_wait: float  # for at most this many seconds
    max_background: float  # discard and repeat a run that others disturbed more than this
    retries: int


def measure_clean(method: str, corpus: Path, tok: Path, workers: int, load: LoadPolicy) -> Measurement:
    """Measure once; while other processes disturbed the run (busy on more than ``load.max_background``
    cores), wait for quiet and measure again, at most ``load.retries`` more times."""
    for attempt in range(load.retries + 1):
        wait_for_quiet(load.quiet, load.max_wait, poll=4.0)
        m = measure(method, corpus, tok, workers)
        if m.background <= load.max_background:
            break
        if attempt < load.retries:
            print(f"  {method}: discarded ({m.seconds:.1f} s) because other processes were busy on "
                  f"{m.background:.2f} cores; measuring again", file=sys.stderr)
    return m


def run_all(methods: list[str], repeats: int, corpus: Path, tok: Path, workers: int,
            load: LoadPolicy) -> list[Measurement]:
    results = []
    for r, method in rounds(methods, repeats):
        m = measure_clean(method, corpus, tok, workers, load)
        m.round = r
        print(f"  round {r + 1}/{repeats} {method:13s} {m.seconds:7.2f} s  {m.content_tokens / m.seconds:10,.0f} tok/s"
              f"  cpu {m.cpu_seconds:6.1f} s  others busy {m.background:.2f} cores", file=sys.stderr)
        results.append(m)
    return results


# --------------------------------------------------------------------------- reporting

LABELS = {
    KOLM_ALL: "kolm shard, end to end (CLI)",
    KOLM_ONE: "kolm shard, end to end (CLI)",
    SEED: "seed: read + datasets.map(AutoTokenizer)",
    CEIL: "ceiling: Tokenizer.encode_batch",
    CEIL_FAST: "ceiling: Tokenizer.encode_batch_fast",
}


@dataclass
class Summary:
    method: str
    workers: int
    documents: int
    content_tokens: int
    eos_tokens: int
    median_s: float
    best_s: float
    cpu_s: float
    background: float

    @property
    def rate(self) -> float:
        """Content tokens per second, on the median time."""
        return self.content_tokens / self.median_s

    @property
    def best_rate(self) -> float:
        return self.content_tokens / self.best_s

    @property
    def rate_with_eos(self) -> float:
        return (self.content_tokens + self.eos_tokens) / self.median_s


def usable(results: list[Measurement], max_background: float) -> list[Measurement]:
    """The undisturbed runs of each method, or all its runs where none was undisturbed."""
    kept = []
    for method in METHODS:
        runs = [m for m in results if m.method == method]
        clean = [m for m in runs if m.background <= max_background]
        kept += clean or runs
    return kept


def summarize(results: list[Measurement]) -> dict[str, Summary]:
    out = {}
    for method in METHODS:
        runs = [m for m in results if m.method == method]
        if runs:
            first = runs[0]
            out[method] = Summary(
                method, first.workers, first.documents, first.content_tokens, first.eos_tokens,
                statistics.median(m.seconds for m in runs), min(m.seconds for m in runs),
                statistics.median(m.cpu_seconds for m in runs), max(m.background for m in runs),
            )
    return out


def token_mismatches(results: list[Measurement]) -> list[str]:
    counts = {(m.method, m.documents, m.content_tokens) for m in results}
    if len({(d, t) for _, d, t in counts}) <= 1:
        return []
    return [f"{method}: {docs} documents, {tokens} content tokens" for method, docs, tokens in sorted(counts)]


def ratio(s: dict[str, Summary], a: str, b: str, rate: Callable[[Summary], float]) -> str:
    if a not in s or b not in s:
        return "n/a"
    return f"{rate(s[a]) / rate(s[b]):.1%}"


def format_table(s: dict[str, Summary]) -> str:
    ceiling = s.get(CEIL)
    rows = [
        "| method | workers | content tokens | median s | best s | content tok/s (median) | tok/s incl. EOS "
        "| CPU s | vs ceiling | others busy (cores, max) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for m in s.values():
        vs = f"{m.rate / ceiling.rate:.1%}" if ceiling else "n/a"
        rows.append(
            f"| {LABELS[m.method]} | {m.workers} | {m.content_tokens:,} | {m.median_s:.2f} | {m.best_s:.2f} "
            f"| {m.rate:,.0f} | {m.rate_with_eos:,.0f} | {m.cpu_s:.1f} | {vs} | {m.background:.2f} |"
        )
    return "\n".join(rows)


def paired_ratios(results: list[Measurement], a: str, b: str) -> list[float]:
    """Throughput of ``a`` over ``b`` within each round where both have a run: runs close in time see
    the same machine, which matters where the host's speed drifts."""
    ratios = []
    for r in sorted({m.round for m in results}):
        ma = [m for m in results if m.round == r and m.method == a]
        mb = [m for m in results if m.round == r and m.method == b]
        if ma and mb:
            ratios.append(mb[0].seconds / ma[0].seconds)
    return ratios


def format_ratios(s: dict[str, Summary], results: list[Measurement]) -> str:
    def med(x: Summary) -> float:
        return x.rate

    def best(x: Summary) -> float:
        return x.best_rate

    lines = []
    for label, a, b in (
        ("kolm / ceiling (encode_batch)", KOLM_ALL, CEIL),
        ("kolm / ceiling (encode_batch_fast)", KOLM_ALL, CEIL_FAST),
        ("kolm / seed", KOLM_ALL, SEED),
        ("kolm all workers / kolm 1 worker", KOLM_ALL, KOLM_ONE),
    ):
        paired = paired_ratios(results, a, b)
        within = (
            f"; per round: median {statistics.median(paired):.1%} ({', '.join(f'{x:.0%}' for x in paired)})"
            if paired else ""
        )
        lines.append(f"- {label}: {ratio(s, a, b, med)} (medians), {ratio(s, a, b, best)} (bests){within}")
    return "\n".join(lines)


def report_header(args: argparse.Namespace, corpus: Path, tok: Path, command: str, documents: int) -> list[str]:
    """The entry's heading and its list of conditions: machine, corpus, tokenizer, revision, method."""
    return [
        f"### {timestamp()}",
        "",
        f"- machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}, Python {platform.python_version()}, "
        f"{library_versions(('tokenizers', 'transformers', 'datasets'))}",
        f"- corpus: `{corpus}` ({documents:,} documents"
        + (f", first {args.lines:,} lines of `{args.corpus}`" if args.lines else "") + ")",
        f"- tokenizer: `{tok.relative_to(ROOT) if tok.is_relative_to(ROOT) else tok}` (kolm byte-level BPE, "
        f"vocabulary {args.vocab_size}, trained on the first {args.max_documents:,} documents)",
        f"- kolm revision: {git_revision()}",
        f"- command: `{command}`",
        f"- {args.repeats} interleaved rounds; time = median (best also shown); tokens = content tokens "
        "(kolm's EOS per document excluded, shown in 'tok/s incl. EOS'); CPU s = median CPU of the timed "
        "section, all processes and threads",
    ]


def report_cautions(results: list[Measurement], kept: list[Measurement], max_background: float) -> list[str]:
    """What the reader should know about the figures: token counts that differ, disturbed runs."""
    lines = []
    notes = token_mismatches(results)
    if notes:
        lines += ["", "**Token counts differ between methods:** " + "; ".join(notes)]
    disturbed = [m for m in kept if m.background > max_background]
    if disturbed:
        lines += ["", f"**Caution:** {len(disturbed)} of the {len(kept)} runs summarized were disturbed by other "
                  f"processes (busy on more than {max_background} cores during the run, even after retries); "
                  "prefer the 'best s' column."]
    elif len(kept) < len(results):
        lines += ["", f"{len(results) - len(kept)} run(s) disturbed by other processes (even after retries) are "
                  "left out of the summary."]
    return lines


def format_report(results: list[Measurement], args: argparse.Namespace, corpus: Path, tok: Path,
                  command: str) -> str:
    kept = usable(results, args.max_background)
    s = summarize(kept)
    docs = max(m.documents for m in s.values())
    lines = [*report_header(args, corpus, tok, command, docs), "", format_table(s), "", format_ratios(s, kept),
             *report_cautions(results, kept, args.max_background)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help=f"input corpus (default: {DEFAULT_CORPUS})")
    p.add_argument("--lines", type=int, default=None, help="use only the first N lines (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="cores for every method (default: all)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="subset to run")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--max-documents", type=int, default=100_000, help="tokenizer training sample")
    p.add_argument("--quiet-cores", type=float, default=0.3,
                   help="before each run, wait until other processes use fewer cores than this (default: 0.3)")
    p.add_argument("--max-wait", type=float, default=600.0, help="longest such wait in seconds (default: 600)")
    p.add_argument("--max-background", type=float, default=0.25,
                   help="repeat a run during which other processes used more cores than this (default: 0.25)")
    p.add_argument("--retries", type=int, default=3, help="at most this many repeats per run (default: 3)")
    p.add_argument("--no-record", action="store_true", help=f"print only; do not append to {RESULTS.name}")
    p.add_argument("--child", choices=CHILD_KINDS, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer-dir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.corpus, args.tokenizer_dir, args.workers)
        return 0
    if not args.corpus.is_file():
        die(f"no corpus at {args.corpus}; pass --corpus PATH")
    command = command_line(Path(sys.executable).name, "bench/shard_bench.py", argv)
    tok = ensure_tokenizer(args.corpus, args.vocab_size, args.max_documents)
    corpus = args.corpus if args.lines is None else prepare_corpus(args.corpus, args.lines)
    load = LoadPolicy(args.quiet_cores, args.max_wait, args.max_background, args.retries)
    results = run_all(args.methods, args.repeats, corpus, tok, args.workers, load)
    report = format_report(results, args, corpus, tok, command)
    print(report)
    if not args.no_record:
        append_results(report, HEADING, "bench/shard_bench.py")
        print(f"appended to {RESULTS}", file=sys.stderr)
    (OUT / "last-run.json").write_text(json.dumps([asdict(m) for m in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
