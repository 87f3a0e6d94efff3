"""Graceful stop: SIGUSR1, SIGUSR2 or SIGTERM ask the run to checkpoint at the next step and
exit with EXIT_REQUEUE. Ranks agree through a collective at each step boundary, so a signal
that reaches only some ranks still stops all of them at the same step."""

from __future__ import annotations

import signal
import sys

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
# "Temporary failure, try again": launchers requeue on it and only on it.
EXIT_REQUEUE = 75


class GracefulStop:
    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        # Only record: the save happens at a step boundary, so a second signal arriving
        # during the save changes nothing.
        if not self.received:
            print(f"kolm: received {signal.Signals(signum).name}; checkpointing at the next step", file=sys.stderr)
        self.received.append(signum)

    def requested(self, device) -> bool:
        """Collective: True on every rank when any rank received a stop signal."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
