"""lm-evaluation-harness through `kolm eval --tasks`, offline, on kolm's shipped Korean task: a converted
model, a run's checkpoints (recorded at their steps, once), and the errors that stop it before any write."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers.cli import run_kolm
from helpers.dist import train_records

from kolm.train.checkpoint import complete_checkpoints

pytestmark = pytest.mark.dist
TASK = "ko_constitution_cloze"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _eval(*args, **kwargs):
    return run_kolm("eval", *args, env={**os.environ, **OFFLINE}, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def model(tmp_path_factory, reference_run) -> Path:
    run_dir, _ = reference_run
    out = tmp_path_factory.mktemp("harness-model") / "model"
    run_kolm("convert", run_dir, "--out", out, "--dtype", "fp32", check=True)
    return out


def test_a_converted_model_is_scored_offline_on_the_shipped_task(model):
    proc = _eval(model, "--tasks", TASK, "--limit", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line.split() for line in proc.stdout.splitlines() if line.strip().startswith(TASK))
    acc, acc_norm = float(row[1]), float(row[2])
    assert 0 <= acc <= 1 and 0 <= acc_norm <= 1
    saved = json.loads((model / "harness_results.json").read_text())
    assert saved[TASK]["acc"] == pytest.approx(acc, abs=1e-4)


def test_every_checkpoint_of_a_run_is_scored_once_and_recorded_at_its_step(tmp_path, reference_run):
    reference, _ = reference_run
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    steps = sorted(c.step for c in complete_checkpoints(run_dir / "checkpoints"))
    proc = _eval(run_dir, "--tasks", TASK, "--limit", "4", "--pending")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = train_records(run_dir, "harness")
    assert [r["step"] for r in records] == steps and all(r["task"] == TASK and "acc" in r for r in records)
    assert sorted(p.name for p in (run_dir / "harness").iterdir()) == sorted(f"global_step{s}.json" for s in steps)
    assert not list(run_dir.glob(".harness-*"))  # the temporary conversions are gone
    again = _eval(run_dir, "--tasks", TASK, "--limit", "4", "--pending")
    assert again.returncode == 0 and "nothing to evaluate" in again.stderr
    assert len(train_records(run_dir, "harness")) == len(steps)
    report = run_kolm("report", run_dir, "--out", tmp_path / "report")
    assert f"harness {TASK}: step {steps[0]}: acc" in report.stdout


def test_bad_requests_are_clear_errors_and_write_nothing(tmp_path, model, reference_run):
    unknown = _eval(model, "--tasks", "kobest_boolqq")
    assert unknown.returncode == 2 and "unknown lm-evaluation-harness task 'kobest_boolqq'" in unknown.stderr
    assert "close names: kobest_boolq" in unknown.stderr

    cache = tmp_path / "empty-hf-cache"
    offline = run_kolm("eval", model, "--tasks", "kobest_boolq", env={**os.environ, **OFFLINE, "HF_HOME": str(cache)})
    assert offline.returncode == 2 and "skt/kobest_v1" in offline.stderr and "HF_DATASETS_OFFLINE" in offline.stderr

    no_eos = tmp_path / "no-eos"
    shutil.copytree(model, no_eos)
    (no_eos / "harness_results.json").unlink(missing_ok=True)
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    proc = _eval(no_eos, "--tasks", TASK, "--limit", "2")
    assert proc.returncode == 2 and "the tokenizer has no EOS token" in proc.stderr

    run_dir = tmp_path / "unfinished"
    (run_dir / "checkpoints" / "global_step4").mkdir(parents=True)  # an interrupted save: no marker
    proc = _eval(run_dir, "--tasks", TASK, "--pending")
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]  # nothing written
    assert not (no_eos / "harness_results.json").exists()
