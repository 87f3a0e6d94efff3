"""`kolm demo`: the whole line on the bundled Korean corpus, reusing whatever is already done.

tokenizer -> shards -> a small Phi trained with DeepSpeed on 2 local processes (CPU) or every
GPU -> Hugging Face directory -> generated Korean text, with validation perplexity before and
after training."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from kolm.data.corpus import bundled_corpus_files
from kolm.errors import KolmError
from kolm.files import atomic_write_json

PROMPT = "밥을 먹고 나면 늘 하는 생각이 있는데"  # the seed's prompt


def _stage(name: str) -> None:
    print(f"\n== {name}", file=sys.stderr, flush=True)


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def demo_recipe(root: Path, steps: int, gpu: bool, nproc: int) -> dict:
    """A tiny Phi that learns the bundled corpus in a few minutes on 2 CPU cores.

    The global batch is at least 16 sequences and a whole number of micro batches of 4 on every
    one of ``nproc`` ranks, so any GPU count (3, 6, 8 ...) gives a valid layout."""
    micro = 4
    accumulation = max(1, -(-16 // (micro * nproc)))
    return {
        "data": str(root / "shards"), "tokenizer": str(root / "tokenizer"), "run_dir": str(root / "run"),
        "model": "phi-tiny", "seq_len": 128, "global_batch": micro * nproc * accumulation, "micro_batch": micro,
        "lr": 3.0e-3, "min_lr": 3.0e-4, "warmup_steps": max(1, steps // 10), "train_steps": steps,
        "zero_stage": 2,
        # CPUs without native bf16 run it far slower than fp32.
        "precision": "bf16" if gpu else "fp32",
        "eval_at_start": True, "eval_every": steps, "save_every": steps, "keep_checkpoints": 1,
        "log_every": 10, "tensorboard": False,
    }


def _finished(run_dir: Path, steps: int) -> bool:
    from kolm.train.checkpoint import complete_checkpoints

    done = complete_checkpoints(run_dir / "checkpoints")
    return bool(done) and done[0].step >= steps


def train_processes(gpu: bool) -> tuple[int, dict]:
    """How many local ranks, and their environment: every GPU, else 2 CPU processes."""
    import torch

    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if gpu:
        return torch.cuda.device_count(), env
    env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    return 2, env


def run_training(recipe: Path, gpu: bool) -> None:
    n, env = train_processes(gpu)
    if n < 1:
        raise KolmError("CUDA is available but reports no devices; check CUDA_VISIBLE_DEVICES")
    _note(f"{n} {'GPU' if gpu else 'CPU'} processes: torchrun --standalone --nproc-per-node {n} "
          f"-m kolm train --config {recipe}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               "-m", "kolm", "train", "--config", str(recipe)]
    # Its log goes to stderr with the other stages; stdout is left for the results.
    code = subprocess.run(command, env=env, stdout=sys.stderr).returncode
    if code != 0:
        raise KolmError(f"training exited with status {code} (see its output above); "
                        "run `kolm demo` again to resume from the last checkpoint")


def check_same_inputs(root: Path, inputs: list[str], vocab_size: int, steps: int) -> None:
    """A demo directory belongs to one corpus and one setting: reuse it for those, refuse others.

    Without this a second corpus would silently reuse the first corpus's tokenizer and model."""
    wanted = {"corpus": [str(Path(p).resolve()) for p in inputs], "vocab_size": vocab_size, "steps": steps}
    stamp = root / "demo.json"
    if stamp.is_file():
        made = json.loads(stamp.read_text(encoding="utf-8"))
        differ = [key for key in wanted if made.get(key) != wanted[key]]
        if differ:
            was = ", ".join(f"{key}={made.get(key)}" for key in differ)
            raise KolmError(f"{root} holds a demo made with {was}; pass --out DIR for a separate demo "
                            f"(or remove {root} to start over)")
        return
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp, wanted)


def default_out(corpus: list[str] | None) -> str:
    """./kolm-demo for the bundled corpus, ./kolm-demo-NAME for the user's own text."""
    return f"kolm-demo-{Path(corpus[0]).name.split('.')[0]}" if corpus else "kolm-demo"


def perplexities(run_dir: Path) -> tuple[float, float]:
    """Validation perplexity of the initial model and of the trained one, from metrics.jsonl."""
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r.get("kind") == "eval"]
    if not evals or evals[0]["step"] != 0:
        raise KolmError(f"{run_dir}/metrics.jsonl has no step-0 evaluation; remove {run_dir} and run again")
    return evals[0]["eval_perplexity"], evals[-1]["eval_perplexity"]


def run_demo(out: str | None, corpus: list[str] | None = None, vocab_size: int = 8000, steps: int = 300,
             max_new_tokens: int = 40) -> dict:
    """Run (or finish) every stage under ``out``; returns where things were written and the results."""
    import torch

    from kolm.cli.main import format_shard_summary, format_tokenizer_report
    from kolm.data.shard import ShardOptions, run_shard
    from kolm.data.tokenizer import train_tokenizer
    from kolm.export.convert import convert
    from kolm.export.generate import generate

    root = Path(out or default_out(corpus)).resolve()
    inputs = corpus or bundled_corpus_files()
    check_same_inputs(root, inputs, vocab_size, steps)
    tok_dir, shard_dir, run_dir, model_dir = root / "tokenizer", root / "shards", root / "run", root / "model"
    gpu = torch.cuda.is_available()
    started = time.perf_counter()

    _stage(f"1/5 tokenizer: byte-level BPE, vocabulary {vocab_size}, on {len(inputs)} files")
    if (tok_dir / "tokenizer.json").is_file():
        _note(f"reusing {tok_dir} (already trained)")
    else:
        _note(format_tokenizer_report(train_tokenizer(inputs, tok_dir, vocab_size)))

    _stage("2/5 shard: tokenize once into MMIDIDX shards")
    t0 = time.perf_counter()
    # The bundled corpus is small: hold out 5% so validation has text to score.
    manifest = run_shard(inputs, str(tok_dir), shard_dir, ShardOptions(valid_fraction=0.05))
    _note(format_shard_summary(str(shard_dir), manifest, time.perf_counter() - t0))

    _stage(f"3/5 train: phi-tiny, {steps} steps, DeepSpeed ZeRO-2")
    recipe_path = root / "recipe.yaml"
    recipe = demo_recipe(root, steps, gpu, train_processes(gpu)[0])
    recipe_path.write_text(yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False), encoding="utf-8")
    if _finished(run_dir, steps):
        _note(f"reusing {run_dir} (already trained {steps} steps)")
    else:
        run_training(recipe_path, gpu)
    before, after = perplexities(run_dir)

    _stage("4/5 convert: DeepSpeed checkpoint -> Hugging Face directory")
    if (model_dir / "kolm_export.json").is_file():
        _note(f"reusing {model_dir} (already converted)")
    else:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is left for the results
            report = convert(str(run_dir), str(model_dir), dtype="bf16" if gpu else "fp32")
        _note(f"wrote {model_dir}; logits match the checkpoint (max error {report['max_logit_error']:.2e})")

    _stage(f"5/5 generate: pipeline('text-generation') from {PROMPT!r}")
    with contextlib.redirect_stdout(sys.stderr):
        # The bundled texts are short lines: without a minimum the model often ends after a few words.
        text = generate(str(model_dir), [PROMPT], max_new_tokens=max_new_tokens,
                        min_new_tokens=max_new_tokens // 2)[0]

    result = {"tokenizer": str(tok_dir), "shards": str(shard_dir), "recipe": str(recipe_path),
              "run": str(run_dir), "model": str(model_dir), "perplexity_before": before,
              "perplexity_after": after, "generated": text}
    _stage(f"done in {time.perf_counter() - started:.0f} s")
    print(f"generated: {text}")
    print(f"validation perplexity: {before:,.1f} before training -> {after:,.1f} after")
    for key in ("tokenizer", "shards", "recipe", "run", "model"):
        print(f"{key:>10}: {result[key]}")
    print(f"next: kolm report {run_dir}    kolm generate {model_dir} \"{PROMPT}\"")
    return result
