"""`kolm eval MODEL --tasks ...`: lm-evaluation-harness tasks (its Hugging Face backend) on a converted
model, or on a run's checkpoints (each converted to a temporary directory first, removed afterwards).

Results print as a table and are written as JSON: ``MODEL/harness_results.json`` for a model
directory; for a run, ``RUN_DIR/harness/global_stepN.json`` plus one ``{"kind": "harness", ...}``
record per task in the run's metrics.jsonl, at the checkpoint's step (`kolm report` shows them).
``pending`` evaluates every complete checkpoint that has no record for the tasks yet, so a cluster
job can be submitted again and again (slurm/eval.sbatch). Everything is checked before a model is
loaded or a file written: the task names (an unknown one is named with its close matches), their
datasets (one that is not available offline is named), the tokenizer, the checkpoints.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kolm.errors import KolmError
from kolm.files import atomic_write_json
from kolm.log import say

SHIPPED_TASKS = Path(__file__).resolve().parent / "tasks"  # ko_constitution_cloze, kolm's example


@dataclass
class HarnessOptions:
    """Every default of `kolm eval --tasks`."""

    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    tag: str | None = None  # a run's checkpoint (default: the newest complete one)
    pending: bool = False  # every complete checkpoint without a result for these tasks


@dataclass
class HarnessResult:
    model: str
    step: int | None
    scores: dict[str, dict[str, float]]  # task -> metric -> value

    def __str__(self) -> str:
        where = f"{self.model}" + (f" (step {self.step})" if self.step is not None else "")
        metrics = sorted({m for s in self.scores.values() for m in s})
        rows = [f"{where}", "  " + f"{'task':<28}" + "".join(f"{m:>12}" for m in metrics)]
        for task, scores in self.scores.items():
            rows.append("  " + f"{task:<28}" + "".join(f"{scores[m]:>12.4f}" if m in scores else f"{'-':>12}"
                                                       for m in metrics))
        return "\n".join(rows)


def _harness():
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError as e:
        raise KolmError(f"kolm eval --tasks needs lm-evaluation-harness ({e}): `pip install 'kolm[eval]'`") from None
    return lm_eval


def task_manager(include_path: str | None):
    lm_eval = _harness()
    paths = [str(SHIPPED_TASKS)] + ([str(Path(include_path).resolve())] if include_path else [])
    if include_path and not Path(include_path).is_dir():
        raise KolmError(f"--include-path {include_path}: no such directory of task YAML files")
    return lm_eval.tasks.TaskManager(include_path=paths)


def check_tasks(manager, tasks: list[str]) -> None:
    """Every task known, and its data loadable here (offline, from the cache, or local files)."""
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise KolmError(f"unknown lm-evaluation-harness task {name!r}{hint} (`lm-eval ls tasks` lists them; "
                            "your own YAML tasks need --include-path DIR)")
    try:
        manager.load(tasks)
    except (ConnectionError, FileNotFoundError, OSError) as e:
        raise _unavailable(tasks, e) from None


def _unavailable(tasks: list[str], error: Exception) -> KolmError:
    found = re.search(r"Couldn't reach (?:the Hugging Face Hub for dataset )?'([^']+)'", str(error))
    dataset = found.group(1) if found else "a dataset"
    return KolmError(f"the task(s) {', '.join(tasks)} need {dataset}, which is not available here: it is not in "
                     "the Hugging Face datasets cache and this node cannot reach the hub (HF_DATASETS_OFFLINE / "
                     "HF_HUB_OFFLINE). Download it where there is internet (`datasets.load_dataset(...)` with the "
                     f"same HF_HOME), or point HF_HOME at a cache that holds it ({error.__class__.__name__}: "
                     f"{str(error)[:200]})")


def check_tokenizer(model_dir: Path) -> None:
    config = model_dir / "tokenizer_config.json"
    settings = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    if not settings.get("eos_token"):
        raise KolmError(f"{model_dir}: the tokenizer has no EOS token, which the harness needs to end "
                        "generations and to pad; convert the model with kolm (its tokenizers have one)")


def evaluate_directory(model_dir: Path, opts: HarnessOptions, manager) -> dict[str, dict[str, float]]:
    """Run the harness on one Hugging Face directory; task -> metric -> value."""
    import torch

    lm_eval = _harness()
    cuda = torch.cuda.is_available()
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "bfloat16" if cuda else "float32"},
        device="cuda" if cuda else "cpu", tasks=opts.tasks, task_manager=manager, limit=opts.limit,
        num_fewshot=opts.num_fewshot, batch_size=opts.batch_size, bootstrap_iters=0, log_samples=False)
    return {task: {key.split(",")[0]: float(value) for key, value in scores.items()
                   if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
            for task, scores in results["results"].items()}


def run_harness(source: str, opts: HarnessOptions) -> list[HarnessResult]:
    """Evaluate a model directory, or a run's checkpoint(s); record and return the results."""
    if not opts.tasks:
        raise KolmError("--tasks needs at least one task name")
    manager = task_manager(opts.include_path)
    check_tasks(manager, opts.tasks)
    path = Path(source)
    if (path / "config.json").is_file():
        check_tokenizer(path)
        result = HarnessResult(str(path), None, evaluate_directory(path, opts, manager))
        _merge_json(path / "harness_results.json", result.scores)
        return [result]
    todo = _checkpoints(source, opts)
    if not todo:
        say(f"nothing to evaluate: every complete checkpoint of {source} has results for {', '.join(opts.tasks)}")
    return [_evaluate_checkpoint(ckpt, opts, manager) for ckpt in todo]


def _checkpoints(source: str, opts: HarnessOptions) -> list:
    from kolm.train import checkpoint
    from kolm.train.checkpoint import resolve_checkpoint

    if not opts.pending:
        return [resolve_checkpoint(source, opts.tag)]
    found = resolve_checkpoint(source)  # the newest complete one: a clear error when there is none
    run_dir = found.path.parent.parent
    done = {(r.get("task"), r.get("step")) for r in _harness_records(run_dir)}
    complete = sorted(checkpoint.complete_checkpoints(found.path.parent), key=lambda c: c.step)
    return [c for c in complete if any((task, c.step) not in done for task in opts.tasks)]


def _harness_records(run_dir: Path) -> list[dict]:
    from kolm.train.metrics import METRICS_FILE, read_metrics

    if not (run_dir / METRICS_FILE).is_file():
        return []
    return [r for r in read_metrics(run_dir).other if r.get("kind") == "harness"]


def _evaluate_checkpoint(ckpt, opts: HarnessOptions, manager) -> HarnessResult:
    """Convert the checkpoint beside the run (same filesystem), evaluate it, remove the conversion."""
    import torch

    from kolm.export.convert import convert

    run_dir = ckpt.path.parent.parent
    tmp = Path(tempfile.mkdtemp(prefix=".harness-", dir=run_dir))
    try:
        convert(str(ckpt.path), str(tmp / "model"), dtype="bf16" if torch.cuda.is_available() else "fp32")
        check_tokenizer(tmp / "model")
        result = HarnessResult(str(ckpt.path), ckpt.step, evaluate_directory(tmp / "model", opts, manager))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _record(run_dir, result, opts)
    return result


def _record(run_dir: Path, result: HarnessResult, opts: HarnessOptions) -> None:
    """RUN_DIR/harness/global_stepN.json, and one metrics.jsonl record per task at the step."""
    from kolm.train import checkpoint
    from kolm.train.metrics import METRICS_FILE
    (run_dir / "harness").mkdir(exist_ok=True)
    _merge_json(run_dir / "harness" / f"{checkpoint.tag_for(result.step)}.json", result.scores)
    lines = [json.dumps({"kind": "harness", "step": result.step, "task": task, **scores,
                         "num_fewshot": opts.num_fewshot or 0, "limit": opts.limit}, ensure_ascii=False)
             for task, scores in result.scores.items()]
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def _merge_json(path: Path, scores: dict) -> None:
    """Keep earlier tasks' results in the file; this run's replace the same tasks'."""
    earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    atomic_write_json(path, {**earlier, **scores})
