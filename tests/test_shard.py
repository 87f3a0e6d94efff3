"""`kolm shard` end to end: real corpora, real subprocesses, real tokenizers, no mocks.

The shards must decode back to the normalized input, be byte-identical whatever the number of
workers, array tasks or kills along the way, be readable by megatron-core, and keep memory flat.
Bad input is covered in test_shard_bad_input.py; the helpers both use are in helpers/shard.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers.shard import (
    assert_same_documents,
    assert_same_output,
    assert_user_error,
    clean_env,
    decoded,
    kolm,
    leftovers,
    manifest,
    normalized,
    shard,
    shard_args,
    shard_documents,
    tree_digest,
    units_done,
    write_corpus,
    write_jsonl,
    write_lines,
    write_parquet,
)

from kolm.data import indexed as kolm_indexed
from kolm.data import jobs
from kolm.data.indexed import write_index
from kolm.data.manifest import load_shard_dir
from kolm.data.shard import prepare_output, run_shard
from kolm.errors import KolmError

# Small chunks, shards and units so that chunking, rollover and unit boundaries all happen.
SMALL = ("--chunk-docs", "64", "--max-shard-tokens", "5000", "--unit-bytes", "40000")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, korean_corpus, tokenizer_dir) -> Path:
    """The bundled corpus as several units of several small shards, both splits non-empty."""
    out = tmp_path_factory.mktemp("small") / "shards"
    shard(korean_corpus, tokenizer_dir, out, "--valid-fraction", "0.1", *SMALL)
    return out


@pytest.fixture
def damaged(tmp_path, small_shards) -> Path:
    """A private copy of ``small_shards`` that a test may break."""
    return Path(shutil.copytree(small_shards, tmp_path / "shards"))


# --------------------------------------------------------------------------- 1. round trip



def mixed_inputs(d: Path, lines: list[str], field: str) -> list[Path]:
    """The corpus spread over .txt, .txt.gz, .jsonl.gz and .parquet, with messy whitespace,
    decomposed (NFD) Hangul and blank lines; JSON/parquet hold the text in ``field`` next to
    a decoy field."""
    parts = [lines[i::4] for i in range(4)]
    messy = [
        unicodedata.normalize("NFD", line) if i % 3 == 0 else f"  \t{line}  " if i % 3 == 1 else line
        for i, line in enumerate(parts[0])
    ]
    messy[5:5] = ["", "   ", "\t"]
    decoy = "text" if field != "text" else "title"
    texts = [unicodedata.normalize("NFD", t) if i % 5 == 0 else t for i, t in enumerate(parts[2])]
    records = [{field: t, decoy: "x"} for t in texts]
    return [
        write_lines(d / "plain.txt", messy),
        write_lines(d / "packed.txt.gz", parts[1]),
        write_jsonl(d / "records.jsonl.gz", records),
        write_parquet(d / "table.parquet", {decoy: ["x"] * len(parts[3]), field: parts[3]}),
    ]


@pytest.mark.cli
@pytest.mark.parametrize("field", ["text", "body"])
def test_shards_decode_to_the_normalized_input(tmp_path, korean_lines, tokenizer_dir, field):
    inputs = mixed_inputs(tmp_path, korean_lines, field)
    out = tmp_path / "shards"
    options = ["--valid-fraction", "0.2", "--chunk-docs", "64", "--unit-bytes", "20000", "--workers", "2"]
    shard(inputs, tokenizer_dir, out, *options, *(["--text-field", field] if field != "text" else []))

    expected = normalized(korean_lines)
    assert_same_documents(decoded(out, tokenizer_dir), expected)
    m = manifest(out)
    assert m["splits"]["train"]["documents"] > 0 and m["splits"]["valid"]["documents"] > 0
    corpus = m["corpus"]
    assert corpus["documents"] == len(expected)
    assert corpus["records"] == len(korean_lines) + 3
    assert corpus["skipped_empty"] == 3
    assert corpus["characters"] == sum(map(len, expected))
    assert corpus["repaired_utf8"] == corpus["long_documents"] == corpus["malformed_skipped"] == 0
    assert kolm("shard", "verify", out, "--tokenizer", tokenizer_dir).returncode == 0


# --------------------------------------------------------------------------- 2. workers


@pytest.mark.cli
def test_output_is_identical_for_one_and_two_workers(tmp_path, korean_corpus, tokenizer_dir):
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        shard(korean_corpus, tokenizer_dir, outs[workers], "--valid-fraction", "0.1", "--workers", workers, *SMALL)
    shards = manifest(outs[1])["shards"]
    assert units_done(outs[1]) >= 3, "the corpus should span several units"
    assert any(s["path"].endswith("-0001") for s in shards), "some unit should roll over to a second shard"
    assert_same_output(outs[1], outs[2])


# --------------------------------------------------------------------------- 3. kill and resume


def kill_at_random(cmd: list[str], delays: list[float], logs: Path) -> list[bool]:
    """Start ``cmd`` once per delay and SIGKILL its whole process group after that long.
    Returns, per attempt, whether it was still running (so really killed)."""
    killed = []
    for n, delay in enumerate(delays):
        with open(logs / f"attempt{n}.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=clean_env())
            time.sleep(delay)
            killed.append(proc.poll() is None)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return killed


def kill_once_under_way(cmd: list[str], out: Path, logs: Path) -> None:
    """Start ``cmd`` and SIGKILL it once its journal shows work in progress: frozen first (SIGSTOP),
    so that however fast this machine is, the kill lands before the run can finish."""
    with open(logs / "attempt-first.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=clean_env())
        deadline = time.monotonic() + 300
        while not list((out / ".work").glob("unit-*.json")):
            assert proc.poll() is None and time.monotonic() < deadline, (logs / "attempt-first.log").read_text()
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGSTOP)
        assert not (out / "manifest.json").exists(), "the run finished before it could be stopped"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.cli
def test_killed_runs_resume_to_byte_identical_output(tmp_path, korean_lines, tokenizer_dir):
    corpus = write_corpus(tmp_path / "corpus", korean_lines, files=3, copies=2)
    options = ["--valid-fraction", "0.05", "--chunk-docs", "128", "--max-shard-tokens", "20000",
               "--unit-bytes", "200000", "--workers", "2", "--checkpoint-seconds", "0"]
    reference = tmp_path / "reference"
    started = time.monotonic()
    shard(corpus, tokenizer_dir, reference, *options)
    # Kill moments scale with this machine's speed, so the first run is always cut short.
    full_run = time.monotonic() - started

    out = tmp_path / "killed"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    delays = [rng.uniform(0.1, 0.8) * full_run for _ in range(4)]
    cmd = [sys.executable, "-m", "kolm", *map(str, shard_args(corpus, tokenizer_dir, out, *options))]
    kill_once_under_way(cmd, out, tmp_path)  # the first attempt is cut short by construction
    killed = kill_at_random(cmd, delays, tmp_path)
    context = f"seed {seed}, delays {delays}, killed {killed}"

    final = shard(corpus, tokenizer_dir, out, *options)
    said = final.stderr + "".join(p.read_text(errors="replace") for p in tmp_path.glob("attempt*.log"))
    assert "restarting the unit" not in said, f"a journal did not match its files ({context}):\n{said}"
    assert_same_output(reference, out)
    assert leftovers(out) == [], context


# --------------------------------------------------------------------------- 4. verify


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def verify(out: Path, *args) -> subprocess.CompletedProcess:
    return kolm("shard", "verify", out, *args)


def assert_reported(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """`kolm shard verify` found problems: exit 1, and one `BAD` line holds every needle."""
    assert proc.returncode == 1, f"expected exit 1, got {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    bad = [line for line in proc.stderr.splitlines() if line.startswith("BAD ")]
    assert any(all(n in line for n in needles) for line in bad), f"no BAD line with {needles}:\n{proc.stderr}"


@pytest.mark.cli
def test_verify_passes_on_good_shards(small_shards, tokenizer_dir):
    proc = verify(small_shards, "--tokenizer", tokenizer_dir)
    assert proc.returncode == 0 and proc.stdout.startswith("OK "), proc.stderr


@pytest.mark.cli
def test_verify_catches_a_flipped_byte(damaged):
    target = damaged / "train" / "000001-0000.bin"
    flip_byte(target, target.stat().st_size // 2)
    assert_reported(verify(damaged), str(target), "sha256")


@pytest.mark.cli
def test_verify_catches_a_truncated_bin(damaged):
    target = damaged / "valid" / "000000-0000.bin"
    os.truncate(target, target.stat().st_size - 2)
    assert_reported(verify(damaged), str(target), "truncated")


@pytest.mark.cli
def test_verify_reports_a_different_tokenizer(small_shards, other_tokenizer):
    assert_reported(verify(small_shards, "--tokenizer", other_tokenizer), "does not match the tokenizer", "vocab_size")


@pytest.mark.cli
def test_progress_bar_shows_documents_and_tokens_per_second(tmp_path, korean_corpus, tokenizer_dir):
    proc = kolm("shard", "--input", korean_corpus, "--tokenizer", tokenizer_dir, "--out", tmp_path / "out",
                "--workers", "1", check=True)
    bar = proc.stderr.replace("\r", "\n").splitlines()
    assert any(re.search(r"tok/s, docs=[\d,]+, docs_s=[\d,]+", line) for line in bar), proc.stderr[-2000:]


@pytest.mark.cli
def test_stats_prints_each_split_as_the_manifest_counts_it(small_shards):
    proc = kolm("shard", "stats", small_shards, check=True)
    splits = manifest(small_shards)["splits"]
    for split in ("train", "valid"):
        row = next(line.split() for line in proc.stdout.splitlines() if line.startswith(split))
        s = splits[split]
        assert row[1:5] == [str(s[k]) for k in ("shards", "documents", "tokens", "characters")]
        assert float(row[5]) == pytest.approx(s["characters"] / s["tokens"], abs=1e-3)
    assert "corpus: " in proc.stdout and "dtype uint16" in proc.stdout


# --------------------------------------------------------------------------- 5. megatron-core


@pytest.fixture(scope="module")
def megatron():
    """megatron-core's indexed dataset module (its import warns about missing Apex etc.)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def assert_megatron_reads(megatron, prefix: Path, docs: list[np.ndarray], dtype: np.dtype) -> None:
    ds = megatron.IndexedDataset(str(prefix))
    assert len(ds) == len(docs)
    assert ds.index.dtype == dtype
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)
        assert ds[i].dtype == dtype


@pytest.mark.cli
def test_megatron_reads_uint16_shards(megatron, small_shards):
    sd = load_shard_dir(small_shards)
    assert sd.dtype == np.uint16
    for entry in sd.manifest["shards"]:
        prefix = sd.shard_path(entry, "")
        assert_megatron_reads(megatron, prefix, shard_documents(prefix), np.uint16)


@pytest.mark.unit
def test_megatron_reads_an_int32_index_written_by_kolm(megatron, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100_000, size=n, dtype=np.int32) for n in rng.integers(1, 50, size=300)]
    prefix = tmp_path / "big-vocab"
    Path(f"{prefix}.bin").write_bytes(np.concatenate(docs).tobytes())
    sizes = tmp_path / "sizes.raw"
    sizes.write_bytes(np.array([len(d) for d in docs], dtype=np.int32).tobytes())
    monkeypatch.setattr(kolm_indexed, "_BLOCK", 64)  # several blocks: pointers carry across them
    write_index(f"{prefix}.idx", sizes, np.int32)
    assert_megatron_reads(megatron, prefix, docs, np.int32)

    # Byte for byte what megatron's own builder writes for the same documents.
    import torch

    ref = tmp_path / "megatron"
    builder = megatron.IndexedDatasetBuilder(f"{ref}.bin", dtype=np.int32)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(f"{ref}.idx")
    assert Path(f"{prefix}.idx").read_bytes() == Path(f"{ref}.idx").read_bytes()


# --------------------------------------------------------------------------- 7. array tasks


@pytest.mark.cli
def test_array_tasks_build_the_same_dataset_as_one_task(tmp_path, korean_corpus, tokenizer_dir, small_shards):
    out = tmp_path / "tasks"
    first = shard(korean_corpus, tokenizer_dir, out, "--valid-fraction", "0.1", *SMALL, "--num-tasks", "2",
                  "--task-index", "0")
    assert not (out / "manifest.json").exists() and "kolm shard merge" in first.stderr
    plan_units = len(json.loads((out / ".work" / "plan.json").read_text())["units"])
    assert plan_units >= 3 and units_done(out) == (plan_units + 1) // 2
    odd = ", ".join(str(i) for i in range(1, plan_units, 2))
    assert_user_error(kolm("shard", "merge", out), "not finished", f"units {odd}")

    shard(korean_corpus, tokenizer_dir, out, "--valid-fraction", "0.1", *SMALL, "--num-tasks", "2",
          "--task-index", "1")
    assert_same_output(small_shards, out)


@pytest.mark.cli
def test_slurm_array_variables_choose_the_task(tmp_path, korean_corpus, tokenizer_dir, small_shards):
    out = tmp_path / "slurm"
    for task_id in ("1", "2"):  # as under `sbatch --array=1-2`
        env = clean_env(SLURM_ARRAY_TASK_COUNT="2", SLURM_ARRAY_TASK_ID=task_id, SLURM_ARRAY_TASK_MIN="1")
        shard(korean_corpus, tokenizer_dir, out, "--valid-fraction", "0.1", *SMALL, env=env)
        if task_id == "1":
            assert_user_error(kolm("shard", "merge", out), "not finished")  # the first task did half
    assert_same_output(small_shards, out)


@pytest.mark.unit
def test_array_variables_must_number_the_tasks_without_gaps(monkeypatch):
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX"):
        monkeypatch.delenv(name, raising=False)
    assert jobs.array_task() == (1, 0) and jobs.array_task(3, None) == (3, 0)
    slurm = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4"}
    for name, value in {**slurm, "SLURM_ARRAY_TASK_ID": "3"}.items():
        monkeypatch.setenv(name, value)
    assert jobs.array_task() == (4, 2) and jobs.array_task(None, 0) == (4, 0)
    # sbatch --array=0-6:2: four tasks numbered 0, 2, 4, 6 would leave units 1 and 3 to nobody
    for name, value in {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "6",
                        "SLURM_ARRAY_TASK_ID": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(KolmError, match="without gaps"):
        jobs.array_task()
    assert jobs.array_task(2, 1) == (2, 1)  # both given: the environment is not consulted


# Array tasks that all carry --overwrite (slurm/shard.sbatch requeues a task with its arguments).
SAME_PLAN = {"options": {"documents": "lines"}, "units": [[], [], [], []]}
OTHER_PLAN = {"options": {"documents": "lines"}, "units": [[]]}


def write_work(out: Path, plan: dict, done: list[int]) -> None:
    """An unfinished shard directory: the plan, and finished units with a shard each."""
    (out / ".work").mkdir(parents=True)
    (out / "train").mkdir()
    (out / ".work" / "plan.json").write_text(json.dumps(plan))
    for unit in done:
        (out / ".work" / f"unit-{unit:06d}.done.json").write_text("{}")
        (out / "train" / f"{unit:06d}-0000.bin").write_bytes(b"tokens")


@pytest.mark.unit
@pytest.mark.parametrize("task_index", [0, 1])
def test_overwrite_keeps_the_finished_units_of_the_same_plan(tmp_path, task_index):
    out = tmp_path / "out"
    write_work(out, SAME_PLAN, done=[1 - task_index, 3 - task_index])  # the other task's units
    before = tree_digest(out, include_work=True)
    assert prepare_output(out, SAME_PLAN, overwrite=True, task_index=task_index) is False
    assert tree_digest(out, include_work=True) == before


@pytest.mark.unit
def test_only_task_zero_replaces_another_plan_and_the_others_wait_for_it(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_work(out, OTHER_PLAN, done=[0])
    before = tree_digest(out, include_work=True)
    monkeypatch.setattr(jobs, "PLAN_WAIT_SECONDS", 0.2)
    with pytest.raises(KolmError, match="array task 0"):
        prepare_output(out, SAME_PLAN, overwrite=True, task_index=1)
    assert tree_digest(out, include_work=True) == before
    monkeypatch.setattr(jobs, "PLAN_WAIT_SECONDS", 120.0)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(prepare_output, out, SAME_PLAN, True, 1)
        assert not waiting.done() and tree_digest(out, include_work=True) == before
        assert prepare_output(out, SAME_PLAN, overwrite=True, task_index=0) is False
        assert waiting.result() is False
    assert json.loads((out / ".work" / "plan.json").read_text()) == SAME_PLAN
    assert sorted(p.name for p in out.rglob("*")) == [".work", "plan.json"]


@pytest.mark.cli
def test_requeued_array_tasks_with_overwrite_keep_each_others_units(tmp_path, korean_corpus, tokenizer_dir,
                                                                   small_shards):
    out = tmp_path / "tasks"
    args = (korean_corpus, tokenizer_dir, out, "--valid-fraction", "0.1", *SMALL, "--num-tasks", "2", "--overwrite")
    shard(*args, "--task-index", "0")
    shard(*args, "--task-index", "1")
    requeued = shard(*args, "--task-index", "0")
    assert "units already done" in requeued.stderr
    assert kolm("shard", "merge", out).returncode == 0
    assert_same_output(small_shards, out)


@pytest.mark.cli
def test_overwrite_rebuilds_only_the_damaged_unit(damaged, korean_corpus, tokenizer_dir, small_shards):
    victim = sorted((damaged / "train").glob("*.bin"))[-1]
    flip_byte(victim, 3)
    unit = victim.name.split("-")[0]
    others = {p: p.stat().st_mtime_ns for s in ("train", "valid") for p in (damaged / s).iterdir()
              if not p.name.startswith(unit)}
    assert others, "the corpus must make more than one unit"
    proc = shard(korean_corpus, tokenizer_dir, damaged, "--valid-fraction", "0.1", *SMALL, "--overwrite")
    assert f"unit {int(unit)}: its shards differ from its record" in proc.stderr
    assert_same_output(small_shards, damaged)
    assert {p: p.stat().st_mtime_ns for p in others} == others, "undamaged units were rebuilt"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"workers": -1}, "--workers -1"), ({"workers": 0}, "--workers 0"), ({"num_tasks": 0}, "--num-tasks 0"),
     ({"num_tasks": 2, "task_index": 2}, "--task-index 2"), ({"num_tasks": 2, "task_index": -1}, "--task-index -1")],
)
def test_bad_counts_are_refused_before_anything_is_written(tmp_path, korean_corpus, tokenizer_dir, kwargs, needle):
    out = tmp_path / "out"
    with pytest.raises(KolmError, match=re.escape(needle)):
        run_shard([str(korean_corpus)], str(tokenizer_dir), out, progress=False, **kwargs)
    assert not out.exists()


@pytest.mark.unit
@pytest.mark.parametrize("below", [False, True])
def test_an_out_that_is_a_file_is_refused(tmp_path, korean_corpus, tokenizer_dir, below):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    out = a_file / "shards" if below else a_file
    with pytest.raises(KolmError, match="choose a directory for --out"):
        run_shard([str(korean_corpus)], str(tokenizer_dir), out, workers=1, progress=False)
    assert a_file.read_text() == "mine"


# --------------------------------------------------------------------------- 8. memory

PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "sys.stderr.write(proc.stderr)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(proc.returncode)\n"
)


def peak_rss_kib(*args) -> int:
    """Peak resident memory of the largest process of one `kolm` run (the CLI or a worker)."""
    cmd = [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "kolm", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


@pytest.mark.cli
def test_memory_stays_flat_as_the_corpus_grows(tmp_path, korean_lines, tokenizer_dir):
    options = ["--workers", "2", "--chunk-docs", "256", "--max-shard-tokens", "200000", "--unit-bytes", "1M"]
    peaks = {}
    for copies in (1, 10):
        corpus = write_corpus(tmp_path / f"corpus{copies}", korean_lines, files=1, copies=copies)
        peaks[copies] = peak_rss_kib(*shard_args(corpus, tokenizer_dir, tmp_path / f"out{copies}", *options))
    assert peaks[10] < 1.5 * peaks[1], f"peak RSS {peaks} KiB grows with the corpus"
