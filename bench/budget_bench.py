"""Equal wall-clock against the seed: the seed's Hugging Face `Trainer` recipe and a kolm recipe train the
same Phi shape on the same Korean lines with the same tokenizer for the same seconds, one after the other in
one run; then both models score the same unseen lines, one line at a time.

* ``seed``: bench/seed.py (one line = one padded sample, per-device batch 4 x accumulation 4, AdamW 5e-4,
  10,000 warmup steps, cosine over 2 epochs), one process with 2 threads, fp32. A Trainer callback stops it
  ``--seconds`` after its first optimizer step and the model is saved as it is.
* ``kolm``: `kolm train` on 2 ranks of one thread (ZeRO-2, fp32) on packed windows with document attention and
  a batch ramp; its learning rate decays over ``--schedule-samples`` windows, a length chosen so that the decay
  ends near the budget on this machine. ``--seconds`` after its first logged step SIGUSR1 stops it (or it
  ends by itself), and `kolm convert` exports it.

Scoring: the lines after the first ``--lines`` of the corpus that are not also training lines, the first
``--score-lines`` of them. Each line is tokenized alone, with no special tokens, and the loss is the mean
negative log-likelihood per predicted token (every token after the first), over all lines.

    .venv/bin/python bench/budget_bench.py                          # 2 x 600 s of training on 2 cores
    .venv/bin/python bench/budget_bench.py --seconds 30 --no-record
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

import common
import seed

HEADING = "## Equal wall-clock against the seed"


def held_out_lines(corpus: Path, skip: int, count: int, training: set[str]) -> list[str]:
    """The first ``count`` lines after the first ``skip`` that are not training lines (nor blank), stripped as
    kolm and the seed read lines."""
    out: list[str] = []
    with common.open_text(corpus) as f:
        for i, line in enumerate(f):
            text = line.strip()
            if i >= skip and text and text not in training:
                out.append(text)
                if len(out) == count:
                    return out
    common.die(f"{corpus} has only {len(out)} unseen lines after its first {skip:,}; pass fewer --lines")


def prepare(args: argparse.Namespace) -> tuple[Path, Path, Path, Path]:
    """(training text, tokenizer, shards, held-out lines file), cached in ``bench/out/``."""
    tok, shards = common.korean_training_data(args.corpus, args.lines, args.vocab_size, args.valid_fraction)
    train_text = common.prepare_corpus(args.corpus, args.lines)
    held = common.OUT / f"heldout-{common.stem(args.corpus)}-{args.lines}-{args.score_lines}.txt.gz"
    if not held.is_file():
        lines = held_out_lines(args.corpus, args.lines, args.score_lines, set(common.read_lines(train_text)))
        with gzip.open(held, "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return train_text, tok, shards, held


# --------------------------------------------------------------------------- the seed (child process)


def child_seed(corpus: Path, tok_dir: Path, out: Path, model: str, layers: int, seconds: float) -> dict:
    """Train the seed recipe for ``seconds`` after its first optimizer step; save the model to ``out``."""
    import torch

    torch.set_num_threads(2)
    seed.require_accelerate()
    from transformers import DataCollatorForLanguageModeling, PhiForCausalLM, Trainer, TrainerCallback

    tok = seed.tokenizer(tok_dir)
    data = seed.dataset(common.read_lines(corpus), tok, 512)
    torch.manual_seed(1234)
    net = PhiForCausalLM(seed.model_config(tok_dir, model, 512, num_hidden_layers=layers))
    clock: dict[str, float] = {}

    class Budget(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.setdefault("start", time.monotonic())
            clock["end"], clock["steps"] = time.monotonic(), state.global_step
            control.should_training_stop = clock["end"] - clock["start"] >= seconds

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock["loss"] = float(logs["loss"])

    trainer = Trainer(model=net, args=seed.training_arguments(out / "trainer", logging_steps=50,
                                                              **seed.recipe_hyperparameters()),
                      train_dataset=data, data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                      callbacks=[Budget()])
    trainer.train()
    trainer.save_model(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    return {"seconds": clock["end"] - clock["start"], "steps": clock["steps"], "samples": clock["steps"] * 16,
            "train_loss": clock.get("loss", float("nan")), "lr": trainer.lr_scheduler.get_last_lr()[0]}


def train_seed(args: argparse.Namespace, corpus: Path, tok: Path) -> dict:
    work = common.OUT / "budget-seed"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-seed", str(work), "--data-corpus", str(corpus),
           "--tokenizer-dir", str(tok), "--model", args.model, "--layers", str(args.layers),
           "--seconds", str(args.seconds)]
    env = common.bench_env(OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    b0 = common.busy_jiffies()
    timed = common.run_timed(cmd, env, work.with_suffix(".log"), args.seconds + args.timeout, cwd=common.ROOT)
    report = json.loads(timed.stdout.strip().splitlines()[-1])
    busy = (common.busy_jiffies() - b0) / timed.wall / os.sysconf("SC_CLK_TCK")
    return {"name": "seed (HF Trainer)", "model": work / "model", **report, "busy": busy, "load": os.getloadavg()[0]}


# --------------------------------------------------------------------------- kolm


def kolm_recipe(args: argparse.Namespace, shards: Path, tok: Path, run_dir: Path, ramp: str) -> dict:
    start, step, samples = (int(x) for x in ramp.split(","))
    return {"data": str(shards), "tokenizer": str(tok), "run_dir": str(run_dir), "model": args.model,
            "model_overrides": {"num_hidden_layers": args.layers}, "seq_len": args.seq_len,
            "attention": "document", "micro_batch": args.micro_batch, "global_batch": args.global_batch,
            "rampup_batch_size": [start, step, samples], "lr": args.lr, "min_lr": args.lr * args.min_lr_ratio,
            "warmup_steps": args.warmup_steps, "train_steps": max(1, args.schedule_samples // args.global_batch),
            "precision": "fp32", "zero_stage": 2, "log_every": 10, "eval_every": 1 << 30, "eval_samples": 0,
            "save_every": 1 << 30, "keep_checkpoints": 1, "tensorboard": False}


def full_batch_rate(args: argparse.Namespace, shards: Path, tok: Path) -> float:
    """Windows per second of the kolm recipe at its full batch, from a short run of it on this machine now."""
    recipe = {**kolm_recipe(args, shards, tok, common.OUT / "budget-pilot" / "run", args.ramps[0]),
              "train_steps": 1_000_000}
    del recipe["rampup_batch_size"]
    run = common.train_kolm_for(recipe, common.OUT / "budget-pilot", args.pilot_seconds, args.timeout, args.ranks)
    return run["samples"] / run["seconds"]


def train_kolm(args: argparse.Namespace, shards: Path, tok: Path, ramp: str) -> dict:
    if args.schedule_samples == 0:  # the decay should end with the budget: size it from this machine's speed
        args.pilot_rate = full_batch_rate(args, shards, tok)
        args.schedule_samples = int(args.pilot_rate * args.seconds * args.pilot_share)
    work = common.OUT / f"budget-kolm-{ramp.replace(',', '-')}"
    run = common.train_kolm_for(kolm_recipe(args, shards, tok, work / "run", ramp), work, args.seconds,
                                args.timeout, args.ranks)
    model = work / "model"
    common.run_quiet(common.kolm_cmd("convert", str(run["run"]), "--out", str(model), "--force", "--dtype", "fp32"),
                     "exporting the kolm run")
    from kolm.train.metrics import read_metrics

    lr = read_metrics(run["run"]).train[-1]["lr"]
    run["load"] = os.getloadavg()[0]
    return {"name": f"kolm, ramp [{ramp}] to {args.global_batch}", "model": model, **run, "lr": lr}


# --------------------------------------------------------------------------- scoring (child process)


def child_score(model_dir: Path, tok_dir: Path, lines_file: Path) -> dict:
    """Mean loss per predicted token of every held-out line scored alone (a batch of lines is padded on the
    right, and padding is neither attended to nor scored)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.pad_token = tok.pad_token or tok.eos_token  # padding is masked out: any id serves
    net = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    lines = common.read_lines(lines_file)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(lines), 32):
            enc = tok(lines[i:i + 32], add_special_tokens=False, truncation=True, max_length=512,
                      padding=True, return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
            logits = net(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            keep = mask[:, 1:].bool()
            total += float(nll[keep].sum())
            count += int(keep.sum())
    return {"loss": total / count, "tokens": count, "lines": len(lines)}


def score(model: Path, tok: Path, held: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-score", str(model), "--tokenizer-dir",
           str(tok), "--data-corpus", str(held)]
    return json.loads(common.run_timed(cmd, common.bench_env(TOKENIZERS_PARALLELISM="false"), None, timeout,
                                       cwd=common.ROOT).stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def format_report(runs: list[dict], args: argparse.Namespace, command: str) -> str:
    seed_run, kolm_run = runs[0], min(runs[1:], key=lambda r: r["score"]["loss"])
    gain = seed_run["score"]["loss"] - kolm_run["score"]["loss"]
    lines = [f"### {common.timestamp(utc=True)}", "",
             f"- machine: {common.cpu_model()}; kolm revision {common.git_revision()}",
             f"- command: `{command}`",
             f"- training text: first {args.lines:,} lines of `{args.corpus.name}`; tokenizer {args.vocab_size:,} "
             f"tokens trained on them; model {args.model} with {args.layers} layers; {args.seconds:.0f} s of "
             f"training per arm after its first optimizer step, one arm after the other",
             f"- kolm: {args.ranks} rank(s), document attention, seq_len {args.seq_len}, micro batch "
             f"{args.micro_batch}, rampup_batch_size as named to a global batch of {args.global_batch}, lr "
             f"{args.lr:g} (warmup {args.warmup_steps} x {args.global_batch} windows, "
             f"cosine to {args.lr * args.min_lr_ratio:g} over {args.schedule_samples:,} windows{pilot_note(args)})",
             f"- scored: {kolm_run['score']['lines']:,} unseen lines ({kolm_run['score']['tokens']:,} predicted "
             f"tokens), each alone", "",
             "| run | trained s | optimizer steps | samples | lr at the end | train loss | held-out loss per token "
             "| cores busy (all processes) | load average at the end |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in runs:
        lines.append(f"| {r['name']} | {r['seconds']:.0f} | {r['steps']:,} | {r['samples']:,} | {r['lr']:.2e} | "
                     f"{r['train_loss']:.3f} | {r['score']['loss']:.3f} | {r['busy']:.2f} | {r['load']:.1f} |")
    verdict = "met" if gain >= 0.5 else "not met"
    lines += ["", f"- {kolm_run['name']}: held-out loss {gain:.3f} nats per token below the seed's (goal: at least "
                  f"0.5 after 600 s: {verdict}{'' if args.seconds >= 600 else ', budget shorter than the goal'})"]
    return "\n".join(lines) + "\n"


def pilot_note(args: argparse.Namespace) -> str:
    if not getattr(args, "pilot_rate", None):
        return ""
    return (f": {args.pilot_share:g} of the {args.pilot_rate:.1f} windows/s a {args.pilot_seconds:.0f}-s run at the "
            f"full batch made just before, times the budget")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=common.DEFAULT_CORPUS)
    p.add_argument("--lines", type=int, default=200_000, help="training lines: the first LINES of the corpus")
    p.add_argument("--score-lines", type=int, default=2000)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--valid-fraction", type=float, default=0.001, help="kolm shard's held-out share (unused here)")
    p.add_argument("--model", default="phi-10m", help="a kolm preset (phi-10m: hidden 256)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seconds", type=float, default=600.0, help="training seconds per arm")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--ramps", type=lambda v: v.split(";"), default=["4,4,2000"],
                   help="kolm's rampup_batch_size as START,INCREMENT,SAMPLES; one kolm arm per ';'-separated ramp")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--schedule-samples", type=int, default=0,
                   help="windows over which kolm's lr decays (default: the share --pilot-share of what a "
                        "--pilot-seconds run at the full batch projects for the budget)")
    p.add_argument("--pilot-seconds", type=float, default=45.0)
    p.add_argument("--pilot-share", type=float, default=0.9, help="the ramp's small steps take longer per window")
    p.add_argument("--ranks", type=int, default=2, help="kolm's processes (2 of 1 thread, or 1 of 2 threads)")
    p.add_argument("--arms", default="seed,kolm")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--child-seed", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-score", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data-corpus", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer-dir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_seed:
        print(json.dumps(child_seed(args.data_corpus, args.tokenizer_dir, args.child_seed, args.model, args.layers,
                                    args.seconds)))
        return 0
    if args.child_score:
        print(json.dumps(child_score(args.child_score, args.tokenizer_dir, args.data_corpus)))
        return 0
    corpus, tok, shards, held = prepare(args)
    arms = args.arms.split(",")
    runs = ([train_seed(args, corpus, tok)] if "seed" in arms else []) + (
        [train_kolm(args, shards, tok, ramp) for ramp in args.ramps] if "kolm" in arms else [])
    for run in runs:
        run["score"] = score(run["model"], tok, held, args.timeout)
        print(f"{run['name']}: {run['steps']} steps, {run['samples']} samples, held-out loss "
              f"{run['score']['loss']:.4f}", file=sys.stderr)
    if "seed" in arms and "kolm" in arms:
        report = format_report(runs, args, common.command_line(".venv/bin/python", "bench/budget_bench.py", argv))
        common.publish(report, HEADING, "bench/budget_bench.py", not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
