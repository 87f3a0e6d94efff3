"""``zero_stage: 0`` in fp32: plain data parallel, where DeepSpeed hands the step straight to the
torch optimizer. In that mode DeepSpeed clips without keeping the gradient norm and applies a
non-finite step; every other mode (ZeRO, and its bf16 optimizer at stage 0) measures the norm and
skips such a step. This wrapper gives stage 0 in fp32 the same contract, so kolm's metrics, spike
warnings and non-finite handling work unchanged: it measures the norm, skips a non-finite step
(``overflow``, which the engine reads as "step not applied") and clips as DeepSpeed would.
"""

from __future__ import annotations

import math

import torch


class CheckedOptimizer:
    """A torch optimizer whose step measures the global gradient norm, skips a non-finite step and
    clips to ``max_norm`` (0: no clipping). Everything else is the wrapped optimizer's."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float):
        self.optimizer = optimizer
        self.max_norm = max_norm
        self._global_grad_norm: float | None = None
        self.overflow = False

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def step(self, closure=None):
        grads = self._grads()
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.max_norm, norm)
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def guard(engine) -> None:
    """Give an fp32 stage-0 engine the checked optimizer; the engine's own clipping is turned off,
    as the wrapper clips after measuring the norm (the same clip DeepSpeed would apply)."""
    max_norm = engine.gradient_clipping()
    engine._config.gradient_clipping = 0.0  # else the engine clips first and the norm kept is the clipped one
    engine.optimizer = CheckedOptimizer(engine.optimizer, max_norm)


def needs_guard(engine) -> bool:
    return engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())
