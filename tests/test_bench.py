"""Benchmarks end to end at toy sizes: the GPU benchmark's smoke mode (the same code as on a GPU, on CPU with tiny
shapes) and the equal-wall-clock comparison with the seed."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parent.parent


def test_gpu_bench_smoke_runs_every_stage_on_cpu(tmp_path, korean_corpus):
    proc = _gpu_bench(tmp_path, "--corpus", str(korean_corpus), "--budget", "400")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| phi-tiny")]
    measured = [row for row in rows if row.split("|")[6].strip() != "-"]
    assert len(measured) >= 3, proc.stdout  # the micro-batch ladder and a compiled point
    assert any("| yes |" in row for row in measured)  # compiled blocks ran (fp32 on CPU)
    assert "useful tokens/s; kolm/seed" in proc.stdout, proc.stdout


def _gpu_bench(tmp_path, *args):
    env = {**os.environ, "KOLM_BENCH_OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "bench/gpu_bench.py", "--smoke", "--no-record", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_gpu_bench_measures_only_the_named_points(tmp_path, korean_corpus):
    proc = _gpu_bench(tmp_path, "--corpus", str(korean_corpus), "--no-seed", "--torch-adam",
                      "--groups", "phi-tiny:32:2")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:6]] for line in proc.stdout.splitlines()
            if line.startswith("| phi-")]
    assert rows == [["phi-tiny", "32", "sdpa", "no", "2"], ["phi-tiny", "32", "sdpa", "yes", "2"]], proc.stdout
    assert "PyTorch AdamW" in proc.stdout and "seed recipe" not in proc.stdout


@pytest.mark.parametrize("groups, message", [
    ("phi-tiny", "'phi-tiny' is not MODEL:SEQ or MODEL:SEQ:MICRO_BATCH"),
    ("phi-tiny:64:0", "'phi-tiny:64:0' is not MODEL:SEQ"),
    ("phi-9b:512", "unknown model preset 'phi-9b'"),
])
def test_gpu_bench_refuses_a_malformed_group(tmp_path, groups, message):
    proc = _gpu_bench(tmp_path, "--groups", groups)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()  # refused before any corpus or tokenizer work


def test_gpu_bench_frontier_plan_profiles_and_runs_every_row_on_cpu(tmp_path):
    out = tmp_path / "frontier.md"
    proc = _gpu_bench(tmp_path, "--plan", "frontier", "--out", str(out), "--budget", "700")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = out.read_text()
    assert report.strip() in proc.stdout
    assert "CUDA none" in report and "deepspeed 0.19.8" in report  # the versions every table carries
    rows = [[c.strip() for c in line.split("|")[1:13]] for line in report.splitlines() if line.startswith("| phi-tiny")]
    # (compiled, ZeRO stage, precision, q/k/v/fc1 projections) of every A/B row, in the plan's order
    four, one = "four GEMMs", "one GEMM"
    assert [(r[3], r[8], r[9], r[10]) for r in rows] == [
        ("yes", "2", "fp32", four), ("yes", "0", "fp32", four), ("yes", "2", "fp8", four), ("yes", "2", "fp32", one),
        ("yes", "1", "fp32", four), ("no", "2", "fp32", four), ("no", "0", "fp32", four)]
    assert all(r[5] != "-" for r in rows if r[9] != "fp8")
    fp8 = next(r for r in rows if r[9] == "fp8")
    assert fp8[5] == "-" and "no CUDA device" in fp8[11]  # refused on CPU, with the reason
    assert "- one GEMM for q, k, v, fc1 against four (phi-tiny seq 64 micro batch 2, ZeRO-2, compiled)" in report
    shares = {line.split("|")[1].strip(): float(line.split("|")[2].strip().rstrip("%"))
              for line in report.splitlines() if line.startswith("| ") and line.rstrip().endswith("% |")}
    assert {"matmul", "attention", "optimizer", "ZeRO gradient copies and buckets", "host gaps and idle"} <= set(shares)
    assert sum(shares.values()) == pytest.approx(100, abs=1.0) and shares["matmul"] > 0
    assert "SDPA backend: flash" in report  # PyTorch's CPU flash kernel: causal sdpa passes no mask


def test_budget_bench_trains_both_recipes_for_the_budget_and_scores_unseen_lines(tmp_path, korean_corpus):
    env = {**os.environ, "KOLM_BENCH_OUT": str(tmp_path / "out")}
    proc = subprocess.run([sys.executable, "bench/budget_bench.py", "--no-record", "--corpus", str(korean_corpus),
                           "--lines", "1500", "--score-lines", "200", "--vocab-size", "1000", "--model", "phi-tiny",
                           "--layers", "1", "--seconds", "4", "--schedule-samples", "400", "--timeout", "300"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith(("| seed", "| kolm"))]
    assert [r[1].split()[0].rstrip(",") for r in rows] == ["seed", "kolm"], proc.stdout
    for r in rows:
        assert float(r[2]) >= 4 and int(r[3].replace(",", "")) > 0  # trained for the budget, in optimizer steps
        assert 0 < float(r[7]) < 10  # a loss per token over a vocabulary of ~1,000
    held = (tmp_path / "out").glob("heldout-*.txt.gz")
    scored = gzip.open(next(held), "rt", encoding="utf-8").read().split("\n")[:-1]
    training = {line.strip() for line in korean_corpus.read_text(encoding="utf-8").split("\n")[:1500]}
    assert len(scored) == 200 and not set(scored) & training
