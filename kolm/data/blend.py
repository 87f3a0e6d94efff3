"""Data mixtures: several shard directories read as one stream of training windows at chosen weights.

The order: after any prefix of ``n`` samples every source has given within one of ``n * w_i``
samples (the guarantee of Megatron's blending rule, met here by an earliest-deadline schedule,
see `blend_period`). With the weights as exact fractions over a common denominator ``Q`` (a recipe's
decimal weights give small ones), that choice repeats every ``Q`` samples, so one period is built
once and sample ``n``'s source and its ordinal within that source follow in constant time, for any
``n``: a resume a billion samples in starts at once.

Within a source, its k-th sample is window ``permutation(seed, epoch)[k mod windows]`` of its own
split (kolm.data.packed): a source that runs out starts its next epoch with a new permutation.
The blended order depends only on the sources, their weights, seq_len and the seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from kolm.data.packed import PackedDataset, rank_batches
from kolm.errors import KolmError

MAX_PERIOD = 1_000_000  # weights whose exact period is longer are rounded to millionths


@dataclass(frozen=True)
class Source:
    """One entry of a recipe's ``data`` list."""

    path: str
    weight: float = 1.0
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


def parse_sources(data: str | list, where: str = "the recipe") -> list[Source]:
    """The recipe's ``data`` value as sources: one shard directory, or a list of
    ``{path, weight, name}`` (weight defaults to 1, name to the directory's name)."""
    if isinstance(data, str):
        return [Source(data, 1.0, "")]
    if not isinstance(data, list) or not data:
        raise KolmError(f"`data` in {where} must be a shard directory or a list of {{path, weight, name}}")
    sources = [_source(entry, i, where) for i, entry in enumerate(data)]
    labels = [s.label for s in sources]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise KolmError(f"`data` in {where} names {', '.join(duplicates)} more than once; give each source a "
                        "distinct `name`")
    return sources


def _source(entry, i: int, where: str) -> Source:
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
        raise KolmError(f"`data` entry {i + 1} in {where} needs a `path` (a shard directory), got {entry!r}")
    unknown = set(entry) - {"path", "weight", "name"}
    if unknown:
        raise KolmError(f"`data` entry {i + 1} in {where} has unknown key(s) {', '.join(sorted(unknown))}; "
                        "allowed: path, weight, name")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or not math.isfinite(weight):
        raise KolmError(f"`data` entry {i + 1} ({entry['path']}) in {where}: weight must be a positive number, "
                        f"got {weight!r}")
    return Source(entry["path"], float(weight), str(entry.get("name") or ""))


def shares(weights: list[float]) -> list[Fraction]:
    """Normalised weights as exact fractions (decimal weights stay exact; see MAX_PERIOD)."""
    exact = [Fraction(str(w)) for w in weights]
    total = sum(exact)
    normal = [w / total for w in exact]
    if math.lcm(*(f.denominator for f in normal)) <= MAX_PERIOD:
        return normal
    scaled = [round(f * MAX_PERIOD) or 1 for f in normal]
    scaled[scaled.index(max(scaled))] += MAX_PERIOD - sum(scaled)
    return [Fraction(s, MAX_PERIOD) for s in scaled]


def blend_period(fractions: list[Fraction]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source of each position, its ordinal within the source, samples per source) for one period.

    Source ``i``'s j-th sample (1-based) may come at a position in ``[floor((j-1)/w_i), ceil(j/w_i))``;
    at each position the released sample with the earliest deadline goes first (ties: the source
    listed first). With shares summing to one this meets every deadline, which keeps each source's
    count strictly within one of ``n * w_i`` after every prefix of ``n`` samples."""
    period = math.lcm(*(f.denominator for f in fractions))
    per_period = [int(f * period) for f in fractions]
    taken = [0] * len(fractions)
    choice = np.empty(period, dtype=np.int32)
    ordinal = np.empty(period, dtype=np.int64)
    for n in range(period):
        # Integer arithmetic: release floor(j * P / W) and deadline ceil((j + 1) * P / W) of sample j.
        i = min((-(-(t + 1) * period // w), i) for i, (w, t) in enumerate(zip(per_period, taken))
                if t < w and t * period // w <= n)[1]
        choice[n], ordinal[n] = i, taken[i]
        taken[i] += 1
    return choice, ordinal, np.array(per_period, dtype=np.int64)


class BlendedDataset:
    """Training windows drawn from several sources at fixed shares (see the module's description)."""

    def __init__(self, sources: list[Source], split: str, seq_len: int, seed: int = 1234):
        self.sources = sources
        self.datasets = [self._open(s, split, seq_len, seed, len(sources) > 1) for s in sources]
        self.fractions = shares([s.weight for s in sources])
        self._choice, self._ordinal, self._per_period = blend_period(self.fractions)
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.num_samples = sum(d.num_samples for d in self.datasets)

    @staticmethod
    def _open(source: Source, split: str, seq_len: int, seed: int, named: bool) -> PackedDataset:
        try:
            return PackedDataset(source.path, split, seq_len, seed)
        except KolmError as e:
            raise KolmError(f"data source {source.label}: {e}" if named else str(e)) from None

    @property
    def names(self) -> list[str]:
        return [s.label for s in self.sources]

    @property
    def fingerprint(self) -> dict:
        """What a checkpoint records to detect a resume on a different blend."""
        if len(self.sources) == 1:
            return self.datasets[0].fingerprint
        parts = [{"name": s.label, "weight": str(f), **{k: d.fingerprint[k] for k in ("manifest_sha256",
                                                                                      "num_samples")}}
                 for s, f, d in zip(self.sources, self.fractions, self.datasets)]
        return {"sources": parts, "split": self.split, "seq_len": self.seq_len, "seed": self.seed}

    def locate(self, g: int) -> tuple[int, int]:
        """(source, that source's sample ordinal) behind global sample ``g``."""
        cycle, pos = divmod(g, len(self._choice))
        i = int(self._choice[pos])
        return i, cycle * int(self._per_period[i]) + int(self._ordinal[pos])

    def taken(self, n: int) -> list[int]:
        """Samples each source has given after the first ``n`` samples of the stream."""
        cycle, pos = divmod(n, len(self._choice))
        within = np.bincount(self._choice[:pos], minlength=len(self.sources))
        return [int(cycle * p + w) for p, w in zip(self._per_period, within)]

    def epochs(self, n: int) -> list[int]:
        """The epoch (1-based) each source is in once ``n`` samples are consumed."""
        return [t // d.num_samples + 1 for t, d in zip(self.taken(n), self.datasets)]

    def rank_batches(self, consumed_samples: int, global_batch: int, micro_batch: int, dp_rank: int,
                     dp_world: int, batch_at: Callable[[int], int] | None = None) -> Iterator[np.ndarray]:
        return rank_batches(self.samples, consumed_samples, global_batch, micro_batch, dp_rank, dp_world, batch_at)

    def samples(self, start: int, count: int) -> np.ndarray:
        """Global samples ``[start, start + count)`` stacked as ``(count, seq_len + 1)``."""
        rows = []
        for g in range(start, start + count):
            i, k = self.locate(g)
            d = self.datasets[i]
            rows.append(d.window(d.sample_index(k)))
        return np.stack(rows)
