"""Corrupted and mismatched artifacts, a full disk, and launch errors: each is a clear error that
names the file (or key, or variable) and what to do, and nothing the user had is lost."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.cli import run_kolm
from helpers.dist import run_ranks, train_records, workers_of, write_recipe

from kolm.files import sha256_file
from kolm.train.checkpoint import complete_checkpoints, find_resume, why_incomplete

REPO = Path(__file__).resolve().parent.parent
RUN = {"train_steps": 12, "save_every": 4, "keep_checkpoints": 3}


def _losses(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["consumed_samples"], r["loss"]) for r in train_records(run_dir)]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256: to show that nothing changed."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(reference_run):
    """A finished 12-step run on 2 ranks with checkpoints at steps 4, 8 and 12 (the session's
    reference run, whose settings RUN restates): (run dir, recipe); copy it before changing it."""
    return reference_run


@pytest.fixture
def shard_copy(tmp_path, shards) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    return copy


def _check(tmp_path, shards: Path, tokenizer: Path, **overrides) -> subprocess.CompletedProcess:
    recipe = write_recipe(tmp_path / "recipe.yaml", shards, tokenizer, tmp_path / "run", **RUN, **overrides)
    return run_kolm("train", "--config", recipe, "--check")


@pytest.mark.cli
def test_truncated_shard_stops_training_and_verify_names_it(tmp_path, shard_copy, tokenizer_dir):
    bin_path = next((shard_copy / "train").glob("*.bin"))
    with open(bin_path, "r+b") as f:
        f.truncate(bin_path.stat().st_size - 10)
    before = _snapshot(shard_copy)
    proc = _check(tmp_path, shard_copy, tokenizer_dir)
    assert proc.returncode == 2 and str(bin_path) in proc.stderr and "kolm shard verify" in proc.stderr
    verify = run_kolm("shard", "verify", shard_copy)
    assert verify.returncode != 0 and f"{bin_path}: " in verify.stderr and "truncated" in verify.stderr
    assert _snapshot(shard_copy) == before and not (tmp_path / "run").exists()


@pytest.mark.cli
def test_flipped_byte_in_a_shard_is_named_by_verify(shard_copy):
    idx_path = next((shard_copy / "valid").glob("*.idx"))
    data = bytearray(idx_path.read_bytes())
    data[-1] ^= 0x40
    idx_path.write_bytes(bytes(data))
    verify = run_kolm("shard", "verify", shard_copy)
    assert verify.returncode != 0 and f"{idx_path}: sha256 differs" in verify.stderr
    assert "kolm shard --overwrite" in verify.stderr


@pytest.mark.dist
def test_corrupt_token_ids_stop_training_naming_the_shard(tmp_path, shard_copy, tokenizer_dir):
    # Same sizes, so only reading the tokens can tell. Every 50th token gets an id past the
    # vocabulary (uint16 high byte 0xFF), so the first batch of either rank meets one.
    for bin_path in (shard_copy / "train").glob("*.bin"):
        data = bytearray(bin_path.read_bytes())
        data[1::100] = b"\xff" * len(data[1::100])
        bin_path.write_bytes(bytes(data))
    before = _snapshot(shard_copy)
    recipe = write_recipe(tmp_path / "recipe.yaml", shard_copy, tokenizer_dir, tmp_path / "run", **RUN)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "kolm", "train", "--config", str(recipe)], capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode != 0
    named = re.search(r"kolm: error: (\S+\.bin): token \d+ has id \d+, outside the vocabulary", proc.stderr)
    assert named and Path(named.group(1)).parent == shard_copy / "train", proc.stderr[-3000:]
    assert f"kolm shard verify {shard_copy}" in proc.stderr
    assert _snapshot(shard_copy) == before and not complete_checkpoints(tmp_path / "run" / "checkpoints")


@pytest.mark.cli
def test_missing_idx_is_named(tmp_path, shard_copy, tokenizer_dir):
    idx_path = next((shard_copy / "train").glob("*.idx"))
    idx_path.unlink()
    proc = _check(tmp_path, shard_copy, tokenizer_dir)
    assert proc.returncode == 2 and f"{idx_path}: missing" in proc.stderr
    assert f"{idx_path}: missing" in run_kolm("shard", "verify", shard_copy).stderr


@pytest.mark.cli
def test_hand_edited_manifest_is_refused(tmp_path, shard_copy, tokenizer_dir):
    manifest_path = shard_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["tokens"] += 1
    manifest_path.write_text(json.dumps(manifest, indent=2))
    before = _snapshot(shard_copy)
    for proc in (_check(tmp_path, shard_copy, tokenizer_dir), run_kolm("shard", "verify", shard_copy),
                 run_kolm("shard", "stats", shard_copy)):
        assert proc.returncode != 0 and f"{manifest_path} was changed after `kolm shard` wrote it" in proc.stderr
    assert _snapshot(shard_copy) == before


@pytest.mark.cli
def test_tokenizer_that_does_not_match_the_shards_is_refused(tmp_path, shards, other_tokenizer):
    other = other_tokenizer
    proc = _check(tmp_path, shards, other)
    assert proc.returncode == 2 and str(other) in proc.stderr and "does not match the tokenizer of" in proc.stderr


@pytest.mark.dist
def test_missing_rank_file_falls_back_to_the_previous_checkpoint(tmp_path, finished_run, shards, tokenizer_dir):
    src, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    broken = run / "checkpoints" / "global_step12"
    victim = next(broken.glob("*rank_1*optim_states.pt"))
    victim.unlink()
    kept = _snapshot(run / "checkpoints" / "global_step8")
    recipe = write_recipe(tmp_path / "recipe.yaml", shards, tokenizer_dir, run, **RUN)
    codes, out = run_ranks(2, recipe, log_dir=tmp_path / "logs")
    assert codes == [0, 0], out[-3000:]
    assert f"skipping checkpoint global_step12: {victim.name} is missing; falling back" in out
    assert "resuming from global_step8" in out
    assert why_incomplete(broken) is None  # written again, complete
    assert _snapshot(run / "checkpoints" / "global_step8") == kept
    assert _losses(run) == _losses(src)


@pytest.mark.dist
def test_latest_naming_a_missing_tag_is_ignored_and_said(tmp_path, finished_run):
    src, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    (run / "checkpoints" / "latest").write_text("global_step999")
    said: list[str] = []
    picked = find_resume(run / "checkpoints", said.append)
    assert picked.tag == "global_step12"
    assert any("names 'global_step999', which is missing or incomplete; ignoring it" in s for s in said)
    proc = run_kolm("convert", run, "--out", tmp_path / "model", "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    # Exported models are safetensors only: nothing in them needs unpickling.
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert "model.safetensors" in files and not {f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))}


@pytest.mark.dist
def test_run_dir_of_a_different_recipe_is_refused_before_any_engine(tmp_path, finished_run, shards, tokenizer_dir):
    src, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    before = _snapshot(run)
    recipe = write_recipe(tmp_path / "recipe.yaml", shards, tokenizer_dir, run, **RUN)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    start = time.monotonic()
    proc = run_kolm("train", "--config", recipe, "model_overrides.hidden_size=128", env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{run} holds a run of a different model (hidden_size 64 vs 128" in proc.stderr
    assert "use a new run_dir" in proc.stderr and "DeepSpeed" not in proc.stderr
    # The optimizer and schedule come back from the checkpoint: a changed lr or length would be ignored.
    proc = run_kolm("train", "--config", recipe, "lr=0.01", "train_steps=20", env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{run} was started with different settings (lr 0.003 vs 0.01, total steps 12 vs 20" in proc.stderr
    assert "resume with the original values" in proc.stderr and "DeepSpeed" not in proc.stderr
    assert _snapshot(run) == before
    assert time.monotonic() - start < 120


def _mount_small_disk(path: Path, size_mb: int) -> None:
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")


@pytest.mark.dist
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, finished_run, shards, tokenizer_dir):
    src, _ = finished_run
    disk = tmp_path / "small"
    _mount_small_disk(disk, 64)
    try:
        run = disk / "run"
        recipe = write_recipe(tmp_path / "recipe.yaml", shards, tokenizer_dir, run, **RUN)
        log = tmp_path / "torchrun.log"
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc-per-node", "2", "-m", "kolm", "train", "--config", str(recipe)],
                                    env=env, stdout=out, stderr=subprocess.STDOUT)
        filler = disk / "filler"
        deadline = time.monotonic() + 300
        while not complete_checkpoints(run / "checkpoints"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        workers = workers_of(proc.pid)
        for pid in workers:  # frozen while the disk fills, so the next checkpoint meets a full disk
            os.kill(pid, signal.SIGSTOP)
        # Leave room for metrics lines, not for another checkpoint.
        with open(filler, "wb") as f:
            f.write(b"\0" * (shutil.disk_usage(disk).free - 256 * 1024))
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        code = proc.wait(300)
        text = log.read_text(errors="replace")
        assert code != 0, text[-3000:]
        assert "writing checkpoint global_step8" in text and "The newest complete checkpoint, global_step4, is intact" \
            in text, text[-3000:]
        assert find_resume(run / "checkpoints", lambda m: None).tag == "global_step4"

        filler.unlink()
        codes, out = run_ranks(2, recipe, log_dir=tmp_path / "logs")
        assert codes == [0, 0], out[-3000:]
        assert "resuming from global_step4" in out
        assert _losses(run) == _losses(src)  # the same run as one that never hit a full disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.dist
def test_a_lock_left_by_a_start_killed_while_loading_ops_does_not_hang_the_next(tmp_path, reference_run, shards,
                                                                                 tokenizer_dir):
    # torch's build lock, as a rank SIGKILLed while loading DeepSpeed's shared-memory op leaves it;
    # before kolm loaded the ops itself, every later start waited on it forever. In a private copy of
    # the suite's built ops, so that no other run (or suite) can clear the planted lock first.
    extensions = tmp_path / "torch_extensions"
    shutil.copytree(os.environ["TORCH_EXTENSIONS_DIR"], extensions)
    baton = extensions / "deepspeed_shm_comm" / "lock"
    assert baton.parent.is_dir(), sorted(p.name for p in extensions.iterdir())
    baton.touch()
    recipe = write_recipe(tmp_path / "r.yaml", shards, tokenizer_dir, tmp_path / "run", train_steps=2, save_every=2)
    codes, out = run_ranks(2, recipe, log_dir=tmp_path / "logs", timeout=300,
                           extra_env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert codes == [0, 0], out[-3000:]
    assert f"removing {baton}, left by a process killed while loading a DeepSpeed op" in out
    assert not baton.exists()


@pytest.mark.cli
def test_slurm_script_outside_a_job_says_which_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(REPO / "slurm/pretrain.sbatch"), "recipes/tiny-cpu.yaml"], env=env,
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "SLURM_JOB_ID is not set: submit this script with sbatch" in proc.stderr


@pytest.mark.cli
@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "nodes must be at least 1"),
    (["--time", "5", "--signal-delay", "600"], "leaves no time to train"),
    (["--cluster", "local", "--nodes", "2"], "runs on this machine only"),
])
def test_submit_rejects_impossible_shapes(tmp_path, shards, tokenizer_dir, args, message):
    recipe = write_recipe(tmp_path / "recipe.yaml", shards, tokenizer_dir, tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "launch.submit", "--config", str(recipe), "--gpus-per-node", "0",
                           "--log-dir", str(tmp_path / "logs"), *args], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "logs").exists()
