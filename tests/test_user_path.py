"""The newcomer's path: `kolm demo` end to end, `kolm report` on its run, `kolm plan` against a real engine."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import run_kolm

from kolm.export.generate import SEED_PROMPT as PROMPT


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "kolm-demo"
    proc = subprocess.run([sys.executable, "-m", "kolm", "demo", "--out", str(out), "--steps", "40",
                           "--max-new-tokens", "12"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.mark.dist
def test_demo_runs_every_stage_and_prints_korean_text(demo):
    out, proc = demo
    for stage in ("1/5 tokenizer", "2/5 shard", "3/5 train", "4/5 convert", "5/5 generate"):
        assert stage in proc.stderr
    generated = re.search(r"^generated: (.*)$", proc.stdout, re.M).group(1)
    assert generated.startswith(PROMPT) and len(generated) > len(PROMPT)
    m = re.search(r"perplexity: ([\d,.]+) before training -> ([\d,.]+) after", proc.stdout)
    before, after = (float(g.replace(",", "")) for g in m.groups())
    assert after < before / 2  # it learned something
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((out / "shards" / "manifest.json").read_text())["shards"]
    assert (out / "run" / "checkpoints" / "latest").read_text().strip() == "global_step40"
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == ["PhiForCausalLM"] and (out / "model" / "model.safetensors").is_file()
    for key in ("tokenizer", "shards", "recipe", "run", "model"):
        assert re.search(rf"^\s*{key}: {re.escape(str(out / key if key != 'recipe' else out / 'recipe.yaml'))}$",
                         proc.stdout, re.M)


@pytest.mark.dist
def test_demo_again_reuses_what_is_done(demo):
    out, first = demo
    proc = subprocess.run([sys.executable, "-m", "kolm", "demo", "--out", str(out), "--steps", "40",
                           "--max-new-tokens", "12"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for what in ("tokenizer", "run", "model"):
        assert f"reusing {out / what}" in proc.stderr
    assert "torchrun" not in proc.stderr  # no training process was started
    assert re.search(r"perplexity: .*", proc.stdout).group(0) == re.search(r"perplexity: .*", first.stdout).group(0)


@pytest.mark.dist
def test_demo_refuses_a_directory_made_from_another_corpus(demo, tmp_path):
    out, _ = demo
    own = tmp_path / "mine.txt"
    own.write_text("다른 말뭉치의 첫 문장입니다.\n", encoding="utf-8")
    tokenizer_before = (out / "tokenizer" / "tokenizer.json").read_bytes()
    proc = run_kolm("demo", "--out", out, "--corpus", own, "--steps", "40")
    assert proc.returncode == 2
    assert f"{out} holds a demo made with corpus=" in proc.stderr and "pass --out DIR" in proc.stderr
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer_before
    proc = run_kolm("demo", "--out", out, "--steps", "41")
    assert proc.returncode == 2 and "made with steps=40" in proc.stderr


@pytest.mark.dist
def test_demo_on_the_users_own_corpus_gets_its_own_directory(tmp_path):
    from kolm.data.corpus import bundled_corpus_files

    own = tmp_path / "constitution.txt"
    own.write_bytes(next(Path(f) for f in bundled_corpus_files() if f.endswith("constitution.txt")).read_bytes())
    proc = run_kolm("demo", "--corpus", own, "--steps", "6", "--vocab-size", "2000", "--max-new-tokens", "4",
                    cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "kolm-demo-constitution"
    assert json.loads((out / "demo.json").read_text())["corpus"] == [str(own)]
    assert (out / "run" / "checkpoints" / "latest").read_text().strip() == "global_step6"
    assert re.search(rf"^\s*model: {re.escape(str(out / 'model'))}$", proc.stdout, re.M)


@pytest.mark.dist
def test_report_plots_a_real_run(demo, tmp_path):
    out, _ = demo
    proc = run_kolm("report", out / "run", "--out", tmp_path / "report")
    assert proc.returncode == 0, proc.stderr
    for line in ("steps: 40", "validation: loss", "first evaluation (step 0)"):
        assert line in proc.stdout
    for name in ("loss.png", "lr.png", "throughput.png"):
        data = (tmp_path / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert (tmp_path / "report" / "summary.txt").read_text().strip() == proc.stdout.split("plots:")[0].strip()


@pytest.mark.cli
def test_report_of_a_directory_without_metrics_is_a_clear_error(tmp_path):
    proc = run_kolm("report", tmp_path)
    assert proc.returncode == 2 and "metrics.jsonl not found" in proc.stderr


def _ratios(text: str) -> dict[str, float]:
    return {kind: float(r) for kind, r in re.findall(r"(model states|activations):.*\(ratio ([\d.]+)\)", text)}


@pytest.mark.dist
def test_plan_estimate_matches_a_real_engine_on_cpu():
    # A different preset, vocabulary, seq_len and ZeRO stage than the ones the constants came from.
    proc = run_kolm("plan", "--model", "phi-40m", "--vocab-size", "8000", "--seq-len", "256", "--measure",
                    "--micro-batch", "1", "--zero-stage", "1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratios = _ratios(proc.stdout)
    # DeepSpeed's model-state estimate is the peak with both gradient copies: never below the
    # measurement, and not far above it.
    assert 1.0 <= ratios["model states"] <= 1.35, proc.stdout
    assert 0.9 <= ratios["activations"] <= 1.1, proc.stdout


@pytest.mark.cli
def test_plan_for_the_seed_setting_recommends_a_layout_and_a_time():
    proc = run_kolm("plan", "--model", "phi-1.5", "--nodes", "2", "--gpus-per-node", "8", "--gpu", "a100-40",
                    "--lines", "1e8", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    rec = re.search(r"recommended: zero_stage=(\d) .* micro_batch=(\d+) .*\(gradient accumulation (\d+);", proc.stdout)
    stage, mb, accum = map(int, rec.groups())
    assert mb * accum * 16 == 256 and stage in (1, 2, 3)
    assert re.search(r"time: 6\.00B tokens .* h wall clock .* GPU-hours", proc.stdout)
    bigger = run_kolm("plan", "--model", "phi-1.5", "--nodes", "2", "--gpu", "a100-80")
    max_mb = {g: int(re.search(r"zero2\s+no\s+[\d.]+\s+[\d.]+\s+(\d+)", p.stdout).group(1))
              for g, p in (("40", proc), ("80", bigger))}
    assert max_mb["80"] > max_mb["40"] >= 1


@pytest.mark.cli
@pytest.mark.parametrize("args, message", [
    (["--global-batch", "100", "--nodes", "3"], "not divisible by 24 GPUs"),
    (["--mfu", "40"], "--mfu is a fraction"),
    (["--seq-len", "4096"], "exceeds phi-1.5's 2048 positions"),
    (["--model", "phi-7b"], "unknown model preset"),
    (["--tokens", "1e9", "--lines", "1e6"], "either --tokens or --lines"),
])
def test_plan_rejects_impossible_input(args, message):
    proc = run_kolm("plan", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
