"""`kolm clean`: normalize, filter, mask PII and deduplicate a corpus, on datatrove.

Stages (each a datatrove pipeline run as tasks; a task is one work unit of the input):

    prepare   read → normalize → filters → PII → work/prepared/TASK.jsonl (+ exact-dedup hashes;
              with --dedup near also the MinHash signatures, datatrove's MinHash step 1)
    exact     find exact duplicates over all tasks (one task); with --dedup near it is one more
              task of the MinHash buckets stage (datatrove's MinHash step 2, one task per bucket)
    clusters  MinHash clusters (step 3; --dedup near only)
    write     prepared lines, less the duplicates' → OUT/TASK.jsonl.gz

The prepared file holds each document's output record, uncompressed, so the write stage copies
its lines as bytes (no parsing) and skips the line numbers dedup removed. With --dedup exact
those are the exact duplicates. With --dedup near, exact copies have identical MinHash
signatures, so they fall into the near-duplicate clusters too, and the write stage drops all but
one document of each cluster (MinHash step 4): one pass over the data finds both, and no document
is kept by one step and dropped by the other. Exact copies are still found by hash, and the
report counts them apart from the near duplicates.

Output directory::

    00000.jsonl.gz ...   the cleaned records, every input field kept (read as-is by kolm shard)
    report.json          written last: the run is complete when it exists
    removed/NAME.json    a few documents each filter removed
    .work/               plan, intermediate files and datatrove's completion markers (removed at the end)

The tasks depend only on the inputs, so the output is the same for any number of workers, and a
killed run continues where it stopped when the same command runs again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from kolm.data.clean_config import CleanConfig
from kolm.data.corpus import check_documents, find_inputs, plan_units
from kolm.data.jobs import check_at_least, check_out_dir, check_tasks, wait_for_plan
from kolm.errors import KolmError
from kolm.files import atomic_write_json, read_json
from kolm.log import say

FORMAT = 1
WORK = ".work"
REPORT = "report.json"
REMOVED = "removed"


def make_plan(inputs: list[str], cfg: CleanConfig) -> tuple[dict, list]:
    """What this run builds: identical plans mean the same output."""
    files = find_inputs(inputs)
    check_documents(cfg.documents, files)
    units = plan_units(files, cfg.unit_bytes, cfg.documents)
    plan = {
        "format": FORMAT,
        "inputs": [{"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns} for f in files],
        "config": cfg.as_dict(),
        "tasks": len(units),
    }
    return json.loads(json.dumps(plan)), units  # as it reads back from disk (lists, not tuples)


def resolve_spam_file(cfg: CleanConfig) -> CleanConfig:
    """Fold the user's spam phrase file into the phrase list, so the plan records the phrases themselves."""
    path = cfg.filters.spam_phrases_file
    if not path:
        return cfg
    try:
        extra = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise KolmError(f"spam_phrases_file {path}: cannot be read ({e.strerror or e})") from e
    filters = dataclasses.replace(cfg.filters, spam_phrases=(*cfg.filters.spam_phrases, *extra), spam_phrases_file="")
    return dataclasses.replace(cfg, filters=filters)


def _owned(name: str) -> bool:
    return name in (REPORT, REMOVED, WORK) or (name.endswith(".jsonl.gz") and name[:5].isdigit())


def recorded_plan(out: Path) -> dict | None:
    """The plan of the output already in ``out``: its report's when finished, else its work's."""
    for path, key in ((out / REPORT, "plan"), (out / WORK / "plan.json", None)):
        try:
            recorded = read_json(path)
        except (OSError, ValueError):
            continue  # absent, or removed while read (another task finishing)
        return recorded.get(key) if key else recorded
    return None


def prepare_output(out: Path, plan: dict, overwrite: bool) -> bool:
    """Check ``out`` against the plan; True when it already holds this run's finished output.

    --overwrite removes earlier output only when it was made by another plan: output of this same
    plan (a requeued or re-run array task) is continued, so no task's finished work is lost."""
    if overwrite and out.is_dir() and recorded_plan(out) != plan:
        for p in out.iterdir():
            if _owned(p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    if (out / REPORT).is_file():
        if read_json(out / REPORT).get("plan") == plan:
            shutil.rmtree(out / WORK, ignore_errors=True)
            return True
        raise KolmError(f"{out} already holds cleaned output of another run (other inputs or settings); "
                        "choose another --out, or pass --overwrite to replace it")
    plan_file = out / WORK / "plan.json"
    if plan_file.is_file():
        if read_json(plan_file) != plan:
            raise KolmError(f"{out} holds unfinished work of another run (other inputs or settings); re-run that "
                            "command to finish it, choose another --out, or pass --overwrite")
        return False
    foreign = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:5])
        raise KolmError(f"{out} is not empty ({shown}{' ...' if len(foreign) > 5 else ''}); kolm clean writes only "
                        "into a new or empty directory (or its own earlier output, with --overwrite)")
    (out / WORK).mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_file, plan)
    return False


def run_clean(inputs: list[str], out: str | os.PathLike, cfg: CleanConfig = CleanConfig(), workers: int | None = None,
              overwrite: bool = False, progress: bool = True, num_tasks: int = 1, task_index: int = 0) -> dict | None:
    """Clean ``inputs`` into ``out``; returns the report (also written to ``out/report.json``).

    As array task ``task_index`` of ``num_tasks`` (a Slurm array job, whose tasks must all run at
    the same time) it does its share of every stage; task 0 writes the report, the others return None.
    """
    from kolm.data.clean_stages import Stages

    check_tasks(num_tasks, task_index)
    check_at_least("--workers", workers)
    out = Path(out)
    check_out_dir(out)
    cfg = resolve_spam_file(cfg)
    cfg.validate()
    plan, units = make_plan(inputs, cfg)
    done = prepare_output(out, plan, overwrite) if task_index == 0 else wait_for_task_zero(out, plan, task_index)
    if done:
        say(f"{out}: already complete; nothing to do")
        return read_json(out / REPORT)
    workers = workers or os.cpu_count() or 1
    if workers > 1:
        from kolm.data.clean_workers import start_forkserver

        start_forkserver()
    stages = Stages(out, out / WORK, cfg, units)
    if not stages.run_all(workers, progress, num_tasks, task_index):
        say(f"task {task_index}/{num_tasks} done; array task 0 writes the report")
        return None
    from kolm.data.clean_report import finish

    report = finish(out, out / WORK, plan, stages.step_names())
    shutil.rmtree(out / WORK, ignore_errors=True)
    return report


def wait_for_task_zero(out: Path, plan: dict, task_index: int) -> bool:
    """Array tasks other than 0 wait for task 0 to check the output directory and record the plan;
    True when this run's output is already finished."""
    wait_for_plan(out, lambda: recorded_plan(out) == plan, task_index)
    return (out / REPORT).is_file()
