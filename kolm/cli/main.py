"""The `kolm` command line: parses arguments and calls into the library, nothing more."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time

from kolm.errors import KolmError

SHARD_TOOLS = ("verify", "stats", "merge")


def _size(text: str) -> int:
    """Parse sizes like 512M, 2G, 65536."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().rstrip("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 65536, 512M, 2G)") from e


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="corpus files, directories or globs (.txt, .txt.gz, .jsonl, .jsonl.gz, .parquet, .arrow)")
    p.add_argument("--text-field", default="text", help="JSON/parquet field holding the text (default: text)")
    p.add_argument("--skip-malformed", action="store_true",
                   help="skip and count malformed JSON lines instead of stopping")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kolm", description="Korean Phi pretraining kit")
    # The `deepspeed` launcher passes --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tool", required=True)
    train = tok.add_parser("train", help="train a byte-level BPE tokenizer from a corpus")
    _add_corpus_args(train)
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="output tokenizer directory")
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--max-documents", type=int, default=None, help="train on the first N documents only")
    train.add_argument("--force", action="store_true", help="replace an existing output directory")

    shard = sub.add_parser(
        "shard",
        help="tokenize a corpus into MMIDIDX shards (also: kolm shard verify|stats|merge DIR)",
    )
    _add_corpus_args(shard)
    shard.add_argument("--tokenizer", required=True, help="tokenizer directory")
    shard.add_argument("--out", required=True, help="output shard directory")
    shard.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    shard.add_argument("--valid-fraction", type=float, default=None, help="held-out share (default 0.001)")
    shard.add_argument("--max-shard-tokens", type=_size, default=None, help="tokens per shard at most (about)")
    shard.add_argument("--unit-bytes", type=_size, default=None, help="input bytes per work unit")
    shard.add_argument("--num-tasks", type=int, default=None, help="array tasks (default: SLURM_ARRAY_TASK_COUNT or 1)")
    shard.add_argument("--task-index", type=int, default=None, help="this task (default: from SLURM_ARRAY_TASK_ID)")
    shard.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    shard.add_argument("--checkpoint-seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    shard.add_argument("--chunk-docs", type=int, default=None, help=argparse.SUPPRESS)
    shard.add_argument("--piece-bytes", type=_size, default=None, help=argparse.SUPPRESS)
    shard.add_argument("--no-progress", action="store_true", help="no progress bar")

    train = sub.add_parser("train", help="train a Phi model with DeepSpeed (under any launcher)")
    train.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys")
    train.add_argument("--check", action="store_true", help="validate the config and data, then exit")

    conv = sub.add_parser("convert", help="a checkpoint to a Hugging Face model directory (verified)")
    conv.add_argument("src", help="run directory, checkpoints directory or one global_stepN directory")
    conv.add_argument("--out", required=True, help="output model directory")
    conv.add_argument("--tag", default=None, help="checkpoint tag (default: newest complete)")
    conv.add_argument("--best", action="store_true", help="the checkpoint with the best eval loss")
    conv.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    conv.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one the run used)")
    conv.add_argument("--max-shard-size", default="2GB", help="split model.safetensors above this size")
    conv.add_argument("--force", action="store_true", help="replace an existing output directory")

    gen = sub.add_parser("generate", help="continue Korean prompts with a converted model")
    gen.add_argument("model", help="Hugging Face model directory (from kolm convert)")
    gen.add_argument("prompts", nargs="*", help="prompts")
    gen.add_argument("--prompts-file", default=None, help="one prompt per line")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--repetition-penalty", type=float, default=2.0)
    gen.add_argument("--greedy", action="store_true", help="no sampling")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)

    ev = sub.add_parser("eval", help="loss, perplexity and next-token accuracy on a shard split")
    ev.add_argument("model", help="Hugging Face model directory, run directory or checkpoint directory")
    ev.add_argument("--data", required=True, help="shard directory")
    ev.add_argument("--split", default="valid", choices=("train", "valid"))
    ev.add_argument("--seq-len", type=int, default=None, help="default: the training seq_len, else 512")
    ev.add_argument("--micro-batch", type=int, default=8)
    ev.add_argument("--max-samples", type=int, default=None)
    ev.add_argument("--tag", default=None, help="checkpoint tag when MODEL is a run directory")

    report = sub.add_parser("report", help="plots and a summary of a run's metrics")
    report.add_argument("run_dir", help="run directory (holds metrics.jsonl)")
    report.add_argument("--out", default=None, help="where the PNGs and summary.txt go (default: RUN_DIR/report)")

    plan = sub.add_parser("plan", help="memory per GPU, layout and training time for a cluster shape")
    plan.add_argument("--model", default="phi-1.5", help="preset (default phi-1.5)")
    plan.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary (default: the preset's)")
    plan.add_argument("--seq-len", type=int, default=512)
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--gpu", default="a100-80", choices=("a100-40", "a100-80", "h100", "h200"))
    plan.add_argument("--global-batch", type=int, default=256)
    plan.add_argument("--tokens", type=float, default=None, help="tokens per epoch (e.g. 3e9)")
    plan.add_argument("--lines", type=float, default=None, help="corpus lines per epoch, instead of --tokens")
    plan.add_argument("--tokens-per-line", type=float, default=30.0, help="with --lines (default 30)")
    plan.add_argument("--epochs", type=float, default=1.0)
    plan.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilization (default 0.40)")
    plan.add_argument("--measure", action="store_true",
                      help="check the estimate against a real DeepSpeed engine on this machine (small presets)")
    plan.add_argument("--micro-batch", type=int, default=2, help="with --measure")
    plan.add_argument("--zero-stage", type=int, default=2, choices=(1, 2, 3), help="with --measure")
    plan.add_argument("--activation-checkpointing", action="store_true", help="with --measure")

    demo = sub.add_parser("demo", help="run the whole line on the bundled Korean corpus")
    demo.add_argument("--corpus", nargs="+", default=None, help="your own corpus instead of the bundled one")
    demo.add_argument("--out", default=None,
                      help="where everything is written (default: ./kolm-demo, or ./kolm-demo-NAME with --corpus)")
    demo.add_argument("--vocab-size", type=int, default=8000)
    demo.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    demo.add_argument("--max-new-tokens", type=int, default=40)
    return parser


def build_shard_tool_parser(tool: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"kolm shard {tool}")
    p.add_argument("dir", help="shard directory")
    if tool == "verify":
        p.add_argument("--tokenizer", default=None, help="also check the shards match this tokenizer")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(argv) >= 2 and argv[0] == "shard" and argv[1] in SHARD_TOOLS:
            return _shard_tool(argv[1], build_shard_tool_parser(argv[1]).parse_args(argv[2:]))
        args = build_parser().parse_args(argv)
        if args.command == "tokenizer":
            return _tokenizer_train(args)
        if args.command == "shard":
            return _shard(args)
        if args.command == "train":
            return _train(args)
        if args.command in ("convert", "generate", "eval"):
            return _inference(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "report":
            from kolm.cli.report import write_report

            text, paths = write_report(args.run_dir, args.out)
            print(text)
            print("plots: " + ", ".join(map(str, paths)))
            return 0
        if args.command == "demo":
            from kolm.cli.demo import run_demo

            run_demo(args.out, corpus=args.corpus, vocab_size=args.vocab_size, steps=args.steps,
                     max_new_tokens=args.max_new_tokens)
            return 0
    except KolmError as e:
        print(f"kolm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"kolm: error: no space left on the device writing {e.filename or 'a file'}; free space and re-run "
              "the same command (finished shards and complete checkpoints are untouched; it resumes)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kolm: interrupted; re-run the same command to continue", file=sys.stderr)
        return 130
    return 1


def _plan(args: argparse.Namespace) -> int:
    from kolm.model.presets import get_shape
    from kolm.train import plan

    shape = get_shape(args.model)
    vocab = plan.resolve_vocab(args.vocab_size, shape)
    for name in ("seq_len", "nodes", "gpus_per_node", "global_batch", "micro_batch"):
        if getattr(args, name) < 1:
            raise KolmError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.seq_len > shape.max_position_embeddings:
        raise KolmError(f"--seq-len {args.seq_len} exceeds {args.model}'s {shape.max_position_embeddings} positions")
    plan.check_mfu(args.mfu)
    if args.measure:
        print(plan.format_measurement(args.model, vocab, args.seq_len, args.micro_batch, args.zero_stage,
                                      args.activation_checkpointing))
        return 0
    tokens = plan.tokens_for(args.tokens, args.lines, args.tokens_per_line, args.epochs)
    print(plan.format_plan(args.model, shape, vocab, args.seq_len, args.nodes, args.gpus_per_node, args.gpu,
                           args.global_batch, tokens, args.mfu))
    return 0


def _train(args: argparse.Namespace) -> int:
    from kolm.train.signals import GracefulStop

    stop = GracefulStop()  # before the slow imports, so an early USR1/TERM cannot kill the run
    from kolm.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    from kolm.train.loop import prepare, train

    if args.check:
        plan = prepare(cfg)
        print(f"config OK: {plan.total_steps} steps, gradient accumulation {plan.grad_accum} on "
              f"{plan.env.world_size} ranks, {plan.n_params / 1e6:.1f}M parameters")
        return 0
    return train(cfg, stop)


def _inference(args: argparse.Namespace) -> int:
    if args.command == "convert":
        from kolm.export.convert import convert

        r = convert(args.src, args.out, tag=args.tag, best=args.best, dtype=args.dtype, tokenizer=args.tokenizer,
                    force=args.force, max_shard_size=args.max_shard_size)
        print(f"model written to {r['out']} from {r['checkpoint']} ({r['dtype']}); verified: max logit "
              f"difference {r['max_logit_error']:.2e} against the consolidated fp32 weights")
        return 0
    if args.command == "generate":
        from kolm.export.generate import generate, load_prompts

        texts = generate(args.model, load_prompts(args.prompts, args.prompts_file), args.max_new_tokens,
                         args.repetition_penalty, not args.greedy, args.temperature, args.top_p, args.seed)
        for text in texts:
            print(text)
            print("---")
        return 0
    from kolm.export.evaluate import evaluate_model

    r = evaluate_model(args.model, args.data, args.split, args.seq_len, args.micro_batch, args.max_samples, args.tag)
    print(f"{r['split']}: loss {r['eval_loss']:.4f}, perplexity {r['eval_perplexity']:.3f}, "
          f"next-token accuracy {r['eval_accuracy']:.4f} over {r['eval_tokens']} tokens "
          f"({r['windows']} windows of {r['seq_len']})")
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from kolm.data.tokenizer import train_tokenizer

    report = train_tokenizer(
        args.input, args.out, args.vocab_size, min_frequency=args.min_frequency,
        text_field=args.text_field, skip_malformed=args.skip_malformed,
        max_documents=args.max_documents, force=args.force, progress=sys.stderr.isatty(),
    )
    print(format_tokenizer_report(report))
    return 0


def format_tokenizer_report(r: dict) -> str:
    sample = "training text (corpus too small to hold any back)" if r["heldout_is_training_text"] else (
        f"{r['heldout_documents']} held-back documents"
    )
    return (
        f"tokenizer written to {r['out']}: vocabulary {r['vocab_size']}, trained on {r['documents']} documents\n"
        f"compression: {r['chars_per_token']:.3f} characters per token on {sample}"
    )


def _shard(args: argparse.Namespace) -> int:
    from kolm.data.shard import ShardOptions, default_task, run_shard

    num_tasks, task_index = default_task()
    # Defaults live in ShardOptions; the command line only overrides what it was given.
    given = {name: getattr(args, name) for name in ("valid_fraction", "max_shard_tokens", "unit_bytes", "chunk_docs",
                                                    "piece_bytes") if getattr(args, name) is not None}
    options = ShardOptions(text_field=args.text_field, skip_malformed=args.skip_malformed, **given)
    start = time.perf_counter()
    manifest = run_shard(
        args.input, args.tokenizer, args.out, options, workers=args.workers,
        num_tasks=args.num_tasks if args.num_tasks is not None else num_tasks,
        task_index=args.task_index if args.task_index is not None else task_index,
        overwrite=args.overwrite, progress=not args.no_progress,
        checkpoint_seconds=args.checkpoint_seconds,
    )
    if manifest is not None:
        print(format_shard_summary(args.out, manifest, time.perf_counter() - start))
    return 0


def format_shard_summary(out: str, m: dict, seconds: float) -> str:
    c = m["corpus"]
    lines = [
        f"shards written to {out}: {len(m['shards'])} shards, {c['documents']} documents, "
        f"{c['tokens']} tokens, {c['characters']} characters "
        f"({c['characters'] / max(c['tokens'], 1):.3f} chars/token) in {seconds:.1f}s"
    ]
    for split, s in m["splits"].items():
        lines.append(f"  {split}: {s['documents']} documents, {s['tokens']} tokens in {s['shards']} shards")
    lines.append(
        f"  skipped {c['skipped_empty']} empty lines, repaired {c['repaired_utf8']} lines with invalid UTF-8, "
        f"{c['long_documents']} long documents streamed in pieces, {c['malformed_skipped']} malformed skipped"
    )
    if m["splits"]["valid"]["documents"] == 0:
        lines.append("  warning: the validation split is empty; raise --valid-fraction for evaluation")
    return "\n".join(lines)


def _shard_tool(tool: str, args: argparse.Namespace) -> int:
    from kolm.data import manifest

    if tool == "stats":
        print(manifest.stats_table(args.dir))
        return 0
    if tool == "merge":
        from kolm.data.shard import finalize

        m = finalize(args.dir)
        print(format_shard_summary(args.dir, m, 0.0))
        return 0
    fingerprint = None
    if args.tokenizer:
        from kolm.data.tokenizer import load_tokenizer_info

        fingerprint = load_tokenizer_info(args.tokenizer).fingerprint()
    problems = manifest.verify(args.dir, fingerprint)
    if problems:
        for p in problems:
            print(f"BAD {p}", file=sys.stderr)
        print(f"kolm: error: {len(problems)} problems in {args.dir}; re-run `kolm shard --overwrite` "
              "to rebuild the damaged shards", file=sys.stderr)
        return 1
    sd = manifest.load_shard_dir(args.dir)
    print(f"OK {args.dir}: {len(sd.manifest['shards'])} shards verified")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())
