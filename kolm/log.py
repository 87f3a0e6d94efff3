"""kolm's one logger: messages go to stderr as ``kolm: ...``; stdout is left to a command's results.

In a distributed run only global rank 0 speaks, unless a message concerns the rank or machine that
says it (``every_rank=True``: a lock it cleared, a signal it received). The rank is read from the
launcher's environment at each call, so the logger works before and after the process group.
"""

from __future__ import annotations

import logging
import os
import sys

_NAME = "kolm"


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the moment (pytest and redirections replace it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "every_rank", False) or rank() == 0


def rank() -> int:
    """This process's global rank as the launcher published it (0 outside a distributed job)."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def _logger() -> logging.Logger:
    logger = logging.getLogger(_NAME)
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("kolm: %(message)s"))
        handler.addFilter(_RankZero())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def say(message: str, *, every_rank: bool = False) -> None:
    """A progress or status message (rank 0 only unless ``every_rank``)."""
    _logger().info(message, extra={"every_rank": every_rank})


def warn(message: str, *, every_rank: bool = False) -> None:
    """Something the user should act on or know went wrong, without stopping the command."""
    _logger().warning(message, extra={"every_rank": every_rank})
