"""`python -m launch.submit --cluster local`: the submitit launcher without Slurm, 2 local tasks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.dist import train_records, write_recipe

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parent.parent


def test_submit_local_runs_two_tasks_to_completion(tmp_path, shards, tokenizer_dir):
    recipe = write_recipe(tmp_path / "recipe.yaml", shards, tokenizer_dir, tmp_path / "run", train_steps=6)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "launch.submit", "--config", str(recipe), "--cluster", "local",
                           "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1",
                           "--log-dir", str(tmp_path / "logs"), "--wait"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    job_id = proc.stdout.split()[2]
    assert f"job {job_id}: finished" in proc.stdout and "squeue" not in proc.stdout
    log = (tmp_path / "logs" / job_id / f"{job_id}_0_log.err").read_text()
    assert "2 ranks x micro batch" in log
    assert [r["step"] for r in train_records(tmp_path / "run")] == list(range(1, 7))


PYTHON_API = """
import sys
from launch.submit import SubmitOptions, submit
opts = SubmitOptions(cluster="local", gpus_per_node=0, tasks_per_node=2, cpus_per_task=1, log_dir=sys.argv[2])
job = submit(sys.argv[1], ["train_steps=4"], opts)
print(job.job_id, job.paths.stderr)
print("status", job.results()[0]["status"])
"""


def test_submit_python_api_as_the_readme_shows(tmp_path, shards, tokenizer_dir):
    recipe = write_recipe(tmp_path / "recipe.yaml", shards, tokenizer_dir, tmp_path / "run")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PYTHON_API, str(recipe), str(tmp_path / "logs")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    job_id, stderr_path = proc.stdout.splitlines()[0].split()
    assert Path(stderr_path).is_file() and job_id in stderr_path
    assert proc.stdout.splitlines()[-1] == "status finished"
    assert [r["step"] for r in train_records(tmp_path / "run")] == list(range(1, 5))


def test_submit_eval_scores_a_runs_checkpoints(tmp_path, reference_run):
    source, _ = reference_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "launch.submit", "--eval", str(run_dir), "--tasks",
                           "ko_constitution_cloze", "--limit", "4", "--cluster", "local", "--gpus-per-node", "0",
                           "--cpus-per-task", "1", "--log-dir", str(tmp_path / "logs"), "--wait"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "evaluated steps [4, 8, 12]" in proc.stdout
    assert [r["step"] for r in train_records(run_dir, "harness")] == [4, 8, 12]
