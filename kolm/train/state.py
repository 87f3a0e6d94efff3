"""What a checkpoint's client state carries besides DeepSpeed's own state."""

from __future__ import annotations

from dataclasses import dataclass, field

from kolm.log import say
from kolm.train.health import GradNormWatch


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    best_eval_loss: float | None = None
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    grad_watch: GradNormWatch = field(default_factory=GradNormWatch)

    @classmethod
    def fresh(cls, spike_factor: float) -> TrainState:
        return cls(grad_watch=GradNormWatch(spike_factor))

    @classmethod
    def from_client(cls, saved: dict, spike_factor: float) -> TrainState:
        """The state a checkpoint carried (older ones have no gradient-norm watch)."""
        watch = GradNormWatch(**{**saved.get("grad_watch", {}), "factor": spike_factor})
        return cls(**{**saved, "grad_watch": watch})

    def count_nonfinite(self, finite: bool, limit: int) -> bool:
        """Count a step whose loss or gradient was not finite (its update was skipped); True when
        ``limit`` came in a row and the run should stop."""
        if finite:
            self.nonfinite_in_a_row = 0
            return False
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        say(f"step {self.step}: non-finite loss or gradient; update skipped ({self.nonfinite_in_a_row} in a row)")
        if self.nonfinite_in_a_row < limit:
            return False
        say(f"stopping: {self.nonfinite_in_a_row} non-finite steps in a row (max_nonfinite_steps); "
            "lower lr, check the data, or resume from an earlier checkpoint")
        return True
