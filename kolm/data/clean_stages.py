"""The datatrove pipelines of `kolm clean`, stage by stage (see kolm/data/clean.py for the flow)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kolm.data.clean_config import CleanConfig
from kolm.data.corpus import Unit
from kolm.log import say


@dataclass(frozen=True)
class Stage:
    name: str
    tasks: int
    pipeline: Callable[[], list]


class Stages:
    """Builds each stage's pipeline from the config; paths are all under the work directory."""

    def __init__(self, out: Path, work: Path, cfg: CleanConfig, units: list[Unit]):
        self.out, self.work, self.cfg, self.units = out, work, cfg, units
        self.counts = str(work / "counts")
        self.dedup = cfg.dedup.mode

    def _path(self, name: str) -> str:
        return str(self.work / name)

    def stages(self) -> list[Stage]:
        tasks = len(self.units)
        stages = [Stage("prepare", tasks, self.prepare)]
        if self.dedup == "exact":
            stages.append(Stage("exact duplicates", 1, self.exact_find))
        if self.dedup == "near":  # the exact copies are found beside the buckets, in the same stage
            stages += [Stage("exact duplicates and minhash buckets", 1 + self.cfg.dedup.num_buckets,
                             self.exact_and_buckets),
                       Stage("minhash clusters", 1, self.minhash_clusters)]
        return [*stages, Stage("write", tasks, self.write)]

    def step_names(self) -> list[str]:
        """The counting steps whose files the report reads, in pipeline order."""
        names = ["read", "normalize"]
        if self.cfg.filters.enabled:
            names.append("filters")
        if self.cfg.pii:
            names.append("pii")
        names.append("prepared")
        if self.dedup == "exact":
            names.append("after_exact")
        if self.dedup == "near":
            names.append("after_near")
        return [*names, "write"]

    def run_all(self, workers: int, progress: bool, num_tasks: int = 1, task_index: int = 0) -> bool:
        """Run every stage, or (as array task ``task_index`` of ``num_tasks``) this task's share of
        each stage, waiting for the other array tasks between stages. Returns True where the whole
        run is finished (the last task to need it: array task 0)."""
        from kolm.data.clean_exec import run_local, wait_for_stage

        stages = self.stages()
        for i, stage in enumerate(stages, start=1):
            label = f"clean {i}/{len(stages)} {stage.name}"
            logs = self.work / "logs" / stage.name.replace(" ", "_")
            lo, hi = stage.tasks * task_index // num_tasks, stage.tasks * (task_index + 1) // num_tasks
            started = time.monotonic()
            if hi > lo:
                run_local(stage.pipeline(), stage.tasks, workers, logs, label, progress, ranks=(lo, hi))
                say(f"{label}: {hi - lo} tasks in {time.monotonic() - started:.1f}s")
            if num_tasks > 1 and (i < len(stages) or task_index == 0):
                wait_for_stage(logs, stage.tasks, label)
        return task_index == 0

    # ----------------------------------------------------------------------------- pipelines

    def prepare(self) -> list:
        from kolm.data.clean_dedup import ExactSignature, KoreanMinhashSignature, exact_config, minhash_config
        from kolm.data.clean_filters import QualityFilter
        from kolm.data.clean_io import CorpusReader, JsonlGzWriter
        from kolm.data.clean_normalize import Normalize
        from kolm.data.clean_pii import PiiMask

        cfg = self.cfg
        steps = [CorpusReader(self.counts, self.units, cfg.text_field, cfg.skip_malformed, cfg.documents),
                 Normalize(self.counts)]
        if cfg.filters.enabled:
            steps.append(QualityFilter(self.counts, cfg.filters))
        if cfg.pii:
            steps.append(PiiMask(self.counts, cfg.pii))
        steps.append(JsonlGzWriter(self.counts, self._path("prepared"), cfg.text_field, level=0, step_name="prepared"))
        if self.dedup != "none":
            steps.append(ExactSignature(self._path("exact/sigs"), exact_config()))
        if self.dedup == "near":
            steps.append(KoreanMinhashSignature(self._path("minhash/sigs"), minhash_config(self.cfg.dedup)))
        return steps

    def exact_find(self) -> list:
        from datatrove.pipeline.dedup.exact_dedup import ExactFindDedups

        from kolm.data.clean_dedup import exact_config

        return [ExactFindDedups(self._path("exact/sigs"), self._path("exact/dups"), exact_config())]

    def minhash_buckets(self) -> list:
        from kolm.data.clean_dedup import MinhashBuckets, minhash_config

        return [MinhashBuckets(self._path("minhash/sigs"), self._path("minhash/buckets"),
                               config=minhash_config(self.cfg.dedup))]

    def exact_and_buckets(self) -> list:
        from kolm.data.clean_dedup import TaskSplit

        return [TaskSplit([(self.exact_find()[0], 1), (self.minhash_buckets()[0], self.cfg.dedup.num_buckets)])]

    def minhash_clusters(self) -> list:
        from datatrove.pipeline.dedup.minhash import MinhashDedupCluster

        from kolm.data.clean_dedup import minhash_config

        return [MinhashDedupCluster(self._path("minhash/buckets"), self._path("minhash/remove"),
                                    config=minhash_config(self.cfg.dedup))]

    def write(self) -> list:
        from kolm.data.clean_dedup import ExactDrops, MinhashDrops
        from kolm.data.clean_io import PreparedWriter

        drop, kept = {"exact": (ExactDrops(self._path("exact/dups")), "after_exact"),
                      "near": (MinhashDrops(self._path("minhash/remove")), "after_near")}.get(self.dedup, (None, None))
        return [PreparedWriter(self.counts, self._path("prepared"), str(self.out), self.cfg.text_field, drop, kept)]
