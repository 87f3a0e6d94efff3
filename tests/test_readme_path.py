"""The README's user path, run as written: its command blocks are read out of README.md and run in
order on a tiny corpus, from a directory laid out like the checkout (`corpus/`, `recipes/`,
`.venv`, `slurm/`). The only changes are the ones a user on this machine would make, each of
which must still find its place in the README: fewer processes, tasks and nodes, a smaller model
and run by `key=value`, fewer generated tokens. When the README and the code drift apart, this
fails."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.slurm_cluster import finished, start_cluster, wait_job

REPO = Path(__file__).resolve().parent.parent
MARK = "tests/test_readme_path.py"
# A Phi-1.5 recipe shrunk to seconds on CPU; a user trying the path on a laptop would do the same.
SHRINK = ("model=phi-tiny seq_len=64 global_batch=8 micro_batch=2 train_steps=6 warmup_steps=2 "
          "eval_every=3 eval_samples=16 save_every=3 log_every=1 precision=fp32")
# The default holds out 0.1% for validation: none of a 140 KB corpus (kolm says to raise it).
TINY_CORPUS_VALID = (r"(shard(\.sbatch)? --input corpus/ --tokenizer data/tokenizer --out data/shards)",
                     r"\1 --valid-fraction 0.05")
LOCAL_EDITS = [  # (pattern, replacement): each must match in the block, or the README changed
    (r"--nproc-per-node 8 (-m kolm train --config \S+)", rf"--nproc-per-node 2 \1 {SHRINK}"),
    (r"^(kolm train --config \S+ --check) --ranks 8$", rf"\1 --ranks 2 {SHRINK}"),
    (r"--max-new-tokens 64", "--max-new-tokens 8"),
    TINY_CORPUS_VALID,
]
SLURM_EDITS = [
    (r"--array=0-15", "--array=0-1"),
    TINY_CORPUS_VALID,
    (r"--nodes 4 (slurm/pretrain.sbatch .*)\)$", rf"--nodes 2 \1 {SHRINK})"),
]


def readme_blocks() -> list[str]:
    """The bash blocks the README marks as run by this test, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"<!--[^>]*" + re.escape(MARK) + r"[^>]*-->\s*```bash\n(.*?)```", text, re.S)
    assert len(blocks) == 2, f"README.md should mark two command blocks for {MARK}, found {len(blocks)}"
    return blocks


def edited(block: str, edits: list[tuple[str, str]]) -> str:
    for pattern, replacement in edits:
        block, n = re.subn(pattern, replacement, block, flags=re.M)
        assert n == 1, f"the README's block no longer has /{pattern}/:\n{block}"
    return block


def checkout_like(root: Path, korean_lines: list[str]) -> Path:
    """A working directory as the README assumes one: the checkout's files, and a corpus in corpus/."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("recipes", "slurm"):
        (root / name).symlink_to(REPO / name)
    (root / ".venv").symlink_to(Path(sys.prefix))
    (root / "corpus").mkdir()
    half = len(korean_lines) // 2  # two files: a directory input, as in the README
    (root / "corpus" / "a.txt").write_text("\n".join(korean_lines[:half]) + "\n", encoding="utf-8")
    (root / "corpus" / "b.txt").write_text("\n".join(korean_lines[half:]) + "\n", encoding="utf-8")
    return root


def run_block(script: str, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"the README's commands failed:\n{script}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.mark.dist
def test_the_readme_path_from_corpus_to_a_model(tmp_path, korean_lines):
    root = checkout_like(tmp_path / "work", korean_lines)
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = run_block(edited(readme_blocks()[0], LOCAL_EDITS), root, env, timeout=1200)
    model = root / "models" / "phi-1_5-ko"
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    assert (root / "runs" / "phi-1_5-ko" / "checkpoints" / "latest").read_text().strip() == "global_step6"
    assert "밥을 먹고 나면 늘 하는 생각이 있는데" in proc.stdout  # generate printed its continuation
    assert re.search(r"perplexity", proc.stdout), proc.stdout  # eval printed its scores


@pytest.mark.slurm
@pytest.mark.skipif(os.geteuid() != 0, reason="the local Slurm cluster needs root (tools/local-slurm.sh)")
def test_the_readme_slurm_chain_by_hand(tmp_path, korean_lines):
    cluster = start_cluster()
    root = checkout_like(tmp_path / "work", korean_lines)
    env = {**cluster, "PYTHONPATH": str(REPO), "KOLM_SBATCH_TRAIN": "--gpus-per-node=0 --ntasks-per-node=1 "
           "--cpus-per-task=1", "KOLM_SBATCH_CPU": "--cpus-per-task=1 --mem=1G"}
    proc = run_block(edited(readme_blocks()[1], SLURM_EDITS), root, env, timeout=600)
    convert = re.findall(r"Submitted batch job (\d+)", proc.stdout)[-1]  # the first is the tokenizer's
    info = wait_job(cluster, convert, finished, 900, "run the README's chain")
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(root.glob("*.out")))
    assert info["JobState"] == "COMPLETED", logs[-5000:]
    assert (root / "models" / "phi-1_5-ko" / "config.json").is_file()
    assert "data/tokenizer" in (root / "runs" / "phi-1_5-ko" / "run_config.json").read_text()
