"""Graceful stop: SIGUSR1, SIGUSR2 or SIGTERM ask the run to checkpoint at the next step and
exit with EXIT_REQUEUE. The training loop agrees on it through its one collective per step, so a
signal that reaches only some ranks still stops all of them at the same step."""

from __future__ import annotations

import signal

from kolm.log import say

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
            say(f"received {signal.Signals(signum).name}; checkpointing at the next step", every_rank=True)
        self.received.append(signum)

    @property
    def pending(self) -> bool:
        """This rank received a stop signal (the loop agrees on it with the others each step)."""
        return bool(self.received)

    def run_ended(self) -> None:
        """Training has returned: a stop signal from now on (a time limit's warning that raced the last
        step) is ignored, so it cannot kill a process on its way to its final exit status. Ignored, not
        handled: Python puts its own handlers back to the default while the interpreter shuts down."""
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
