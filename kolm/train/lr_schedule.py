"""The learning rate: linear warmup, then cosine decay to ``min_lr``, as a function of consumed
samples. Counting samples rather than optimizer steps keeps the schedule the same whether a batch
ramp makes many small steps early or the run takes full batches from the start; with a constant
batch it is the familiar per-step schedule (``warmup_steps`` and the run length are steps of the
full batch, converted to samples).

A step's learning rate is the schedule's value at the sample count its step ends with, set before
its update: the first step of a warmup already moves the weights (by ``lr / warmup_steps``), and the
``lr`` a step logs is the one it used. Resuming needs no scheduler state: the value follows from the
consumed-sample count the checkpoint carries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    peak: float
    floor: float  # min_lr
    warmup: int  # samples
    total: int  # samples: the decay reaches ``floor`` here and stays

    @classmethod
    def for_run(cls, lr: float, min_lr: float, warmup_steps: int, total_full_steps: int,
                global_batch: int) -> LRSchedule:
        """Warmup and length given in steps of the full batch, counted in samples."""
        return cls(lr, min_lr, warmup_steps * global_batch, total_full_steps * global_batch)

    def at(self, samples: int) -> float:
        """The learning rate of the step that ends with ``samples`` consumed."""
        if samples < self.warmup:
            return self.peak * (samples / self.warmup)
        progress = min(1.0, (samples - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (self.peak - self.floor) * (1 + math.cos(math.pi * progress)) / 2

    def apply(self, optimizer, samples: int) -> float:
        """Set every parameter group of ``optimizer`` to the rate for ``samples``; returns it."""
        lr = self.at(samples)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
