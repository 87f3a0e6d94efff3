"""What the benchmarks share: paths, the corpus, the interleaved schedule, load accounting (how busy
other processes keep the CPUs), timed subprocess runs, machine information and RESULTS.md.

The benchmarks run as scripts (``python bench/x.py``), so ``bench/`` is on ``sys.path`` and they
``import common``."""

from __future__ import annotations

import contextlib
import datetime
import gzip
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = Path(os.environ.get("KOLM_BENCH_OUT") or BENCH / "out")  # scratch: caches, runs (tests point it elsewhere)
RESULTS = BENCH / "RESULTS.md"
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpora" / "nsmc-reviews.txt.gz"


def die(message: str) -> NoReturn:
    """Exit with ``message``, prefixed by the running script's name."""
    sys.exit(f"{Path(sys.argv[0]).stem}: {message}")


def command_line(python: str, script: str, argv: list[str] | None) -> str:
    """The command that started this run, as RESULTS.md shows it."""
    return shlex.join([python, script, *(sys.argv[1:] if argv is None else argv)])


# --------------------------------------------------------------------------- corpus


def open_text(path: Path):
    """A text-mode handle on a plain or gzipped UTF-8 file."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def read_lines(path: Path) -> list[str]:
    """One document per line, as kolm reads plain text (and the seed its samples): stripped, empty
    lines dropped."""
    with open_text(path) as f:
        return [s for s in (line.strip() for line in f) if s]


def stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".txt").removesuffix(".jsonl")


def prepare_corpus(corpus: Path, lines: int) -> Path:
    """A cached gzip (in ``bench/out/``) of the first ``lines`` lines of ``corpus``."""
    kind = ".jsonl.gz" if corpus.name.endswith((".jsonl", ".jsonl.gz")) else ".txt.gz"
    target = OUT / f"corpus-{stem(corpus)}-{lines}{kind}"
    if not target.is_file():
        OUT.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        with open_text(corpus) as src, gzip.open(tmp, "wt", encoding="utf-8") as dst:
            for _, line in zip(range(lines), src):
                dst.write(line)
        os.replace(tmp, target)
    return target


def rounds(methods: list[str], repeats: int) -> Iterable[tuple[int, str]]:
    """Interleaved schedule: every method once per round, the order rotated each round."""
    for r in range(repeats):
        k = r % len(methods)
        for m in methods[k:] + methods[:k]:
            yield r, m


def kolm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kolm", *args]


def run_quiet(cmd: list[str], what: str) -> None:
    print(f"{what}: {shlex.join(cmd)}", file=sys.stderr)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        die(f"{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def ensure_tokenizer(corpus: Path, vocab_size: int) -> Path:
    """A byte-level BPE trained with ``kolm tokenizer train`` on the benchmark text, cached."""
    target = OUT / f"tokenizer-{stem(corpus)}-v{vocab_size}"
    if not (target / "tokenizer.json").is_file():
        run_quiet(kolm_cmd("tokenizer", "train", "--input", str(corpus), "--vocab-size", str(vocab_size),
                           "--out", str(target), "--force"), "training the tokenizer")
    return target


def ensure_shards(corpus: Path, tok: Path, valid_fraction: float) -> Path:
    """kolm shards of the benchmark text with that tokenizer, cached."""
    target = OUT / f"train-shards-{stem(corpus)}-{tok.name}"
    if not (target / "manifest.json").is_file():
        run_quiet(kolm_cmd("shard", "--input", str(corpus), "--tokenizer", str(tok), "--out", str(target),
                           "--valid-fraction", str(valid_fraction), "--overwrite", "--no-progress"), "sharding")
    return target


def ensure_training_data(corpus: Path, vocab_size: int, valid_fraction: float = 0.002) -> tuple[Path, Path]:
    """(tokenizer, shards) of the benchmark text, each cached in ``bench/out/``."""
    tok = ensure_tokenizer(corpus, vocab_size)
    return tok, ensure_shards(corpus, tok, valid_fraction)


def korean_training_data(corpus: Path, lines: int, vocab_size: int, valid_fraction: float) -> tuple[Path, Path]:
    """(tokenizer, shards) of the first ``lines`` lines of a corpus the user names, or a clear exit."""
    if not corpus.is_file():
        die(f"no corpus at {corpus}; pass --corpus PATH (any Korean .txt, .txt.gz or .jsonl corpus)")
    return ensure_training_data(prepare_corpus(corpus, lines), vocab_size, valid_fraction)


# --------------------------------------------------------------------------- load accounting


def busy_jiffies() -> int:
    """Busy jiffies over all CPUs from /proc/stat (all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's reaped children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def busy_cores(seconds: float = 1.0) -> float:
    """Cores kept busy by all processes right now (sampled over ``seconds``)."""
    b0 = busy_jiffies()
    time.sleep(seconds)
    return (busy_jiffies() - b0) / os.sysconf("SC_CLK_TCK") / seconds


def wait_for_quiet(threshold: float, max_wait: float, poll: float = 5.0) -> float:
    """Wait until other processes use fewer than ``threshold`` cores (at most ``max_wait`` s)."""
    deadline = time.monotonic() + max_wait
    load = busy_cores()
    while load > threshold and time.monotonic() < deadline:
        print(f"  waiting: other processes busy on {load:.2f} cores", file=sys.stderr)
        time.sleep(poll)
        load = busy_cores()
    return load


def bench_env(drop: Iterable[str] = (), **extra: str) -> dict[str, str]:
    """This environment without ``drop``, offline, with Hugging Face's cache in ``bench/out/`` and a
    fixed hash seed, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in set(drop)}
    env.update(HF_HOME=str(OUT / "hf-home"), HF_HUB_OFFLINE="1", PYTHONHASHSEED="0", **extra)
    return env


@dataclass
class Timed:
    wall: float
    cpu: float  # CPU seconds of the command's process tree
    background: float  # cores kept busy by other processes meanwhile
    stdout: str
    stderr: str


def run_timed(cmd: list[str], env: dict[str, str], log: Path | None = None, timeout: float | None = None,
              cwd: Path | None = None) -> Timed:
    """Run ``cmd`` to completion in its own process group (killed on timeout or interrupt): wall time,
    CPU of its process tree and others' load meanwhile. Its stderr goes to ``log`` if given."""
    b0, c0, t0 = busy_jiffies(), children_cpu(), time.perf_counter()
    with open(log, "w") if log else contextlib.nullcontext(subprocess.PIPE) as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException as e:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(e, subprocess.TimeoutExpired):
                die(f"{shlex.join(cmd)} ran past {timeout:.0f} s" + (f"; log in {log}" if log else ""))
            raise
    wall = time.perf_counter() - t0
    cpu = children_cpu() - c0
    others = max(0.0, ((busy_jiffies() - b0) / os.sysconf("SC_CLK_TCK") - cpu) / wall)
    if log:
        stderr = log.read_text(errors="replace")
    if proc.returncode != 0:
        die(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{stderr[-4000:]}")
    return Timed(wall, cpu, others, stdout, stderr)


# --------------------------------------------------------------------------- kolm train for a wall-clock budget


def start_ranks(path: Path, log: Path, ranks: int = 2, threads: int = 1) -> list[subprocess.Popen]:
    """``ranks`` `kolm train` processes of ``threads`` threads each, with the environment torchrun would give
    them."""
    from kolm.train.distenv import free_port

    port = str(free_port())
    procs = []
    for rank in range(ranks):
        env = bench_env(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(ranks),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS=str(threads),
                        DS_ACCELERATOR="cpu")
        with open(log.with_name(f"{log.stem}-rank{rank}.log"), "w") as out:
            procs.append(subprocess.Popen(kolm_cmd("train", "--config", str(path)), env=env, stdout=out,
                                          stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True))
    return procs


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def wait_for_first_step(procs: list[subprocess.Popen], run_dir: Path, timeout: float) -> None:
    """Until the run's first training step is logged (start-up is not part of a training budget)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.is_file() and metrics.stat().st_size > 0):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            kill_all(procs)
            die(f"no training step logged in {run_dir}; see the rank logs beside it")
        time.sleep(0.2)


def train_kolm_for(recipe: dict, work: Path, seconds: float, timeout: float, ranks: int = 2) -> dict:
    """Run `kolm train` with ``recipe`` on ``ranks`` local ranks (sharing 2 threads) for ``seconds`` after its
    first logged step, then SIGUSR1 (checkpoint and stop); a run that ends by itself sooner is kept as it is.
    What it reached."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    path = work / "recipe.yaml"
    path.write_text(json.dumps(recipe), encoding="utf-8")
    procs = start_ranks(path, work / "train.log", ranks, max(1, 2 // ranks))
    wait_for_first_step(procs, Path(recipe["run_dir"]), timeout)
    b0, started = busy_jiffies(), time.monotonic()  # start-up is not part of the budget
    while time.monotonic() - started < seconds and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGUSR1)
    codes = [p.wait(timeout=timeout) for p in procs]
    trained = time.monotonic() - started
    if set(codes) - {0, 75} or len(set(codes)) != 1:
        die(f"{work}: exit {codes}, expected 75 (stopped by the signal) or 0 (finished); see its rank logs")
    from kolm.train.metrics import read_metrics

    records = read_metrics(Path(recipe["run_dir"])).train
    return {"run": Path(recipe["run_dir"]), "seconds": trained, "steps": records[-1]["step"],
            "samples": records[-1]["consumed_samples"], "finished": codes[0] == 0,
            "train_loss": sum(r["loss"] for r in records[-10:]) / min(10, len(records)),
            "busy": (busy_jiffies() - b0) / os.sysconf("SC_CLK_TCK") / max(trained, 1e-9)}


# --------------------------------------------------------------------------- machine information


def timestamp(utc: bool = False) -> str:
    """Now, for an entry's heading: local time with its zone, or UTC."""
    if utc:
        return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def library_versions(names: Iterable[str]) -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def uptime() -> str:
    return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" (uncommitted changes)" if dirty else "")


# --------------------------------------------------------------------------- RESULTS.md


def publish(report: str, heading: str, script: str, record: bool) -> None:
    """Print a benchmark's report and, when ``record``, add it to RESULTS.md under ``heading``."""
    print(report)
    if record:
        append_results(report, heading, script)
        print(f"appended to {RESULTS}", file=sys.stderr)


def append_results(block: str, heading: str, script: str, append_only: bool = False) -> None:
    """Add ``block`` to RESULTS.md under ``heading`` (a "## " line; a section this adds says it is
    written by ``script``, newest last): at the end of that section, which is added at the end of the
    file if missing; or, ``append_only``, at the end of the file, rewriting nothing already there."""
    intro = f"\n{heading}\n\nWritten by `{script}`; newest last.\n"
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else ""
    if append_only:
        _append_at_end(text, block, heading, intro)
    else:
        _add_to_section(text or "# Benchmark results\n", block, heading, intro)


def _append_at_end(text: str, block: str, heading: str, intro: str) -> None:
    """Append ``block``, under a new ``heading`` unless the last section already is that one."""
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    prefix = "" if text else "# Benchmark results\n"
    if not headings or headings[-1].strip() != heading:
        prefix += intro
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(("\n" if text and not text.endswith("\n") else "") + prefix + "\n" + block)


def _add_to_section(text: str, block: str, heading: str, intro: str) -> None:
    if heading not in text:
        text = text.rstrip("\n") + "\n" + intro
    start = text.index(heading) + len(heading)
    nxt = text.find("\n## ", start)
    end = len(text) if nxt < 0 else nxt + 1
    section = text[:end].rstrip("\n") + "\n\n" + block
    RESULTS.write_text(section + ("\n" + text[end:] if end < len(text) else ""), encoding="utf-8")
