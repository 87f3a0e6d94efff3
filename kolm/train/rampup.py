"""The global batch as a function of consumed samples: constant, or ramped up with Megatron-LM's
rule (``rampup_batch_size: [start, increment, samples]``).

With ``n = (global_batch - start) / increment`` increments, the batch of a step that begins with
``c`` samples consumed is ``start + floor(c * n / samples) * increment``, and ``global_batch`` once
``c >= samples``: it grows by ``increment`` every ``samples / n`` consumed samples. Megatron computes
the same rule in floating point (``int(c / (samples / n))``), where a quotient that should be whole
can round just below it and delay an increment by one step; kolm uses the exact integer form, so
the schedule never depends on rounding. The micro batch never changes: each step's gradient
accumulation is its batch over ``micro_batch x ranks``.

Everything here is a pure function of the consumed-sample count, so a run resumed anywhere in the
ramp (on any number of ranks that split every batch) takes the same steps over the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from kolm.errors import KolmError


@dataclass(frozen=True)
class Segment:
    """Consecutive steps at one global batch."""

    batch: int
    first_step: int  # 1-based
    first_sample: int  # samples consumed before its first step
    steps: int | None  # None: the full batch, until the run ends


@dataclass(frozen=True)
class BatchSchedule:
    global_batch: int
    start: int = 0  # 0: no ramp
    increment: int = 0
    samples: int = 0

    @classmethod
    def from_config(cls, global_batch: int, rampup: list | None) -> BatchSchedule:
        """The schedule a recipe asks for; a malformed ramp is an error that says what to write."""
        if not rampup:
            return cls(global_batch)
        if (not isinstance(rampup, list) or len(rampup) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in rampup)):
            raise KolmError(f"`rampup_batch_size` is [start, increment, samples] (three integers), got {rampup!r}")
        start, increment, samples = rampup
        if min(start, increment, samples) < 1:
            raise KolmError(f"`rampup_batch_size` {rampup}: start, increment and samples must all be positive")
        if start >= global_batch:
            raise KolmError(f"`rampup_batch_size` starts at {start}, not below global_batch {global_batch}: "
                            "start lower, or drop the key for a constant batch")
        if (global_batch - start) % increment:
            raise KolmError(f"`rampup_batch_size` {rampup}: global_batch {global_batch} minus start {start} = "
                            f"{global_batch - start} is not a multiple of the increment {increment}; the ramp "
                            "must land on global_batch")
        return cls(global_batch, start, increment, samples)

    @property
    def ramped(self) -> bool:
        return self.start > 0

    @property
    def increments(self) -> int:
        return (self.global_batch - self.start) // self.increment if self.ramped else 0

    def sizes(self) -> list[int]:
        """Every batch size the schedule can use, smallest first."""
        return [self.start + i * self.increment for i in range(self.increments + 1)] if self.ramped \
            else [self.global_batch]

    def batch_at(self, consumed: int) -> int:
        """The global batch of the step that begins with ``consumed`` samples consumed."""
        if not self.ramped or consumed >= self.samples:
            return self.global_batch
        return self.start + consumed * self.increments // self.samples * self.increment

    def check_layout(self, micro_batch: int, ranks: int) -> None:
        """Every batch of the ramp must split into whole micro batches on every rank."""
        unit = micro_batch * ranks
        bad = next((b for b in self.sizes() if b % unit), None) if self.ramped else None
        if bad is not None:
            raise KolmError(
                f"rampup_batch_size {[self.start, self.increment, self.samples]}: batch {bad} of the ramp is not "
                f"divisible by micro batch {micro_batch} x {ranks} data-parallel ranks = {unit}; make start and "
                f"increment multiples of {unit} (the micro batch stays fixed; accumulation changes)")

    def segments(self) -> list[Segment]:
        """The steps at each batch size in order; a size the ramp steps over is left out."""
        found, step, consumed = [], 1, 0
        for i, batch in enumerate(self.sizes()[:-1]):
            until = -(-(i + 1) * self.samples // self.increments)  # first count at increment i + 1
            steps = max(0, -(-(until - consumed) // batch))
            if steps:
                found.append(Segment(batch, step, consumed, steps))
            step, consumed = step + steps, consumed + steps * batch
        return [*found, Segment(self.global_batch, step, consumed, None)]

    def steps_to(self, samples: int) -> int:
        """Steps until at least ``samples`` are consumed (the run's length)."""
        steps = 0
        for seg in self.segments():
            if seg.steps is None or samples <= seg.first_sample + seg.steps * seg.batch:
                return steps + max(0, -(-(samples - seg.first_sample) // seg.batch))
            steps += seg.steps
        raise AssertionError("the last segment is unbounded")

    def consumed_after(self, steps: int) -> int:
        """Samples consumed by the first ``steps`` steps."""
        for seg in self.segments():
            if seg.steps is None or steps < seg.first_step + seg.steps:
                return seg.first_sample + (steps - seg.first_step + 1) * seg.batch
        raise AssertionError("the last segment is unbounded")

    def table(self, micro_batch: int, ranks: int, total_steps: int) -> str:
        """The ramp as `kolm train --check` prints it: each batch, from which step and sample."""
        rows = [f"batch ramp {[self.start, self.increment, self.samples]}: {total_steps} steps in all",
                f"  {'batch':>7}{'from step':>11}{'from sample':>13}{'steps':>8}{'accumulation':>14}"]
        for seg in self.segments():
            if seg.first_step > total_steps:
                break
            steps = (seg.steps if seg.steps is not None else total_steps - seg.first_step + 1)
            rows.append(f"  {seg.batch:>7}{seg.first_step:>11}{seg.first_sample:>13,}"
                        f"{min(steps, total_steps - seg.first_step + 1):>8}{seg.batch // (micro_batch * ranks):>14}")
        return "\n".join(rows)
