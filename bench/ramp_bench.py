"""Batch-size ramp-up at equal wall-clock: the same small Phi trained for the same number of seconds with
a small constant batch, a large constant batch, and a ramp from the small to the large one, in the
same run; then each final checkpoint's validation loss on held-out Korean text.

Each arm runs `kolm train` on 2 local processes with a run length none of them reaches; once its first
step is logged, the arm gets ``--seconds`` of training, then SIGUSR1 makes it checkpoint and stop (exit
75), and `kolm eval` scores that checkpoint. The learning rate is constant after a warmup counted in
samples (``min_lr = lr``), so no arm is caught at another point of a decay.

    .venv/bin/python bench/ramp_bench.py                  # nsmc reviews, 3 arms x ~3 min on 2 cores
    .venv/bin/python bench/ramp_bench.py --seconds 20 --no-record
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common

HEADING = "## Batch-size ramp-up"


def arms(args: argparse.Namespace) -> dict[str, dict]:
    """Each arm's batch settings."""
    small, large = args.small_batch, args.large_batch
    return {f"constant {small}": {"global_batch": small},
            f"constant {large}": {"global_batch": large},
            f"ramp {small} -> {large}": {"global_batch": large,
                                         "rampup_batch_size": [small, args.increment, args.ramp_samples]}}


def recipe(args: argparse.Namespace, shards: Path, tok: Path, run_dir: Path, batch: dict) -> dict:
    return {"data": str(shards), "tokenizer": str(tok), "run_dir": str(run_dir), "model": args.model,
            "seq_len": args.seq_len, "micro_batch": args.micro_batch, "lr": args.lr, "min_lr": args.lr,
            # warmup in steps of the large batch, so every arm warms up over the same samples
            "warmup_steps": args.warmup_steps, "train_steps": 1_000_000, "precision": "fp32", "zero_stage": 2,
            "log_every": 10, "eval_every": 1 << 30, "save_every": 1 << 30, "keep_checkpoints": 1,
            "tensorboard": False, "global_batch": batch["global_batch"],
            **({"rampup_batch_size": batch["rampup_batch_size"]} if "rampup_batch_size" in batch else {})}


def train(args: argparse.Namespace, shards: Path, tok: Path, name: str, batch: dict) -> dict:
    """Train one arm for ``args.seconds`` after its first logged step; what it reached."""
    work = common.OUT / f"ramp-{name.replace(' ', '').replace('->', '-')}"
    return {"name": name, **common.train_kolm_for(recipe(args, shards, tok, work / "run", batch), work, args.seconds,
                                                  args.timeout)}


def evaluate(run: Path, shards: Path, samples: int) -> float:
    out = common.run_timed(common.kolm_cmd("eval", str(run), "--data", str(shards), "--max-samples", str(samples)),
                           common.bench_env()).stdout
    return float(out.split("loss ", 1)[1].split(",", 1)[0])


def format_report(runs: list[dict], args: argparse.Namespace, command: str, windows: int) -> str:
    lines = [f"### {common.timestamp(utc=True)}", "",
             f"- machine: {common.cpu_model()}, 2 processes x 1 thread; kolm revision {common.git_revision()}",
             f"- command: `{command}`",
             f"- corpus: first {args.lines:,} lines of `{args.corpus.name}`, tokenizer {args.vocab_size:,} tokens; "
             f"{args.model}, seq_len {args.seq_len}, micro batch {args.micro_batch}, fp32, lr {args.lr:g} constant "
             f"after a warmup of {args.warmup_steps} x {args.large_batch} samples; {args.seconds:.0f} s of training "
             f"per arm after its first step, then SIGUSR1; validation loss on {windows} held-out windows", "",
             "| arm | trained s | optimizer steps | samples | train loss (last 10 logged) | validation loss | "
             "cores busy (all processes) |", "|---|--:|--:|--:|--:|--:|--:|"]
    for run in runs:
        lines.append(f"| {run['name']} | {run['seconds']:.0f} | {run['steps']:,} | {run['samples']:,} | "
                     f"{run['train_loss']:.4f} | {run['valid_loss']:.4f} | {run['busy']:.2f} |")
    best = min(runs, key=lambda r: r["valid_loss"])
    large = runs[1]
    lines += ["", f"- lowest validation loss: {best['name']} ({best['valid_loss'] - large['valid_loss']:+.4f} "
                  f"against {large['name']})"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=common.DEFAULT_CORPUS)
    p.add_argument("--lines", type=int, default=60_000)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model", default="phi-tiny")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--small-batch", type=int, default=4)
    p.add_argument("--large-batch", type=int, default=16)
    p.add_argument("--increment", type=int, default=4)
    p.add_argument("--ramp-samples", type=int, default=2000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--seconds", type=float, default=180.0, help="training seconds per arm")
    p.add_argument("--eval-samples", type=int, default=400, help="validation windows")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--no-record", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tok, shards = common.korean_training_data(args.corpus, args.lines, args.vocab_size, 0.02)
    from kolm.data.packed import PackedDataset

    windows = min(args.eval_samples, PackedDataset(shards, "valid", args.seq_len).num_samples)
    runs = [train(args, shards, tok, name, batch) for name, batch in arms(args).items()]
    for run in runs:
        run["valid_loss"] = evaluate(run["run"], shards, windows)
    report = format_report(runs, args, common.command_line(".venv/bin/python", "bench/ramp_bench.py", argv), windows)
    common.publish(report, HEADING, "bench/ramp_bench.py", not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
