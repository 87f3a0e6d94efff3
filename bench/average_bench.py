"""Checkpoint averaging: validation loss of the last checkpoint against the element-wise mean of the
last 2, 3 and 5 (`kolm convert --average K`), after a short run with a constant learning rate and
after one with cosine decay to a tenth of it. Same data, shape, seed and steps for both runs.

    .venv/bin/python bench/average_bench.py                          # ~10 min on 2 cores
    .venv/bin/python bench/average_bench.py --steps 60 --no-record    # quick check
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import common
import yaml

from kolm.export.convert import convert
from kolm.export.evaluate import evaluate_model

HEADING = "## Checkpoint averaging"
AVERAGES = (1, 2, 3, 5)
TRAIN = {"model": "phi-10m", "model_overrides": {"num_hidden_layers": 4}, "seq_len": 128, "global_batch": 16,
         "micro_batch": 8, "warmup_steps": 20, "zero_stage": 2, "precision": "fp32", "eval_samples": 0,
         "log_every": 10, "tensorboard": False, "seed": 1234}
SCHEDULES = {"constant": {"lr": 2e-3, "min_lr": 2e-3}, "cosine": {"lr": 2e-3, "min_lr": 2e-4}}


def train(name: str, args: argparse.Namespace, tok: Path, shards: Path, schedule: dict) -> Path:
    """`kolm train` on 2 ranks into bench/out/average/NAME (fresh), a checkpoint every --every steps."""
    run_dir = common.OUT / "average" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = run_dir.with_suffix(".yaml")
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump({**TRAIN, **schedule, "data": str(shards), "tokenizer": str(tok),
                                      "run_dir": str(run_dir), "train_steps": args.steps, "eval_every": args.steps,
                                      "save_every": args.every, "keep_checkpoints": max(AVERAGES)}),
                      encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kolm",
           "train", "--config", str(recipe)]
    common.run_timed(cmd, common.bench_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"), log=run_dir.with_suffix(".log"))
    return run_dir


def averaged_losses(run_dir: Path, shards: Path) -> dict[int, float]:
    """Validation loss of the mean of the newest K checkpoints, for each K (K = 1: the last one)."""
    losses = {}
    for k in AVERAGES:
        out = run_dir.parent / f"{run_dir.name}-avg{k}"
        convert(str(run_dir), str(out), dtype="fp32", force=True, average=k)
        losses[k] = evaluate_model(str(out), str(shards)).eval_loss
        shutil.rmtree(out)
    return losses


def report(results: dict[str, dict[int, float]], args: argparse.Namespace) -> str:
    lines = [f"### {common.timestamp()}: {args.steps} steps of {TRAIN['global_batch']} x {TRAIN['seq_len']} tokens "
             f"(phi-10m, 4 layers) on the first {args.lines:,} lines of `{args.corpus.name}`, a checkpoint every "
             f"{args.every} steps",
             "", f"`{common.command_line('.venv/bin/python', 'bench/average_bench.py', None)}`; {common.cpu_model()}, "
             f"{common.uptime()}, revision {common.git_revision()}. Peak lr 2e-3 after 20 warmup steps; constant, or "
             "cosine to 2e-4. Validation loss per token on the held-out 2% (all windows).",
             "", "| schedule | last checkpoint | " + " | ".join(f"mean of last {k}" for k in AVERAGES[1:]) + " |",
             "|---|--:|" + "--:|" * (len(AVERAGES) - 1)]
    for name, losses in results.items():
        last = losses[1]
        cells = [f"{losses[k]:.4f} ({losses[k] - last:+.4f})" for k in AVERAGES[1:]]
        lines.append(f"| {name} | {last:.4f} | " + " | ".join(cells) + " |")
    lines += ["", "In brackets: the difference from the last checkpoint (negative: averaging helps)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=common.DEFAULT_CORPUS)
    p.add_argument("--lines", type=int, default=40000, help="Korean lines to train on")
    p.add_argument("--vocab", type=int, default=4000, help="the tokenizer's size")
    p.add_argument("--steps", type=int, default=200, help="steps of each run")
    p.add_argument("--every", type=int, default=20, help="steps between checkpoints")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args(argv)
    if args.steps < max(AVERAGES) * args.every:
        common.die(f"--steps {args.steps} leaves fewer than {max(AVERAGES)} checkpoints at --every {args.every}")
    tok, shards = common.korean_training_data(args.corpus, args.lines, args.vocab, 0.02)
    results = {name: averaged_losses(train(name, args, tok, shards, schedule), shards)
               for name, schedule in SCHEDULES.items()}
    common.publish(report(results, args), HEADING, "bench/average_bench.py", not args.no_record)


if __name__ == "__main__":
    main()
