"""`kolm demo`: the whole line on the bundled Korean corpus, reusing whatever is already done.

tokenizer -> shards -> a small Phi trained with DeepSpeed on 2 local processes (CPU) or every
GPU -> Hugging Face directory -> generated Korean text, with validation perplexity before and
after training. Progress goes to stderr; the results to stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from kolm.data.corpus import bundled_corpus_files
from kolm.errors import KolmError
from kolm.export.generate import SEED_PROMPT, GenerationSettings
from kolm.files import atomic_write_json
from kolm.log import say


@dataclass
class DemoOptions:
    """Every default of `kolm demo`."""

    out: str | None = None  # None: ./kolm-demo, or ./kolm-demo-NAME with a corpus of the user's
    corpus: list[str] | None = None  # None: the bundled Korean texts
    vocab_size: int = 8000
    steps: int = 300
    max_new_tokens: int = 40

    @property
    def root(self) -> Path:
        default = f"kolm-demo-{Path(self.corpus[0]).name.split('.')[0]}" if self.corpus else "kolm-demo"
        return Path(self.out or default).resolve()


@dataclass
class DemoResult:
    root: Path
    generated: str
    perplexity_before: float
    perplexity_after: float

    def path(self, key: str) -> Path:
        return self.root / ("recipe.yaml" if key == "recipe" else key)

    def __str__(self) -> str:
        lines = [f"generated: {self.generated}",
                 f"validation perplexity: {self.perplexity_before:,.1f} before training -> "
                 f"{self.perplexity_after:,.1f} after"]
        lines += [f"{key:>10}: {self.path(key)}" for key in ("tokenizer", "shards", "recipe", "run", "model")]
        lines.append(f"next: kolm report {self.path('run')}    kolm generate {self.path('model')} \"{SEED_PROMPT}\"")
        return "\n".join(lines)


def _stage(name: str) -> None:
    say(f"== {name}")


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
    say(f"{n} {'GPU' if gpu else 'CPU'} processes: torchrun --standalone --nproc-per-node {n} "
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


def perplexities(run_dir: Path) -> tuple[float, float]:
    """Validation perplexity of the initial model and of the trained one, from metrics.jsonl."""
    from kolm.train.metrics import read_metrics

    evals = read_metrics(run_dir).evals
    if not evals or evals[0]["step"] != 0:
        raise KolmError(f"{run_dir}/metrics.jsonl has no step-0 evaluation; remove {run_dir} and run again")
    return evals[0]["eval_perplexity"], evals[-1]["eval_perplexity"]


def _tokenizer_stage(opts: DemoOptions, inputs: list[str]) -> None:
    from kolm.data.tokenizer import train_tokenizer

    tok_dir = opts.root / "tokenizer"
    _stage(f"1/5 tokenizer: byte-level BPE, vocabulary {opts.vocab_size}, on {len(inputs)} files")
    if (tok_dir / "tokenizer.json").is_file():
        say(f"reusing {tok_dir} (already trained)")
    else:
        say(str(train_tokenizer(inputs, tok_dir, opts.vocab_size)))


def _shard_stage(opts: DemoOptions, inputs: list[str]) -> None:
    from kolm.data.manifest import ShardSummary
    from kolm.data.shard import ShardOptions, run_shard

    _stage("2/5 shard: tokenize once into MMIDIDX shards")
    started = time.perf_counter()
    # The bundled corpus is small: hold out 5% so validation has text to score.
    shard_dir = opts.root / "shards"
    manifest = run_shard(inputs, str(opts.root / "tokenizer"), shard_dir, ShardOptions(valid_fraction=0.05))
    say(str(ShardSummary(str(shard_dir), manifest, time.perf_counter() - started)))


def _train_stage(opts: DemoOptions, gpu: bool) -> tuple[float, float]:
    from kolm.train.checkpoint import complete_checkpoints

    _stage(f"3/5 train: phi-tiny, {opts.steps} steps, DeepSpeed ZeRO-2")
    recipe_path, run_dir = opts.root / "recipe.yaml", opts.root / "run"
    recipe = demo_recipe(opts.root, opts.steps, gpu, train_processes(gpu)[0])
    recipe_path.write_text(yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False), encoding="utf-8")
    done = complete_checkpoints(run_dir / "checkpoints")
    if done and done[0].step >= opts.steps:
        say(f"reusing {run_dir} (already trained {opts.steps} steps)")
    else:
        run_training(recipe_path, gpu)
    return perplexities(run_dir)


def _convert_stage(opts: DemoOptions, gpu: bool) -> None:
    from kolm.export.convert import convert

    _stage("4/5 convert: DeepSpeed checkpoint -> Hugging Face directory")
    model_dir = opts.root / "model"
    if (model_dir / "kolm_export.json").is_file():
        say(f"reusing {model_dir} (already converted)")
        return
    report = convert(str(opts.root / "run"), str(model_dir), dtype="bf16" if gpu else "fp32")
    say(f"wrote {model_dir}; logits match the checkpoint (max error {report.max_logit_error:.2e})")


def _generate_stage(opts: DemoOptions) -> str:
    from kolm.export.generate import generate

    _stage(f"5/5 generate: pipeline('text-generation') from {SEED_PROMPT!r}")
    # The bundled texts are short lines: without a minimum the model often ends after a few words.
    settings = GenerationSettings(max_new_tokens=opts.max_new_tokens, min_new_tokens=opts.max_new_tokens // 2)
    return generate(str(opts.root / "model"), [SEED_PROMPT], settings)[0]


def run_demo(opts: DemoOptions) -> DemoResult:
    """Run (or finish) every stage under ``opts.root``."""
    import torch

    inputs = opts.corpus or bundled_corpus_files()
    check_same_inputs(opts.root, inputs, opts.vocab_size, opts.steps)
    gpu = torch.cuda.is_available()
    started = time.perf_counter()
    _tokenizer_stage(opts, inputs)
    _shard_stage(opts, inputs)
    before, after = _train_stage(opts, gpu)
    _convert_stage(opts, gpu)
    text = _generate_stage(opts)
    _stage(f"done in {time.perf_counter() - started:.0f} s")
    return DemoResult(opts.root, text, before, after)
