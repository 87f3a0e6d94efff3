"""`kolm train` on 2 CPU processes with real DeepSpeed engines (gloo): ZeRO-1/2/3 training,
exact resume after SIGKILL, resume on a different number of ranks, graceful stop on a signal."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
from helpers.cli import run_kolm
from helpers.dist import Ranks, free_port, kill_at_step, run_ranks, train_records, wait_for, write_recipe

from kolm.train.checkpoint import MARKER, complete_checkpoints
from kolm.train.signals import EXIT_REQUEUE


@pytest.fixture
def reference(reference_run):
    """The uninterrupted 12-step ZeRO-2 run on 2 ranks (conftest): the baseline for the resume tests."""
    return reference_run[0]


def _losses(run_dir):
    return [(r["step"], r["consumed_samples"], r["loss"]) for r in train_records(run_dir)]


def _launcher(name: str) -> list[str]:
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
            "--module"]


@pytest.mark.dist
@pytest.mark.parametrize(("stage", "launcher"), [(1, "torchrun"), (2, "deepspeed"), (3, "torchrun")])
def test_zero_stage_trains_under_a_launcher_and_loss_falls(tmp_path, shards, tokenizer_dir, stage, launcher):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir, zero_stage=stage,
                          tensorboard=True, log_every=4)
    cmd = [*_launcher(launcher), "kolm", "train", "--config", str(recipe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"},
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = train_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, 13))
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 0.3, f"loss did not fall: {first:.3f} -> {last:.3f}"
    timed = [r for r in records if "tokens_per_s" in r]
    assert timed and all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in timed)
    evals = train_records(run_dir, "eval")
    assert [e["step"] for e in evals] == [6, 12]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert 0 < evals[-1]["eval_accuracy"] < 1 and evals[-1]["eval_perplexity"] > 1
    assert {c.step for c in complete_checkpoints(run_dir / "checkpoints")} == {4, 8, 12}
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step12"
    assert any((run_dir / "tensorboard").iterdir())


@pytest.mark.dist
def test_resume_after_sigkill_matches_uninterrupted_run_bitwise(tmp_path, shards, tokenizer_dir, reference):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir)
    # Kill hard once step 6 is logged: global_step4 is complete, steps 5-6 are lost work.
    kill_at_step(recipe, run_dir, 6, log_dir=tmp_path / "logs1")
    assert (run_dir / "checkpoints" / "global_step4" / MARKER).is_file()
    codes, out = run_ranks(2, recipe, log_dir=tmp_path / "logs2")
    assert codes == [0, 0], out[-3000:]
    assert "resuming from global_step" in out
    # CPU kernels and gloo's two-rank reduction are deterministic: the losses match exactly.
    assert _losses(run_dir) == _losses(reference)


@pytest.mark.dist
def test_resume_on_one_rank_after_two(tmp_path, shards, tokenizer_dir, reference):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "global_step8", run_dir / "checkpoints" / "global_step8")
    shutil.copy(reference / "metrics.jsonl", run_dir / "metrics.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir)
    codes, out = run_ranks(1, recipe, log_dir=tmp_path / "logs")
    assert codes == [0], out[-3000:]
    assert "converting it to a universal checkpoint" in out
    mine, ref = _losses(run_dir), _losses(reference)
    # Same samples in every step (the consumed-sample sequence is identical) ...
    assert [(s, c) for s, c, _ in mine] == [(s, c) for s, c, _ in ref]
    # ... but one rank accumulates 4 micro-batches where two ranks sum 2 each over gloo, and
    # bf16 rounding differs with the summation order; the losses agree to bf16 precision.
    for (_, _, a), (_, _, b) in zip(mine[8:], ref[8:], strict=True):
        assert a == pytest.approx(b, rel=2e-2)


@pytest.mark.dist
def test_plain_kolm_train_without_a_launcher_is_one_rank(tmp_path, shards, tokenizer_dir):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir, train_steps=3)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = run_kolm("train", "--config", recipe, env={**env, "DS_ACCELERATOR": "cpu"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 ranks x micro batch 2 x 4 accumulation = global batch 8" in proc.stderr
    assert [r["step"] for r in train_records(run_dir)] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step3"


@pytest.mark.dist
def test_signal_to_one_rank_checkpoints_all_and_exits_for_requeue(tmp_path, shards, tokenizer_dir):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir, train_steps=10, save_every=100,
                          eval_every=100)
    ranks = Ranks(2, recipe, log_dir=tmp_path / "logs1")
    wait_for(lambda: len(train_records(run_dir)) >= 2, 600, "step 2")
    for rank in (0, 1):  # frozen while the signal is sent, so a fast machine cannot finish first
        ranks.signal_rank(rank, signal.SIGSTOP)
    ranks.signal_rank(1, signal.SIGUSR1)
    for rank in (0, 1):
        ranks.signal_rank(rank, signal.SIGCONT)
    codes = ranks.wait()
    assert codes == [EXIT_REQUEUE, EXIT_REQUEUE], ranks.output()[-3000:]
    ckpts = complete_checkpoints(run_dir / "checkpoints")
    assert len(ckpts) == 1 and 2 <= ckpts[0].step < 10
    codes, out = run_ranks(2, recipe, log_dir=tmp_path / "logs2")
    assert codes == [0, 0], out[-3000:]
    assert [r["step"] for r in train_records(run_dir)] == list(range(1, 11))


@pytest.mark.dist
def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, shards, tokenizer_dir):
    run_dir = tmp_path / "run"
    # An absurd learning rate blows the weights up after the first update: every later loss
    # is non-finite, DeepSpeed skips those updates, and kolm stops after 3 in a row.
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir, lr=1.0e30, min_lr=0.0,
                          warmup_steps=0, max_nonfinite_steps=3, save_every=100, eval_every=100)
    codes, out = run_ranks(2, recipe, log_dir=tmp_path / "logs")
    assert codes == [3, 3], out[-3000:]
    assert "3 non-finite steps in a row" in out and "update skipped" in out
    assert train_records(run_dir)[-1]["skipped_steps"] == 3


@pytest.mark.dist
def test_resume_on_different_data_is_refused_unless_overridden(tmp_path, shards, tokenizer_dir, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "checkpoints" / "global_step12", run_dir / "checkpoints" / "global_step12")
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, run_dir, seq_len=32)
    codes, out = run_ranks(1, recipe, log_dir=tmp_path / "logs")
    assert codes == [2, ], out[-3000:]
    assert "was trained on different data (seq_len, num_samples differ)" in out
    assert "ignore_data_fingerprint=true" in out


def _check(recipe, *overrides, env=None):
    return subprocess.run([sys.executable, "-m", "kolm", "train", "--config", str(recipe), "--check", *overrides],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


@pytest.mark.cli
def test_check_catches_layout_and_data_errors_before_any_process_group(tmp_path, shards, tokenizer_dir,
                                                                       other_tokenizer):
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, tmp_path / "run")
    ok = _check(recipe)
    assert ok.returncode == 0 and "gradient accumulation 4 on 1 ranks" in ok.stdout
    three = {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    layout = _check(recipe, env=three)
    assert layout.returncode == 2 and "global batch 8 is not divisible by micro batch 2 x 3" in layout.stderr
    long = _check(recipe, "seq_len=4096")
    assert long.returncode == 2 and "exceeds model phi-tiny's max_position_embeddings" in long.stderr
    missing = _check(recipe, f"data={tmp_path / 'nope'}")
    assert missing.returncode == 2 and "no such shard directory" in missing.stderr
    mismatch = _check(recipe, f"tokenizer={other_tokenizer}")
    assert mismatch.returncode == 2 and "does not match the tokenizer of" in mismatch.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.dist
# ZeRO-3, whose hooks gather each block's parameters around the compiled forward, is the demanding case.
@pytest.mark.parametrize("stage", [3])
def test_compiled_blocks_train_to_the_same_losses(tmp_path, shards, tokenizer_dir, stage):
    runs = {}
    for compiled in (False, True):
        run_dir = tmp_path / f"run-{compiled}"
        recipe = write_recipe(tmp_path / f"r-{compiled}.yaml", shards, tokenizer_dir, run_dir, zero_stage=stage,
                              precision="fp32", compile=compiled, train_steps=4, save_every=4, eval_every=4)
        codes, out = run_ranks(2, recipe, log_dir=tmp_path / f"logs-{compiled}", timeout=900)
        assert codes == [0, 0], out[-3000:]
        runs[compiled] = [r["loss"] for r in train_records(run_dir)]
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


@pytest.mark.cli
def test_check_refuses_kernels_this_machine_cannot_run(tmp_path, shards, tokenizer_dir):
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, tmp_path / "run")
    flash = _check(recipe, "attn_implementation=flash_attention_2")
    assert flash.returncode == 2 and "flash_attention_2 needs a CUDA GPU" in flash.stderr
    typo = _check(recipe, "attn_implementation=flash")
    assert typo.returncode == 2 and "must be one of sdpa, flash_attention_2, eager" in typo.stderr
    compiled = _check(recipe, "compile=true", "precision=bf16")
    assert compiled.returncode == 2 and "compile=true on a CPU works in fp32 only" in compiled.stderr
    assert _check(recipe, "compile=true", "precision=fp32").returncode == 0
    assert not (tmp_path / "run").exists()


@pytest.mark.unit
def test_a_stop_signal_after_the_run_ended_does_not_kill_the_exiting_process():
    # A time limit's warning can race the last step; the process must still exit with its own status.
    script = ("import atexit, os, signal, time\n"
              "from kolm.train.signals import GracefulStop\n"
              "stop = GracefulStop()\n"
              "stop.run_ended()\n"
              "os.kill(os.getpid(), signal.SIGUSR1)\n"
              "time.sleep(0.2)\n"
              "assert not stop.pending\n"
              "atexit.register(os.kill, os.getpid(), signal.SIGTERM)\n"  # while the interpreter shuts down
              "print('alive')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "alive\n", proc.stderr
