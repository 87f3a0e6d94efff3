"""Document-aware attention: the same small Phi trained for the same steps on the same shards with
``attention: causal`` and ``attention: document``; validation loss of each, evaluated with document
attention (each document on its own, as the model is used on one text), and training tokens/s.

    .venv/bin/python bench/attention_bench.py                 # ko-docs (long documents), ~6 min on 2 cores
    .venv/bin/python bench/attention_bench.py --steps 10 --no-record
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import common

HEADING = "## Document-aware attention"
DOCS = common.ROOT.parent / "shared" / "corpora" / "ko-docs.jsonl.gz"
MODES = ("causal", "document")


def recipe(args: argparse.Namespace, shards: Path, tok: Path, run_dir: Path, attention: str) -> dict:
    return {"data": str(shards), "tokenizer": str(tok), "run_dir": str(run_dir), "model": args.model,
            "seq_len": args.seq_len, "global_batch": args.global_batch, "micro_batch": args.micro_batch,
            "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": max(1, args.steps // 10), "train_steps": args.steps,
            "attention": attention, "precision": "fp32", "zero_stage": 2, "log_every": 1, "eval_every": 1 << 30,
            "save_every": args.steps, "keep_checkpoints": 1, "tensorboard": False}


def train(args: argparse.Namespace, shards: Path, tok: Path, attention: str) -> dict:
    """Train one run; its median step tokens/s and final train loss."""
    work = common.OUT / f"attention-{attention}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    path = work / "recipe.yaml"
    path.write_text(json.dumps(recipe(args, shards, tok, work / "run", attention)), encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *common.kolm_cmd("train", "--config", str(path))[1:]]
    timed = common.run_timed(cmd, common.bench_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"), work / "train.log",
                             args.timeout)
    from kolm.train.metrics import read_metrics

    records = read_metrics(work / "run").train
    steady = [r["tokens_per_s"] for r in records if r["step"] > args.steps // 5 and "tokens_per_s" in r]
    return {"attention": attention, "tokens_per_s": statistics.median(steady), "train_loss": records[-1]["loss"],
            "run": work / "run", "background": timed.background}


def evaluate(run: Path, shards: Path, attention: str, samples: int) -> float:
    out = common.run_timed(common.kolm_cmd("eval", str(run), "--data", str(shards), "--attention", attention,
                                           "--max-samples", str(samples)), common.bench_env()).stdout
    return float(out.split("loss ", 1)[1].split(",", 1)[0])


def format_report(runs: list[dict], evals: dict, args: argparse.Namespace, command: str) -> str:
    causal, document = runs
    lines = [f"### {common.timestamp(utc=True)}", "",
             f"- machine: {common.cpu_model()}, 2 processes x 1 thread; kolm revision {common.git_revision()}",
             f"- command: `{command}`",
             f"- corpus: `{args.corpus.name}` ({args.lines} documents); {args.model}, seq_len {args.seq_len}, global "
             f"batch {args.global_batch}, {args.steps} steps, fp32, the same seed and samples for both", "",
             "| trained with | tokens/s (median step) | final train loss | valid loss, document eval | "
             "valid loss, causal eval |", "|---|--:|--:|--:|--:|"]
    for run in runs:
        a = run["attention"]
        lines.append(f"| {a} | {run['tokens_per_s']:,.0f} | {run['train_loss']:.4f} | {evals[a, 'document']:.4f} | "
                     f"{evals[a, 'causal']:.4f} |")
    cost = 1 - document["tokens_per_s"] / causal["tokens_per_s"]
    lines += ["", f"- cost of the document mask: {cost:+.1%} tokens/s (document vs causal, same run conditions; "
                  f"others kept {max(r['background'] for r in runs):.2f} cores busy at most)",
              f"- document-aware validation loss: causal-trained {evals['causal', 'document']:.4f}, document-trained "
              f"{evals['document', 'document']:.4f}"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=DOCS, help=f"JSON lines with a text field (default {DOCS.name})")
    p.add_argument("--lines", type=int, default=1196, help="documents to use (default: all of ko-docs)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model", default="phi-10m")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--eval-samples", type=int, default=200, help="validation windows per evaluation")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--no-record", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tok, shards = common.korean_training_data(args.corpus, args.lines, args.vocab_size, 0.05)
    runs = [train(args, shards, tok, mode) for mode in MODES]
    evals = {(run["attention"], mode): evaluate(run["run"], shards, mode, args.eval_samples)
             for run in runs for mode in MODES}
    report = format_report(runs, evals, args, common.command_line(".venv/bin/python", "bench/attention_bench.py",
                                                                  argv))
    common.publish(report, HEADING, "bench/attention_bench.py", not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
