"""The fused loss: `kolm train`'s peak memory and tokens/s against a plain PyTorch step of the same shapes.

Both run one process on the same machine, interleaved, with a large vocabulary, where the logits dominate:

* ``plain``  PhiForCausalLM with fp32 master weights, torch.optim.AdamW, the forward under bf16 autocast,
             the loss as the seed computes it (full logits, their fp32 copy, cross-entropy);
* ``kolm``   ``kolm train`` (one process, DeepSpeed ZeRO-2, bf16): the loss fused with the LM head, a chunk
             of tokens at a time (kolm.model.loss).

Shapes (defaults): hidden 256 x 4 layers, 51,200 embedding rows (kolm pads a bench tokenizer's vocabulary
up with ``vocab_multiple``), micro batch 8, seq 512, bf16. Peak memory is each process's peak resident set
(ru_maxrss); tokens/s is the median timed step. The targets: kolm's peak at most half the plain step's,
its tokens/s at least 0.9 of it.

    .venv/bin/python bench/loss_bench.py                    # 2 rounds, ~5 min on 2 cores
    .venv/bin/python bench/loss_bench.py --steps 3 --repeats 1 --no-record
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import common

HEADING = "## Fused loss: memory and speed"
PLAIN, KOLM = "plain", "kolm"
PEAK_RSS = ("import json, resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print(json.dumps({'code': code, 'peak_rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss "
            "* 1024}))")


@dataclass
class Run:
    method: str
    peak_rss: int  # bytes
    step_seconds: list[float]
    tokens_per_step: int
    loss_first: float
    loss_last: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / statistics.median(self.step_seconds)


# --------------------------------------------------------------------------- the plain step (child process)


def plain_child(args: argparse.Namespace) -> dict:
    """Train ``args.warmup + args.steps`` plain steps; report every timed step and the losses."""
    import torch
    from transformers import PhiForCausalLM

    from kolm.model.presets import build_config, get_shape

    shape = get_shape(args.model, num_hidden_layers=args.layers)
    torch.manual_seed(0)
    model = PhiForCausalLM(build_config(shape, args.vocab, 0, 0, args.seq_len))
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    x = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len + 1))
    seconds, losses = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
    return {"step_seconds": seconds, "loss_first": losses[0], "loss_last": losses[-1]}


# --------------------------------------------------------------------------- the two methods


def measure_plain(args: argparse.Namespace) -> Run:
    cmd = [sys.executable, "-c", PEAK_RSS, sys.executable, __file__, "--child", *_shape_args(args)]
    out = common.run_timed(cmd, common.bench_env(OMP_NUM_THREADS=str(args.threads)), timeout=args.timeout).stdout
    report, peak = (json.loads(line) for line in out.strip().splitlines()[-2:])
    return Run(PLAIN, peak["peak_rss"], report["step_seconds"], args.micro_batch * args.seq_len,
               report["loss_first"], report["loss_last"])


def measure_kolm(args: argparse.Namespace, shards: Path, tok: Path) -> Run:
    work = common.OUT / "loss-bench-kolm"
    shutil.rmtree(work, ignore_errors=True)
    recipe = work / "recipe.yaml"
    work.mkdir(parents=True)
    recipe.write_text(json.dumps(_recipe(args, shards, tok, work / "run")), encoding="utf-8")
    cmd = [sys.executable, "-c", PEAK_RSS, *common.kolm_cmd("train", "--config", str(recipe))]
    env = common.bench_env(drop=("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"),
                           OMP_NUM_THREADS=str(args.threads), DS_ACCELERATOR="cpu")
    out = common.run_timed(cmd, env, log=work / "train.log", timeout=args.timeout).stdout
    peak = json.loads(out.strip().splitlines()[-1])
    from kolm.train.metrics import read_metrics

    records = read_metrics(work / "run").train
    timed = [r for r in records if r["step"] > args.warmup]
    tokens = args.micro_batch * args.seq_len
    return Run(KOLM, peak["peak_rss"], [tokens / r["tokens_per_s"] for r in timed], tokens, records[0]["loss"],
               records[-1]["loss"])


def _recipe(args: argparse.Namespace, shards: Path, tok: Path, run_dir: Path) -> dict:
    # vocab_multiple pads the bench tokenizer's embedding rows up to the vocabulary being measured.
    return {"data": str(shards), "tokenizer": str(tok), "run_dir": str(run_dir), "model": args.model,
            "model_overrides": {"num_hidden_layers": args.layers}, "vocab_multiple": args.vocab,
            "seq_len": args.seq_len, "global_batch": args.micro_batch, "micro_batch": args.micro_batch,
            "lr": 5e-4, "weight_decay": 0.1, "warmup_steps": 1, "train_steps": args.warmup + args.steps,
            "zero_stage": 2, "precision": "bf16", "log_every": 1, "eval_every": 1 << 30, "save_every": 1 << 30,
            "keep_checkpoints": 1, "tensorboard": False}


def _shape_args(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--layers", str(args.layers), "--vocab", str(args.vocab), "--seq-len",
            str(args.seq_len), "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
            "--warmup", str(args.warmup)]


# --------------------------------------------------------------------------- report


def format_report(runs: list[Run], args: argparse.Namespace, command: str) -> str:
    best = {m: max((r for r in runs if r.method == m), key=lambda r: r.tokens_per_s) for m in (PLAIN, KOLM)}
    lowest = {m: min(r.peak_rss for r in runs if r.method == m) for m in (PLAIN, KOLM)}
    lines = [f"### {common.timestamp(utc=True)}", "",
             f"- machine: {common.cpu_model()}, {args.threads} threads; "
             f"{common.library_versions(['torch', 'deepspeed', 'transformers'])}",
             f"- kolm revision: {common.git_revision()}; command: `{command}`",
             f"- shapes: {args.model} with {args.layers} layers, {args.vocab:,} embedding rows, micro batch "
             f"{args.micro_batch}, seq {args.seq_len}, bf16; {args.steps} timed steps after {args.warmup}, "
             f"{args.repeats} interleaved rounds (best tokens/s, lowest peak)", "",
             "| method | peak RSS GiB | tokens/s (median step) | loss first -> last |", "|---|--:|--:|---|"]
    for m in (PLAIN, KOLM):
        r = best[m]
        lines.append(f"| {m} | {lowest[m] / 2**30:.2f} | {r.tokens_per_s:,.0f} | {r.loss_first:.3f} -> "
                     f"{r.loss_last:.3f} |")
    memory = lowest[KOLM] / lowest[PLAIN]
    speed = best[KOLM].tokens_per_s / best[PLAIN].tokens_per_s
    lines += ["", f"- kolm / plain peak memory: {memory:.2f} (target at most 0.5: "
                  f"{'met' if memory <= 0.5 else 'not met'})",
              f"- kolm / plain tokens/s: {speed:.2f} (target at least 0.9: {'met' if speed >= 0.9 else 'not met'})"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=common.DEFAULT_CORPUS)
    p.add_argument("--lines", type=int, default=50_000, help="corpus lines for the bench tokenizer and shards")
    p.add_argument("--model", default="phi-10m", help="preset (hidden 256)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=51200, help="embedding rows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--max-wait", type=float, default=60.0, help="wait at most this long for a quiet machine")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(plain_child(args)))
        return 0
    if not args.corpus.is_file():
        common.die(f"no corpus at {args.corpus}; pass --corpus PATH")
    tok, shards = common.ensure_training_data(common.prepare_corpus(args.corpus, args.lines), 8000)
    runs = []
    for r, method in common.rounds([PLAIN, KOLM], args.repeats):
        common.wait_for_quiet(0.5, args.max_wait)
        runs.append(measure_plain(args) if method == PLAIN else measure_kolm(args, shards, tok))
        print(f"  round {r + 1} {method}: peak {runs[-1].peak_rss / 2**30:.2f} GiB, "
              f"{runs[-1].tokens_per_s:,.0f} tokens/s", file=sys.stderr)
    report = format_report(runs, args, common.command_line(".venv/bin/python", "bench/loss_bench.py", argv))
    common.publish(report, HEADING, "bench/loss_bench.py", not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
