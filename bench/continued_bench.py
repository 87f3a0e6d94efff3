"""Continued pretraining on Korean, three ways, for the same number of steps: from scratch with a
Korean tokenizer, continued from an English base model with its own tokenizer, and continued after
`kolm tokenizer extend` + `kolm model expand`. Reports characters per token and validation loss,
per token and per character (the comparable figure across tokenizers).

The English base stands in for a downloaded Phi: a byte-level BPE trained on English text only (the
standard library's docstrings, as the tests' stand-in tokenizer), and a small Phi pretrained on that
text with `kolm train`. Every run is `kolm train` on 2 local ranks (torchrun), fp32, same shape.

    .venv/bin/python bench/continued_bench.py                      # ~15 min on 2 cores
    .venv/bin/python bench/continued_bench.py --steps 60 --no-record   # quick check
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import common
import yaml

sys.path.insert(0, str(common.ROOT / "tests"))

from helpers.phi_source import english_documents, make_base_tokenizer  # noqa: E402

from kolm.train.metrics import read_metrics  # noqa: E402

HEADING = "## Continued pretraining"
SHAPE = {"model": "phi-10m", "model_overrides": {"num_hidden_layers": 4}}
TRAIN = {"seq_len": 128, "global_batch": 16, "micro_batch": 8, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 20,
         "zero_stage": 2, "precision": "fp32", "eval_samples": 0, "log_every": 10, "keep_checkpoints": 1,
         "tensorboard": False}


@dataclass
class Outcome:
    name: str
    tokenizer: Path
    eval_loss: float
    chars_per_token: float
    wall: float

    @property
    def nats_per_char(self) -> float:
        return self.eval_loss / self.chars_per_token


def train(name: str, steps: int, **keys) -> tuple[Path, float]:
    """`kolm train` on 2 ranks into bench/out/continued/NAME (fresh); (run dir, wall seconds)."""
    import shutil

    run_dir = common.OUT / "continued" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = run_dir.with_suffix(".yaml")
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump({**TRAIN, "run_dir": str(run_dir), "train_steps": steps, "eval_every": steps,
                                      "save_every": steps, **keys}), encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kolm",
           "train", "--config", str(recipe)]
    timed = common.run_timed(cmd, common.bench_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"),
                             log=run_dir.with_suffix(".log"))
    return run_dir, timed.wall


def final_eval(run_dir: Path) -> float:
    return read_metrics(run_dir).evals[-1]["eval_loss"]


def chars_per_token(tokenizer: Path, texts: list[str]) -> float:
    """Characters per token on held-out text, counting the EOS each document ends with, as shards do."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    tokens = sum(len(e.ids) + 1 for e in tok.encode_batch(texts, add_special_tokens=False))
    return sum(len(t) for t in texts) / tokens


def english_base(args: argparse.Namespace) -> tuple[Path, Path]:
    """(tokenizer, Hugging Face model) of the English base, pretrained once and cached."""
    root = common.OUT / "continued-base"
    tok, model = root / "tokenizer", root / f"model-{args.base_steps}"
    if (model / "config.json").is_file():
        return tok, model
    if not (tok / "tokenizer.json").is_file():
        make_base_tokenizer(tok, args.base_vocab)
    text = root / "english.txt"
    text.write_text("\n".join(" ".join(d.split()) for d in english_documents()) + "\n", encoding="utf-8")
    shards = common.ensure_shards(text, tok, 0.02)
    run_dir, _ = train("english-base", args.base_steps, data=str(shards), tokenizer=str(tok), **SHAPE)
    common.run_quiet(common.kolm_cmd("convert", str(run_dir), "--out", str(model), "--dtype", "fp32", "--force"),
                     "exporting the English base")
    return tok, model


def extended_base(args: argparse.Namespace, corpus: Path, tok: Path, model: Path) -> tuple[Path, Path]:
    """(extended tokenizer, expanded model) for the Korean corpus."""
    root = common.OUT / "continued-ext"
    ext, grown = root / f"tokenizer-{args.add}", root / f"model-{args.add}-{args.base_steps}"
    if not (ext / "tokenizer.json").is_file():
        common.run_quiet(common.kolm_cmd("tokenizer", "extend", "--base", str(tok), "--input", str(corpus), "--add",
                                         str(args.add), "--out", str(ext), "--force"), "extending the tokenizer")
    common.run_quiet(common.kolm_cmd("model", "expand", "--model", str(model), "--tokenizer", str(ext), "--out",
                                     str(grown), "--force"), "expanding the model")
    return ext, grown


def run_all(args: argparse.Namespace) -> list[Outcome]:
    corpus = common.prepare_corpus(args.corpus, args.lines)
    held_out = common.read_lines(common.prepare_corpus(args.corpus, args.lines + 3000))[-3000:]
    base_tok, base_model = english_base(args)
    ext_tok, grown = extended_base(args, corpus, base_tok, base_model)
    vocab = json.loads((ext_tok / "tokenizer.json").read_text(encoding="utf-8"))
    scratch_tok = common.ensure_tokenizer(corpus, len(vocab["model"]["vocab"]) + len(vocab["added_tokens"]))
    runs = [("from scratch (Korean tokenizer)", scratch_tok, {**SHAPE}),
            ("continued, base tokenizer", base_tok, {"init_from": str(base_model)}),
            ("continued, extended tokenizer", ext_tok, {"init_from": str(grown)})]
    outcomes = []
    for name, tok, keys in runs:
        shards = common.ensure_shards(corpus, tok, 0.02)
        run_dir, wall = train(name.split(",")[0].split()[0] + "-" + tok.name, args.steps, data=str(shards),
                              tokenizer=str(tok), **keys)
        outcomes.append(Outcome(name, tok, final_eval(run_dir), chars_per_token(tok, held_out), wall))
    return outcomes


def report(outcomes: list[Outcome], args: argparse.Namespace) -> str:
    lines = [f"### {common.timestamp()}: {args.steps} steps of {TRAIN['global_batch']} x {TRAIN['seq_len']} tokens "
             f"on the first {args.lines:,} lines of `{args.corpus.name}`",
             "", f"`{common.command_line('.venv/bin/python', 'bench/continued_bench.py', None)}`; {common.cpu_model()}"
             f", {common.uptime()}, revision {common.git_revision()}. English base: {args.base_steps} steps on "
             f"standard-library docstrings, {args.base_vocab}-token English BPE; extension adds {args.add} tokens.",
             "", "| run | chars/token | eval loss per token | nats per character | wall s |", "|---|--:|--:|--:|--:|"]
    for o in outcomes:
        lines.append(f"| {o.name} | {o.chars_per_token:.3f} | {o.eval_loss:.4f} | {o.nats_per_char:.4f} | "
                     f"{o.wall:.0f} |")
    lines += ["", "Nats per character = eval loss / characters per token (held-out lines after the training "
              "text, EOS counted): the figure that compares models whose tokenizers differ."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=common.DEFAULT_CORPUS)
    p.add_argument("--lines", type=int, default=60000, help="Korean lines to train on")
    p.add_argument("--steps", type=int, default=300, help="steps of each Korean run")
    p.add_argument("--base-steps", type=int, default=400, help="steps of the English base")
    p.add_argument("--base-vocab", type=int, default=2000, help="the English tokenizer's size")
    p.add_argument("--add", type=int, default=4000, help="Korean tokens the extension adds")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args(argv)
    if not args.corpus.is_file():
        common.die(f"{args.corpus}: no such corpus (pass --corpus PATH, any Korean text file)")
    common.publish(report(run_all(args), args), HEADING, "bench/continued_bench.py", not args.no_record)


if __name__ == "__main__":
    main()
