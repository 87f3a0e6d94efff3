"""The `kolm` command line: parses arguments and calls into the library, nothing more.

Each subcommand registers its parser and the function that runs it (``set_defaults(func=...)``);
defaults come from the library's option dataclasses, so each lives in one place. Results go to
stdout; messages go to stderr through kolm.log.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
import time
from typing import TextIO

from kolm.errors import KolmError

# Where results go while a command runs: stdout as the command found it. During the command itself
# sys.stdout points at stderr, so that nothing a library prints (DeepSpeed's logger binds stdout
# when it is imported) can mix with the results.
_results: list[TextIO] = []


def emit(*parts: object) -> None:
    """Print a command's result (on stdout)."""
    print(*parts, file=_results[-1] if _results else sys.stdout, flush=True)


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


def _add_corpus_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--input", nargs="+", required=required, metavar="PATH",
                   help="corpus files, directories or globs (.txt, .txt.gz, .jsonl, .jsonl.gz, .parquet, .arrow)")
    p.add_argument("--text-field", default="text", help="JSON/parquet field holding the text (default: text)")
    p.add_argument("--skip-malformed", action="store_true",
                   help="skip and count malformed JSON lines instead of stopping")


def _add_documents_arg(p: argparse.ArgumentParser) -> None:
    from kolm.data.corpus import DOCUMENTS

    p.add_argument("--documents", choices=DOCUMENTS, default=DOCUMENTS[0],
                   help="how .txt/.txt.gz input holds documents: one per line (default), paragraphs separated "
                        "by blank lines, or one per file; JSONL lines and parquet/arrow rows are always one each")


# --------------------------------------------------------------------------- kolm tokenizer train


def _add_tokenizer(sub) -> None:
    tools = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tool", required=True)
    p = tools.add_parser("train", help="train a byte-level BPE tokenizer from a corpus")
    _add_corpus_args(p)
    _add_documents_arg(p)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="output tokenizer directory")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--max-documents", type=int, default=None, help="train on the first N documents only")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_tokenizer_train)
    p = tools.add_parser("extend", help="add Korean tokens to an existing byte-level BPE (Phi's); old ids kept")
    _add_corpus_args(p)
    _add_documents_arg(p)
    p.add_argument("--base", required=True, help="tokenizer directory, or a model directory holding tokenizer.json")
    p.add_argument("--add", type=int, required=True, help="new tokens to learn (at most)")
    p.add_argument("--out", required=True, help="output tokenizer directory")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--max-documents", type=int, default=None, help="learn from the first N documents only")
    p.add_argument("--non-korean", nargs="+", default=None, metavar="PATH",
                   help="text whose encoding must not change (default: the non-Hangul runs of held-back input)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_tokenizer_extend)


def _tokenizer_extend(args: argparse.Namespace) -> int:
    from kolm.data.tokenizer_extend import extend_tokenizer

    emit(extend_tokenizer(args.base, args.input, args.add, args.out, text_field=args.text_field,
                          skip_malformed=args.skip_malformed, max_documents=args.max_documents,
                          min_frequency=args.min_frequency, non_korean=args.non_korean, force=args.force,
                          progress=sys.stderr.isatty(), documents=args.documents))
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from kolm.data.tokenizer import train_tokenizer

    emit(train_tokenizer(args.input, args.out, args.vocab_size, min_frequency=args.min_frequency,
                          text_field=args.text_field, skip_malformed=args.skip_malformed,
                          max_documents=args.max_documents, force=args.force, progress=sys.stderr.isatty(),
                          documents=args.documents))
    return 0


# --------------------------------------------------------------------------- kolm shard [verify|stats|merge]


def _add_shard(sub) -> None:
    p = sub.add_parser("shard", help="tokenize a corpus into MMIDIDX shards (also: kolm shard verify|stats|merge DIR)")
    _add_corpus_args(p, required=False)
    _add_documents_arg(p)
    p.add_argument("--tokenizer", help="tokenizer directory")
    p.add_argument("--out", help="output shard directory")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--valid-fraction", type=float, default=None, help="held-out share (default 0.001)")
    p.add_argument("--max-shard-tokens", type=_size, default=None, help="tokens per shard at most (about)")
    p.add_argument("--unit-bytes", type=_size, default=None, help="input bytes per work unit")
    p.add_argument("--num-tasks", type=int, default=None, help="array tasks (default: SLURM_ARRAY_TASK_COUNT or 1)")
    p.add_argument("--task-index", type=int, default=None, help="this task (default: from SLURM_ARRAY_TASK_ID)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --out holds from other inputs, another tokenizer or other options; work of "
                        "this same command is kept: finished units stay, damaged ones are rebuilt. In an array job "
                        "only task 0 replaces; the other tasks wait for it")
    p.add_argument("--checkpoint-seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    p.add_argument("--chunk-docs", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--piece-bytes", type=_size, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_shard, parser=p)
    tools = p.add_subparsers(dest="tool", metavar="{verify,stats,merge}")
    verify = tools.add_parser("verify", help="check every shard against the manifest")
    verify.add_argument("dir", help="shard directory")
    verify.add_argument("--tokenizer", default=None, dest="verify_tokenizer",
                        help="also check the shards match this tokenizer")
    verify.set_defaults(func=_shard_verify)
    stats = tools.add_parser("stats", help="documents, tokens and characters per split")
    stats.add_argument("dir", help="shard directory")
    stats.set_defaults(func=_shard_stats)
    merge = tools.add_parser("merge", help="write the manifest after a Slurm array's tasks finished")
    merge.add_argument("dir", help="shard directory")
    merge.set_defaults(func=_shard_merge)


def _shard(args: argparse.Namespace) -> int:
    from kolm.data.jobs import array_task
    from kolm.data.manifest import ShardSummary
    from kolm.data.shard import ShardOptions, run_shard

    missing = [f"--{name}" for name in ("input", "tokenizer", "out") if not getattr(args, name)]
    if missing:
        args.parser.error(f"the following arguments are required: {', '.join(missing)}")
    num_tasks, task_index = array_task(args.num_tasks, args.task_index)
    # Defaults live in ShardOptions; the command line only overrides what it was given.
    given = {name: getattr(args, name) for name in ("valid_fraction", "max_shard_tokens", "unit_bytes", "chunk_docs",
                                                    "piece_bytes") if getattr(args, name) is not None}
    options = ShardOptions(text_field=args.text_field, skip_malformed=args.skip_malformed, documents=args.documents,
                           **given)
    start = time.perf_counter()
    manifest = run_shard(
        args.input, args.tokenizer, args.out, options, workers=args.workers,
        num_tasks=num_tasks, task_index=task_index, overwrite=args.overwrite, progress=not args.no_progress,
        checkpoint_seconds=args.checkpoint_seconds,
    )
    if manifest is not None:
        emit(ShardSummary(args.out, manifest, time.perf_counter() - start))
    return 0


def _shard_verify(args: argparse.Namespace) -> int:
    from kolm.data import manifest
    from kolm.data.tokenizer import load_tokenizer_info

    fingerprint = load_tokenizer_info(args.verify_tokenizer).fingerprint() if args.verify_tokenizer else None
    problems = manifest.verify(args.dir, fingerprint)
    if problems:
        for p in problems:
            print(f"BAD {p}", file=sys.stderr)
        raise KolmError(f"{len(problems)} problems in {args.dir}; re-run `kolm shard --overwrite` to rebuild the "
                        "damaged shards", exit_code=1)
    emit(f"OK {args.dir}: {len(manifest.load_shard_dir(args.dir).manifest['shards'])} shards verified")
    return 0


def _shard_stats(args: argparse.Namespace) -> int:
    from kolm.data.manifest import stats_table

    emit(stats_table(args.dir))
    return 0


def _shard_merge(args: argparse.Namespace) -> int:
    from kolm.data.manifest import ShardSummary
    from kolm.data.shard import finalize

    emit(ShardSummary(args.dir, finalize(args.dir)))
    return 0


# --------------------------------------------------------------------------- kolm model expand


def _add_model(sub) -> None:
    tools = sub.add_parser("model", help="model tools").add_subparsers(dest="tool", required=True)
    p = tools.add_parser("expand", help="grow a Phi model's embedding rows for an extended tokenizer (verified)")
    p.add_argument("--model", required=True, help="Hugging Face PhiForCausalLM directory")
    p.add_argument("--tokenizer", required=True, help="the extended tokenizer (from kolm tokenizer extend)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--vocab-multiple", type=int, default=64, help="round the rows up to a multiple of this")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_model_expand)


def _model_expand(args: argparse.Namespace) -> int:
    from kolm.model.expand import expand_model

    emit(expand_model(args.model, args.tokenizer, args.out, args.vocab_multiple, args.force))
    return 0


# --------------------------------------------------------------------------- kolm train


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a Phi model with DeepSpeed (under any launcher)")
    p.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys")
    p.add_argument("--check", action="store_true",
                   help="run every start-up check of the real launch (config, data, batch layout, resume), then exit")
    p.add_argument("--ranks", type=_positive, default=None, metavar="N",
                   help="with --check: the number of ranks the real launch will use (default: the launcher's "
                        "world size, or 1)")
    p.set_defaults(func=_train)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _train(args: argparse.Namespace) -> int:
    from kolm.train.signals import GracefulStop

    stop = GracefulStop()  # before the slow imports, so an early USR1/TERM cannot kill the run
    from kolm.train.config import load_config

    if args.ranks is not None and not args.check:
        raise KolmError("--ranks goes with --check; a real launch takes its rank count from the launcher")
    cfg = load_config(args.config, args.overrides)
    if args.check:
        from kolm.train.precheck import check_launch

        emit(check_launch(cfg, args.ranks))
        return 0
    from kolm.train.loop import train

    return train(cfg, stop)


# --------------------------------------------------------------------------- kolm convert / generate / eval


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="a checkpoint to a Hugging Face model directory (verified)")
    p.add_argument("src", help="run directory, checkpoints directory or one global_stepN directory")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: newest complete)")
    p.add_argument("--best", action="store_true", help="the checkpoint with the best eval loss")
    p.add_argument("--average", type=int, default=0, metavar="K",
                   help="the element-wise mean of the newest K complete checkpoints' fp32 weights")
    p.add_argument("--tags", type=lambda t: [n for n in t.split(",") if n], default=None, metavar="A,B,...",
                   help="average these checkpoints (e.g. global_step9000,global_step10000)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one the run used)")
    p.add_argument("--max-shard-size", default="2GB", help="split model.safetensors above this size")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
    from kolm.export.convert import convert

    emit(convert(args.src, args.out, tag=args.tag, best=args.best, dtype=args.dtype, tokenizer=args.tokenizer,
                  force=args.force, max_shard_size=args.max_shard_size, average=args.average, tags=args.tags))
    return 0


def _add_generate(sub) -> None:
    from kolm.export.generate import GenerationSettings

    d = GenerationSettings()
    p = sub.add_parser("generate", help="continue Korean prompts with a converted model")
    p.add_argument("model", help="Hugging Face model directory (from kolm convert)")
    p.add_argument("prompts", nargs="*", help="prompts")
    p.add_argument("--prompts-file", default=None, help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    p.add_argument("--greedy", action="store_true", help="no sampling")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from kolm.export.generate import GenerationSettings, generate, load_prompts

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                                  do_sample=not args.greedy, temperature=args.temperature, top_p=args.top_p)
    for text in generate(args.model, load_prompts(args.prompts, args.prompts_file), settings, args.seed):
        emit(text)
        emit("---")
    return 0


def _add_eval(sub) -> None:
    from kolm.export.harness import HarnessOptions

    h = HarnessOptions()
    p = sub.add_parser("eval", help="loss, perplexity and accuracy on a shard split (--data), or "
                                    "lm-evaluation-harness tasks (--tasks)")
    p.add_argument("model", help="Hugging Face model directory, run directory or checkpoint directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="shard directory: loss, perplexity and next-token accuracy")
    what.add_argument("--tasks", type=lambda t: [n for n in t.split(",") if n],
                      help="lm-evaluation-harness tasks, comma-separated (kolm ships ko_constitution_cloze)")
    p.add_argument("--tag", default=None, help="checkpoint tag when MODEL is a run directory")
    shards = p.add_argument_group("with --data")
    shards.add_argument("--split", default="valid", choices=("train", "valid"))
    shards.add_argument("--seq-len", type=int, default=None, help="default: the training seq_len, else 512")
    shards.add_argument("--micro-batch", type=int, default=8)
    shards.add_argument("--max-samples", type=int, default=None)
    shards.add_argument("--attention", choices=ATTENTION_CHOICES, default=None,
                        help="default: what the model was trained with (causal where unknown)")
    harness = p.add_argument_group("with --tasks")
    harness.add_argument("--include-path", default=h.include_path, help="a directory of your own task YAML files")
    harness.add_argument("--limit", type=int, default=h.limit, help="examples per task (default: all)")
    harness.add_argument("--num-fewshot", type=int, default=h.num_fewshot)
    harness.add_argument("--batch-size", type=int, default=h.batch_size)
    harness.add_argument("--pending", action="store_true",
                         help="every complete checkpoint of a run without results for these tasks yet")
    p.set_defaults(func=_eval)


ATTENTION_CHOICES = ("causal", "document")


def _eval(args: argparse.Namespace) -> int:
    if args.tasks is not None:
        from kolm.export.harness import HarnessOptions, run_harness

        opts = HarnessOptions(args.tasks, args.include_path, args.limit, args.num_fewshot, args.batch_size,
                              args.tag, args.pending)
        for result in run_harness(args.model, opts):
            emit(result)
        return 0
    from kolm.export.evaluate import evaluate_model

    emit(evaluate_model(args.model, args.data, args.split, args.seq_len, args.micro_batch, args.max_samples,
                        args.tag, args.attention))
    return 0


# --------------------------------------------------------------------------- kolm report / plan / demo


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="plots and a summary of a run's metrics")
    p.add_argument("run_dir", help="run directory (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="where the PNGs and summary.txt go (default: RUN_DIR/report)")
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from kolm.cli.report import write_report

    text, paths = write_report(args.run_dir, args.out)
    emit(text)
    emit("plots: " + ", ".join(map(str, paths)))
    return 0


def _add_plan(sub) -> None:
    from kolm.train.hardware import CARDS
    from kolm.train.plan import MeasureRequest, PlanRequest

    d, m = PlanRequest(), MeasureRequest()
    p = sub.add_parser("plan", help="memory per GPU, layout and training time for a cluster shape")
    p.add_argument("--model", default=d.model, help=f"preset (default {d.model})")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="tokenizer vocabulary (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    p.add_argument("--gpu", default=d.gpu, choices=tuple(CARDS))
    p.add_argument("--global-batch", type=int, default=d.global_batch)
    p.add_argument("--tokens", type=float, default=d.tokens, help="tokens per epoch (e.g. 3e9)")
    p.add_argument("--lines", type=float, default=d.lines, help="corpus lines per epoch, instead of --tokens")
    p.add_argument("--tokens-per-line", type=float, default=d.tokens_per_line, help="with --lines")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--mfu", type=float, default=d.mfu, help=f"assumed model FLOPs utilization (default {d.mfu})")
    p.add_argument("--rampup-batch-size", type=int, nargs=3, default=d.rampup_batch_size,
                   metavar=("START", "INCREMENT", "SAMPLES"), help="a batch ramp, as the recipe key")
    p.add_argument("--measure", action="store_true",
                   help="check the estimate against a real DeepSpeed engine on this machine (small presets)")
    p.add_argument("--micro-batch", type=int, default=m.micro_batch, help="with --measure")
    p.add_argument("--zero-stage", type=int, default=m.zero_stage, choices=(0, 1, 2, 3),
                   help="with --measure (0: plain data parallel)")
    p.add_argument("--activation-checkpointing", action="store_true", help="with --measure")
    p.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    from kolm.train.plan import PlanRequest, format_plan

    fields = ("model", "vocab_size", "seq_len", "nodes", "gpus_per_node", "gpu", "global_batch", "tokens", "lines",
              "tokens_per_line", "epochs", "mfu", "rampup_batch_size")
    req = PlanRequest(**{name: getattr(args, name) for name in fields})
    req.validate()
    if args.measure:
        from kolm.train.measure import format_measurement
        from kolm.train.plan import MeasureRequest

        if args.micro_batch < 1:
            raise KolmError(f"--micro-batch must be at least 1, got {args.micro_batch}")
        emit(format_measurement(MeasureRequest(req.model, req.vocab, req.seq_len, args.micro_batch,
                                                args.zero_stage, args.activation_checkpointing)))
        return 0
    emit(format_plan(req))
    return 0


def _add_demo(sub) -> None:
    from kolm.cli.demo import DemoOptions

    d = DemoOptions()
    p = sub.add_parser("demo", help="run the whole line on the bundled Korean corpus")
    p.add_argument("--corpus", nargs="+", default=d.corpus, help="your own corpus instead of the bundled one")
    p.add_argument("--out", default=d.out,
                   help="where everything is written (default: ./kolm-demo, or ./kolm-demo-NAME with --corpus)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default {d.steps})")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from kolm.cli.demo import DemoOptions, run_demo

    emit(run_demo(DemoOptions(args.out, args.corpus, args.vocab_size, args.steps, args.max_new_tokens)))
    return 0


# --------------------------------------------------------------------------- kolm clean


def _add_clean(sub) -> None:
    p = sub.add_parser("clean", help="normalize, filter, mask PII and deduplicate a corpus (datatrove)")
    _add_corpus_args(p)
    _add_documents_arg(p)
    p.add_argument("--out", required=True, help="output directory (cleaned *.jsonl.gz, report.json, removed/)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--filters", choices=("default", "none"), default="default", help="quality filters")
    p.add_argument("--pii", choices=("mask", "keep"), default="mask", help="replace PII with <|rrn|>, <|phone|>, ...")
    p.add_argument("--dedup", choices=("near", "exact", "none"), default="near", help="duplicate removal")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="settings",
                   help="tune one setting of kolm/data/clean_config.py, e.g. min_chars=50 min_hangul_share=0")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier kolm clean output of other inputs or settings in --out; work of this "
                        "same command is kept and continued. In an array job only task 0 replaces; the others wait")
    p.add_argument("--unit-bytes", type=_size, default=None, help="input bytes per task (default 32M)")
    p.add_argument("--num-tasks", type=int, default=None, help="array tasks (default: SLURM_ARRAY_TASK_COUNT or 1)")
    p.add_argument("--task-index", type=int, default=None, help="this task (default: from SLURM_ARRAY_TASK_ID)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_clean)


def _clean(args: argparse.Namespace) -> int:
    from kolm.data.clean import run_clean
    from kolm.data.clean_config import preset
    from kolm.data.clean_report import summary
    from kolm.data.jobs import array_task

    settings = [*args.settings, *([f"unit_bytes={args.unit_bytes}"] if args.unit_bytes is not None else [])]
    cfg = preset(args.filters, args.pii, args.dedup, args.text_field, args.skip_malformed, settings, args.documents)
    num_tasks, task_index = array_task(args.num_tasks, args.task_index)
    start = time.perf_counter()
    report = run_clean(args.input, args.out, cfg, workers=args.workers, overwrite=args.overwrite,
                       progress=not args.no_progress, num_tasks=num_tasks, task_index=task_index)
    if report is not None:
        emit(summary(args.out, report, time.perf_counter() - start))
    return 0


# --------------------------------------------------------------------------- main

SUBCOMMANDS = (_add_tokenizer, _add_shard, _add_model, _add_train, _add_convert, _add_generate, _add_eval, _add_report,
               _add_plan, _add_demo, _add_clean)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kolm", description="Korean Phi pretraining kit")
    # The `deepspeed` launcher passes --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    _results.append(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return args.func(args)
    except KolmError as e:
        print(f"kolm: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"kolm: error: no space left on the device writing {e.filename or 'a file'}; free space and re-run "
              "the same command (finished shards and complete checkpoints are untouched; it resumes)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kolm: interrupted; re-run the same command to continue", file=sys.stderr)
        return 130
    finally:
        _results.pop()
