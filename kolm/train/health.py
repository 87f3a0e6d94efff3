"""Step health: gradient-norm spikes that clipping would silently swallow.

With clipping at 1.0, a step whose gradient norm (before clipping) is 1e16 applies an update
scaled by 1e-16: the step is lost without any error. A norm far above the run's recent typical
value is what a degenerate input produces (a zero residual stream meeting a LayerNorm, a corrupt
batch), so it is said, naming the step, and counted in metrics.jsonl.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

HISTORY = 100  # recent normal steps the typical norm is taken from


@dataclass
class GradNormWatch:
    """Running median of recent gradient norms; spikes are judged against it, and before there
    is any history against the clipping threshold. Its state travels in checkpoints."""

    factor: float = 1e4  # a norm above factor x the reference is a spike; 0 disables the watch
    history: list[float] = field(default_factory=list)
    spikes: int = 0

    def reference(self, clip: float) -> float:
        return statistics.median(self.history) if self.history else (clip if clip > 0 else 1.0)

    def observe(self, step: int, norm: float | None, clip: float) -> str | None:
        """A warning when ``norm`` is a spike (it is then left out of the history), else None."""
        if not self.factor or norm is None or not math.isfinite(norm):
            return None
        ref = self.reference(clip)
        if norm > self.factor * ref:
            self.spikes += 1
            return (f"step {step}: gradient norm {norm:.3g} before clipping is {norm / ref:.2g} x the typical "
                    f"{ref:.3g}; clipping scales this update to almost nothing. A batch with a degenerate "
                    "window (or corrupt data) does this; it is counted as grad_norm_spikes in metrics.jsonl")
        self.history = [*self.history[-(HISTORY - 1):], norm]
        return None

