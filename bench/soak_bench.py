"""Kill-anywhere soak, larger than the one in the test suite: train on 2 CPU ranks, SIGKILL the
run many times (while it starts, after random steps, while a checkpoint is being written, just
after a resume), restart it each time until it finishes, and compare its per-step losses and
final weights with an uninterrupted run. Appends the figures to bench/RESULTS.md ("Fault tolerance").

    .venv/bin/python bench/soak_bench.py                    # 30 kills, 200 steps of phi-tiny: ~12 min
    .venv/bin/python bench/soak_bench.py --kills 5 --steps 40 --no-record
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import ROOT, append_results, timestamp

sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from helpers.dist import run_ranks, write_recipe  # noqa: E402
from helpers.soak import STRATEGIES, SoakReport, soak  # noqa: E402

from kolm.data.corpus import bundled_corpus_files  # noqa: E402
from kolm.data.shard import ShardOptions, run_shard  # noqa: E402
from kolm.data.tokenizer import train_tokenizer  # noqa: E402
from kolm.train.checkpoint import complete_checkpoints, consolidated_state_dict  # noqa: E402
from kolm.train.metrics import read_metrics  # noqa: E402

HEADING = "## Fault tolerance"


@dataclass
class Outcome:
    report: SoakReport
    same_losses: bool
    same_weights: bool
    uninterrupted: float  # wall clock of the reference run, s
    soaked: float  # wall clock of the soak, s

    @property
    def ok(self) -> bool:
        return self.same_losses and self.same_weights


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    return p.parse_args()


def prepare(work: Path) -> tuple[Path, Path]:
    """A tokenizer and shards of the bundled corpus, under ``work``."""
    tok = work / "tokenizer"
    train_tokenizer(bundled_corpus_files(), tok, vocab_size=2000, progress=False)
    shards = work / "shards"
    run_shard(bundled_corpus_files(), str(tok), shards, ShardOptions(valid_fraction=0.05), workers=1, progress=False)
    return tok, shards


def steps_of(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["consumed_samples"], r["loss"]) for r in read_metrics(run_dir).train]


def final_weights(run_dir: Path) -> dict:
    return consolidated_state_dict(complete_checkpoints(run_dir / "checkpoints")[0])


def run_soak(work: Path, args: argparse.Namespace, seed: int) -> Outcome | None:
    """The uninterrupted reference run, then the killed-and-restarted one; None if the reference failed."""
    tok, shards = prepare(work)
    run = {"train_steps": args.steps, "save_every": args.save_every, "eval_every": max(1, args.steps // 4),
           "keep_checkpoints": 2}
    started = time.monotonic()
    ref = write_recipe(work / "ref.yaml", shards, tok, work / "ref", **run)
    codes, out = run_ranks(2, ref, log_dir=work / "ref-logs")
    if codes != [0, 0]:
        print(out[-3000:], file=sys.stderr)
        return None
    uninterrupted = time.monotonic() - started
    started = time.monotonic()
    recipe = write_recipe(work / "soak.yaml", shards, tok, work / "run", **run)
    report = soak(recipe, work / "run", work / "logs", args.steps, kills=args.kills, seed=seed)
    soaked = time.monotonic() - started
    final, reference = final_weights(work / "run"), final_weights(work / "ref")
    same_weights = final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    return Outcome(report, steps_of(work / "run") == steps_of(work / "ref"), same_weights, uninterrupted, soaked)


def format_report(o: Outcome, args: argparse.Namespace, seed: int) -> str:
    by = {s: sum(k["strategy"] == s for k in o.report.kills) for s in STRATEGIES}
    lines = [
        f"### {timestamp(utc=True)}",
        "",
        f"- command: `python bench/soak_bench.py --kills {args.kills} --steps {args.steps} --save-every "
        f"{args.save_every} --seed {seed}`",
        f"- run: phi-tiny, 2 CPU ranks (gloo), ZeRO-2 bf16, {args.steps} steps, a checkpoint every "
        f"{args.save_every} steps, keep 2",
        "",
        "| kills survived | while starting | after a random step | during a checkpoint write | just after a resume "
        "| starts | resumes checked | per-step losses | final weights | data lost |",
        "|--:|--:|--:|--:|--:|--:|--:|---|---|---|",
        f"| {len(o.report.kills)} | {by['startup']} | {by['random_step']} | {by['during_save']} | "
        f"{by['after_resume']} | {o.report.attempts} | {len(o.report.resumed_from)} | "
        f"{'identical' if o.same_losses else 'DIFFERENT'} | {'identical' if o.same_weights else 'DIFFERENT'} | "
        f"{'none' if o.ok else 'YES'} |",
        "",
        f"- wall clock: uninterrupted {o.uninterrupted:.0f} s, soak {o.soaked:.0f} s",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    work = Path(tempfile.mkdtemp(prefix="kolm-soak-"))
    print(f"soak: seed {seed}, work directory {work}", flush=True)
    outcome = run_soak(work, args, seed)
    if outcome is None:
        return 1
    text = format_report(outcome, args, seed)
    print(text)
    if not args.no_record:
        append_results(text, HEADING, "bench/soak_bench.py")
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
