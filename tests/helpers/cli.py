"""Run the `kolm` command line in a child interpreter."""

from __future__ import annotations

import subprocess
import sys


def run_kolm(*args: str, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run the `kolm` command line in a fresh interpreter, capturing its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "kolm", *map(str, args)], capture_output=True, text=True, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kolm {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc
