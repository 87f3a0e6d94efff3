"""The optimizer step on CPU: PyTorch's AdamW as a loop of tensor ops against its fused kernel (what kolm
asks DeepSpeed for on CPU), on the flat fp32 partition one ZeRO rank of a 2-rank run holds, one thread,
interleaved rounds in one run; then what that step costs beside a whole training step of the same model.

For each model: the median time of an AdamW step (weight decay 0.1) on a flat tensor of half the model's
parameters, plain and fused, and the largest difference between the two after the timed steps (they
should agree to float rounding). Then `kolm train` runs the first model on 2 ranks of one thread at a
global batch of 4 windows for ``--steps`` steps, and the fused step's saving is set against its median
logged step time.

    .venv/bin/python bench/optimizer_bench.py
    .venv/bin/python bench/optimizer_bench.py --models phi-tiny --steps 10 --no-record
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import common

if TYPE_CHECKING:
    import torch

HEADING = "## The optimizer step on CPU"


def params_of(model: str, layers: int | None, vocab: int) -> int:
    """Trainable parameters of a kolm preset (with ``layers`` decoder blocks) for this vocabulary."""
    import torch
    from transformers import PhiForCausalLM

    from kolm.model.presets import build_config, get_shape, padded_vocab

    shape = get_shape(model, **({"num_hidden_layers": layers} if layers else {}))
    with torch.device("meta"):
        net = PhiForCausalLM(build_config(shape, padded_vocab(vocab), 0, 0, shape.max_position_embeddings))
    return sum(p.numel() for p in net.parameters())


def step_times(numel: int, fused: bool, steps: int) -> tuple[list[float], torch.Tensor]:
    """Seconds per AdamW step on one flat fp32 tensor of ``numel`` elements, and its final values."""
    import torch

    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(numel, generator=gen))
    param.grad = torch.randn(numel, generator=gen) * 1e-2
    opt = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.1, **({"fused": True} if fused else {}))
    opt.step()  # state allocation is not part of a step
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times, param.detach()


def compare(numel: int, steps: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    runs = {"plain": [], "fused": []}
    final = {}
    for _, method in common.rounds(list(runs), repeats):
        times, final[method] = step_times(numel, method == "fused", steps)
        runs[method] += times
    return {"plain": statistics.median(runs["plain"]), "fused": statistics.median(runs["fused"]),
            "max_diff": float((final["plain"] - final["fused"]).abs().max())}


def training_step_seconds(args: argparse.Namespace) -> float:
    """The median logged step time of `kolm train` (2 ranks x 1 thread, global batch 4) on this machine now."""
    tok, shards = common.korean_training_data(args.corpus, args.lines, args.vocab_size, 0.01)
    recipe = {"data": str(shards), "tokenizer": str(tok), "run_dir": str(common.OUT / "optimizer-run" / "run"),
              "model": args.models[0], "seq_len": 128, "micro_batch": 2, "global_batch": 4, "lr": 1e-3,
              "warmup_steps": 1, "train_steps": args.steps, "precision": "fp32", "zero_stage": 2, "log_every": 1,
              "eval_every": 1 << 30, "eval_samples": 0, "save_every": 1 << 30, "keep_checkpoints": 1,
              "tensorboard": False, **({"model_overrides": {"num_hidden_layers": args.layers}} if args.layers else {})}
    run = common.train_kolm_for(recipe, common.OUT / "optimizer-run", 1e9, args.timeout)
    from kolm.train.metrics import read_metrics

    records = [r for r in read_metrics(run["run"]).train if r.get("tokens_per_s")][2:]  # past the first steps
    return statistics.median(4 * 128 / r["tokens_per_s"] for r in records)


def format_report(rows: list[tuple[str, int, dict]], step: float, args: argparse.Namespace, command: str) -> str:
    lines = [f"### {common.timestamp(utc=True)}", "",
             f"- machine: {common.cpu_model()}, 1 thread; {common.library_versions(['torch'])}; kolm revision "
             f"{common.git_revision()}", f"- command: `{command}`",
             f"- {args.repeats} interleaved rounds of {args.opt_steps} steps per method and model; medians", "",
             "| model | parameters per rank | plain AdamW ms | fused AdamW ms | plain / fused | max difference |",
             "|---|--:|--:|--:|--:|--:|"]
    for name, numel, r in rows:
        lines.append(f"| {name} | {numel:,} | {r['plain'] * 1e3:.1f} | {r['fused'] * 1e3:.1f} | "
                     f"{r['plain'] / r['fused']:.1f}x | {r['max_diff']:.1e} |")
    name, _, first = rows[0]
    saved = first["plain"] - first["fused"]
    lines += ["", f"- `kolm train` {name}, 2 ranks x 1 thread, global batch 4 x 128 tokens, fused AdamW: median step "
                  f"{step * 1e3:.0f} ms; the plain loop would add {saved * 1e3:.0f} ms to it "
                  f"({saved / step:.0%} of the fused step)"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=common.DEFAULT_CORPUS)
    p.add_argument("--lines", type=int, default=20_000)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--models", type=lambda v: v.split(","), default=["phi-10m", "phi-tiny", "phi-40m"])
    p.add_argument("--layers", type=int, default=4, help="decoder blocks of the first model (0: the preset's)")
    p.add_argument("--opt-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="kolm train steps for the whole-step time")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--no-record", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    for i, model in enumerate(args.models):
        layers = args.layers if i == 0 and args.layers else None
        numel = params_of(model, layers, args.vocab_size) // 2
        label = f"{model} ({layers} layers)" if layers else model
        rows.append((label, numel, compare(numel, args.opt_steps, args.repeats)))
        print(f"{label}: {rows[-1][2]}", file=sys.stderr)
    step = training_step_seconds(args)
    report = format_report(rows, step, args, common.command_line(".venv/bin/python", "bench/optimizer_bench.py", argv))
    common.publish(report, HEADING, "bench/optimizer_bench.py", not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
