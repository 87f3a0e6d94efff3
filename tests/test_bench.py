"""The GPU benchmark's smoke mode: the same code as on a GPU, on CPU with tiny shapes, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parent.parent


def test_gpu_bench_smoke_runs_every_stage_on_cpu(tmp_path, korean_corpus):
    env = {**os.environ, "KOLM_BENCH_OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "bench/gpu_bench.py", "--smoke", "--no-record", "--corpus",
                           str(korean_corpus), "--budget", "400"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| phi-tiny")]
    measured = [row for row in rows if row.split("|")[6].strip() != "-"]
    assert len(measured) >= 3, proc.stdout  # the micro-batch ladder and a compiled point
    assert any("| yes |" in row for row in measured)  # compiled blocks ran (fp32 on CPU)
    assert "useful tokens/s; kolm/seed" in proc.stdout, proc.stdout
