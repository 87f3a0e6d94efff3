"""Kill-anywhere soak, larger than the one in the test suite: train on 2 CPU ranks, SIGKILL the
run many times (while it starts, after random steps, while a checkpoint is being written, just
after a resume), restart it each time until it finishes, and compare its per-step losses and
final weights with an uninterrupted run. Appends the figures to bench/RESULTS.md ("Fault tolerance").

    .venv/bin/python bench/soak_bench.py                    # 30 kills, 200 steps of phi-tiny: ~12 min
    .venv/bin/python bench/soak_bench.py --kills 5 --steps 40 --no-record
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
from dist import run_ranks, train_records, write_recipe  # noqa: E402
from soak import STRATEGIES, soak  # noqa: E402

from kolm.data.corpus import bundled_corpus_files  # noqa: E402
from kolm.data.shard import ShardOptions, run_shard  # noqa: E402
from kolm.data.tokenizer import train_tokenizer  # noqa: E402
from kolm.export.convert import consolidated_state_dict  # noqa: E402
from kolm.train.checkpoint import complete_checkpoints  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    work = Path(tempfile.mkdtemp(prefix="kolm-soak-"))
    print(f"soak: seed {seed}, work directory {work}", flush=True)
    tok = work / "tokenizer"
    train_tokenizer(bundled_corpus_files(), tok, vocab_size=2000, progress=False)
    shards = work / "shards"
    run_shard(bundled_corpus_files(), str(tok), shards, ShardOptions(valid_fraction=0.05), workers=1, progress=False)
    run = {"train_steps": args.steps, "save_every": args.save_every, "eval_every": max(1, args.steps // 4),
           "keep_checkpoints": 2}

    started = time.monotonic()
    ref = write_recipe(work / "ref.yaml", shards, tok, work / "ref", **run)
    codes, out = run_ranks(2, ref, log_dir=work / "ref-logs")
    if codes != [0, 0]:
        print(out[-3000:], file=sys.stderr)
        return 1
    uninterrupted = time.monotonic() - started

    started = time.monotonic()
    recipe = write_recipe(work / "soak.yaml", shards, tok, work / "run", **run)
    report = soak(recipe, work / "run", work / "logs", args.steps, kills=args.kills, seed=seed)
    soaked = time.monotonic() - started

    got = [(r["step"], r["consumed_samples"], r["loss"]) for r in train_records(work / "run")]
    want = [(r["step"], r["consumed_samples"], r["loss"]) for r in train_records(work / "ref")]
    final = consolidated_state_dict(complete_checkpoints(work / "run" / "checkpoints")[0])
    reference = consolidated_state_dict(complete_checkpoints(work / "ref" / "checkpoints")[0])
    same_losses = got == want
    same_weights = final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    by = {s: sum(k["strategy"] == s for k in report.kills) for s in STRATEGIES}
    lines = [
        f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `python bench/soak_bench.py --kills {args.kills} --steps {args.steps} --save-every "
        f"{args.save_every} --seed {seed}`",
        f"- run: phi-tiny, 2 CPU ranks (gloo), ZeRO-2 bf16, {args.steps} steps, a checkpoint every "
        f"{args.save_every} steps, keep 2",
        "",
        "| kills survived | while starting | after a random step | during a checkpoint write | just after a resume "
        "| starts | resumes checked | per-step losses | final weights | data lost |",
        "|--:|--:|--:|--:|--:|--:|--:|---|---|---|",
        f"| {len(report.kills)} | {by['startup']} | {by['random_step']} | {by['during_save']} | "
        f"{by['after_resume']} | {report.attempts} | {len(report.resumed_from)} | "
        f"{'identical' if same_losses else 'DIFFERENT'} | {'identical' if same_weights else 'DIFFERENT'} | "
        f"{'none' if same_losses and same_weights else 'YES'} |",
        "",
        f"- wall clock: uninterrupted {uninterrupted:.0f} s, soak {soaked:.0f} s",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        results = REPO / "bench" / "RESULTS.md"
        body = results.read_text(encoding="utf-8")
        heading = "## Fault tolerance"
        if heading not in body:
            body = body.rstrip("\n") + f"\n\n{heading}\n\nWritten by `bench/soak_bench.py`; newest last.\n\n"
        results.write_text(body.rstrip("\n") + "\n\n" + text, encoding="utf-8")
    return 0 if same_losses and same_weights else 1


if __name__ == "__main__":
    sys.exit(main())
