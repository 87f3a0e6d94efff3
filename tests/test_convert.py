"""`kolm convert`, `kolm generate`, `kolm eval`: ZeRO checkpoints written by 2 ranks become
Hugging Face directories that the pipeline loads offline and that compute the same logits."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml
from helpers.cli import run_kolm
from helpers.dist import run_ranks, train_to_end

from kolm.data.tokenizer import load_tokenizer_info
from kolm.train.checkpoint import MARKER, complete_checkpoints

pytestmark = pytest.mark.dist
PROMPT = "밥을 먹고 나면 늘 하는 생각이 있는데"


# What depends on the ZeRO layout (consolidation, logits, averaging) runs on both runs; the rest of the
# command's behaviour (errors, interrupted writes, dtypes) does not, and runs on the ZeRO-2 run alone.
EACH_STAGE = {"test_converted_model_matches_engine_and_generates_offline", "test_eval_of_export_and_checkpoint_agree",
              "test_average_under_each_zero_stage_is_the_mean_of_the_checkpoints"}


def pytest_generate_tests(metafunc):
    if "run" in metafunc.fixturenames:
        stages = [2, 3] if metafunc.function.__name__ in EACH_STAGE else [2]
        metafunc.parametrize("run", stages, indirect=True, ids=[f"zero{s}" for s in stages], scope="module")


@pytest.fixture(scope="module")
def run(request, tmp_path_factory, shards, tokenizer_dir):
    root = tmp_path_factory.mktemp(f"zero{request.param}")
    # The ZeRO-3 run sizes its embedding rows to a multiple of 8 (not the default 64): convert must follow.
    train_to_end(root, shards, tokenizer_dir, zero_stage=request.param, train_steps=6, save_every=3, eval_every=3,
                 vocab_multiple=64 if request.param == 2 else 8)
    return root


ENGINE_LOGITS = textwrap.dedent("""
    import sys, torch
    from kolm.train.config import load_config
    from kolm.train.loop import Trainer
    t = Trainer(load_config(sys.argv[1]))
    x = torch.from_numpy(next(next(iter(t.setup.valid.values())).eval_batches(2, 0, 1))[0])
    with torch.no_grad():
        logits = t.engine(input_ids=x[:, :-1].to(t.device)).logits.float()
    if t.setup.env.rank == 0:
        torch.save({"ids": x[:, :-1], "logits": logits}, sys.argv[2])
    t.finish(0)
""")


def test_converted_model_matches_engine_and_generates_offline(run, tmp_path):
    out = tmp_path / "hf"
    proc = run_kolm("convert", run / "run", "--out", out, "--dtype", "fp32", check=True)
    assert "verified" in proc.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()}
    multiple = yaml.safe_load((run / "recipe.yaml").read_text())["vocab_multiple"]
    vocab = load_tokenizer_info(out).vocab_size
    assert json.loads((out / "config.json").read_text())["vocab_size"] == -(-vocab // multiple) * multiple

    script = tmp_path / "engine_logits.py"
    script.write_text(ENGINE_LOGITS)
    dumped = tmp_path / "engine.pt"
    # Resuming the finished run in a fresh engine gives the DeepSpeed model's own logits.
    recipe = run / "recipe.yaml"
    codes, log = run_ranks(2, recipe, log_dir=tmp_path / "logs", argv=[str(script), str(recipe), str(dumped)])
    assert codes == [0, 0], log[-3000:]
    engine = torch.load(dumped)

    from transformers import AutoModelForCausalLM, pipeline

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        mine = model(input_ids=engine["ids"]).logits
    # The engine computes in bf16; the export holds its fp32 master weights.
    scale = engine["logits"].abs().max().item()
    torch.testing.assert_close(mine, engine["logits"], rtol=5e-2, atol=5e-2 * scale)

    env_before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        pipe = pipeline("text-generation", model=str(out), device=-1)
        text = pipe(PROMPT, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                    repetition_penalty=2.0)[0]["generated_text"]
    finally:
        if env_before is None:
            os.environ.pop("HF_HUB_OFFLINE")
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert text[len(PROMPT):].strip()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("대한민국은\n\n국회는 법률을\n", encoding="utf-8")
    generated = run_kolm("generate", out, PROMPT, "--prompts-file", prompts, "--max-new-tokens", 8, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    texts = generated.stdout.split("---\n")[:-1]
    assert len(texts) == 3 and all(t.startswith(p) for t, p in zip(texts, (PROMPT, "대한민국은", "국회는 법률을")))


def test_eval_of_export_and_checkpoint_agree(run, tmp_path, shards):
    out = tmp_path / "hf"
    run_kolm("convert", run / "run", "--out", out, "--dtype", "fp32", check=True)
    # DeepSpeed's consolidation prints its own progress; the last line is kolm's result.
    from_export = run_kolm("eval", out, "--data", shards, check=True).stdout.splitlines()[-1]
    from_ckpt = run_kolm("eval", run / "run", "--data", shards, check=True).stdout.splitlines()[-1]
    assert from_export == from_ckpt and "perplexity" in from_export


def test_bf16_export_is_verified_and_smaller(run, tmp_path):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    run_kolm("convert", run / "run", "--out", fp32, "--dtype", "fp32", check=True)
    run_kolm("convert", run / "run", "--out", bf16, "--best", check=True)
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(bf16) < 0.6 * size(fp32)
    best = min(complete_checkpoints(run / "run" / "checkpoints"), key=lambda c: c.marker["eval_loss"])
    assert json.loads((bf16 / "kolm_export.json").read_text())["checkpoint"] == str(best.path)


def _convert_killed_mid_write(run_dir, out) -> bool:
    """Start a conversion and SIGKILL it once its temporary folder appears: True if the kill landed
    before the conversion had finished."""
    proc = subprocess.Popen([sys.executable, "-m", "kolm", "convert", str(run_dir), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(out.parent.glob(".hf.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    return proc.wait() == -signal.SIGKILL


def test_interrupted_conversion_leaves_nothing_behind(run, tmp_path):
    out = tmp_path / "hf"
    for _ in range(5):  # a fast machine may finish the conversion between seeing the folder and the kill
        if _convert_killed_mid_write(run / "run", out):
            break
        shutil.rmtree(out)
    else:
        pytest.fail("the conversion finished before the kill five times")
    # A kill between the final rename and the exit leaves the complete model; never a partial one.
    assert not out.exists() or {"config.json", "model.safetensors", "kolm_export.json"} <= {
        p.name for p in out.iterdir()}
    run_kolm("convert", run / "run", "--out", out, "--force", check=True)
    assert out.is_dir() and not list(tmp_path.glob(".hf.tmp-*"))


def test_model_set_aside_by_a_killed_force_conversion_is_restored(run, tmp_path):
    out = tmp_path / "hf"
    run_kolm("convert", run / "run", "--out", out, "--dtype", "fp32", check=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # What a --force conversion killed between setting the old model aside and renaming the new one leaves.
    os.replace(out, tmp_path / f".hf.old-{dead.pid}")
    (tmp_path / f".hf.tmp-{dead.pid}-x").mkdir()
    proc = run_kolm("convert", run / "run", "--out", out)
    assert proc.returncode == 2 and f"restored {out}" in proc.stderr and "already exists" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_bad_inputs_are_clear_errors(run, tmp_path, korean_corpus):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_kolm("convert", empty, "--out", tmp_path / "a")
    assert r.returncode == 2 and "no complete checkpoint found" in r.stderr

    ckpt_dir = run / "run" / "checkpoints"
    marker = ckpt_dir / "global_step3" / MARKER
    saved = marker.read_bytes()
    marker.unlink()
    try:
        r = run_kolm("convert", run / "run", "--tag", "global_step3", "--out", tmp_path / "b")
        assert r.returncode == 2 and "checkpoint is incomplete (no completion marker" in r.stderr
    finally:
        marker.write_bytes(saved)

    other = tmp_path / "tok"
    run_kolm("tokenizer", "train", "--input", korean_corpus, "--vocab-size", 700, "--out", other, check=True)
    r = run_kolm("convert", run / "run", "--out", tmp_path / "c", "--tokenizer", other)
    assert r.returncode == 2 and "does not match the model's" in r.stderr

    for over in (run / "run", run / "run" / "checkpoints"):  # --force must not delete what it converts
        r = run_kolm("convert", run / "run", "--out", over, "--force")
        assert r.returncode == 2 and "which this command reads" in r.stderr, r.stderr[-2000:]
        assert (ckpt_dir / "global_step6" / MARKER).is_file()

    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    r = run_kolm("convert", run / "run", "--out", existing)
    assert r.returncode == 2 and "--force" in r.stderr and (existing / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_average_under_each_zero_stage_is_the_mean_of_the_checkpoints(run, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    out = tmp_path / "avg"
    run_kolm("convert", run / "run", "--average", 2, "--out", out, "--dtype", "fp32", check=True)
    ckpt_dir = run / "run" / "checkpoints"
    states = [get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=t) for t in ("global_step3", "global_step6")]
    got = load_file(out / "model.safetensors")
    assert set(got) == set(states[0])
    for k, v in got.items():
        torch.testing.assert_close(v, (states[0][k].float() + states[1][k].float()) / 2, rtol=1e-6, atol=1e-7)
