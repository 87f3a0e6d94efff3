"""A slow disk for one rank's checkpoint files (tests/test_hang.py): imported at start-up by a
Python that has this folder first on PYTHONPATH.

When KOLM_TEST_SLOW_DIR is set and RANK is KOLM_TEST_SLOW_RANK, `torch.save` into a path under
that directory writes its bytes at KOLM_TEST_SLOW_BPS bytes per second, a few KiB at a time, as a
congested network filesystem does: the save really takes that long and its file really grows
throughout. The time of the first and of the last such write go to KOLM_TEST_SLOW_LOG."""

import os
import time

CHUNK = 8192


class _SlowFile:
    def __init__(self, f, rate: float, log: str):
        self.f, self.rate, self.log = f, rate, log

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for i in range(0, len(view), CHUNK):
            piece = view[i:i + CHUNK]
            self.f.write(piece)
            self.f.flush()
            with open(self.log, "a") as log:
                log.write(f"{time.time()}\n")
            time.sleep(len(piece) / self.rate)
        return len(view)

    def flush(self) -> None:
        self.f.flush()


def _install(slow_dir: str, rate: float, log: str) -> None:
    import torch

    plain_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and os.path.abspath(f).startswith(slow_dir):
            with open(f, "wb") as raw:
                return plain_save(obj, _SlowFile(raw, rate, log), *args, **kwargs)
        return plain_save(obj, f, *args, **kwargs)

    torch.save = save


if os.environ.get("KOLM_TEST_SLOW_DIR") and os.environ.get("RANK") == os.environ.get("KOLM_TEST_SLOW_RANK"):
    _install(os.path.abspath(os.environ["KOLM_TEST_SLOW_DIR"]), float(os.environ["KOLM_TEST_SLOW_BPS"]),
             os.environ["KOLM_TEST_SLOW_LOG"])
