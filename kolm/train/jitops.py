"""DeepSpeed's just-in-time built ops, loaded so that a killed process cannot wedge later runs.

torch guards every extension load with a bare lock file in the build folder, taken even when
nothing needs building. A process killed inside that window (preemption, a time limit, the OOM
killer, a user's Ctrl-C twice) leaves the file behind, and from then on every DeepSpeed start on
that machine, or on every node sharing that home directory, waits on it forever without a word.

kolm loads the ops itself before the process group exists, one process at a time, under an
`flock` that the kernel drops when its holder dies. Inside it no other kolm process can be
loading, so a torch lock file found there was left by a dead process and is removed.

The ops are built in a cache of kolm's own (``$XDG_CACHE_HOME/kolm/torch_extensions/...``, set as
TORCH_EXTENSIONS_DIR unless the user set one), so that clearing a stale lock can never touch a
live build of another DeepSpeed program sharing torch's default cache.

DeepSpeed's builder reads TORCH_CUDA_ARCH_LIST but cannot parse the architecture-specific entries
that PyTorch's own CUDA images put there (``9.0a`` on Hopper, ``10.0f``): every op build then fails
with ``invalid literal for int()``. kolm hands DeepSpeed the plain numbers instead; its ops use no
architecture-specific instructions.
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kolm.log import say

# The ops DeepSpeed builds while kolm starts, per accelerator: shared-memory collectives on CPU,
# the fused Adam of kolm's optimizer on GPUs. Ops that are missing or incompatible here are
# skipped, as DeepSpeed does.
START_UP_OPS = {"cpu": ("ShareMemCommBuilder",), "cuda": ("FusedAdamBuilder",)}
GUARD_NAME = ".kolm-jit.lock"
_ARCH_SUFFIX = re.compile(r"^(\d+\.\d+)[a-z]+(\+PTX)?$")


def deepspeed_arch_list(value: str) -> str:
    """TORCH_CUDA_ARCH_LIST as DeepSpeed's builder can parse it: ``8.0 9.0a+PTX`` -> ``8.0;9.0+PTX``."""
    entries = [e for e in value.replace(" ", ";").split(";") if e]
    plain = [(m.group(1) + (m.group(2) or "")) if (m := _ARCH_SUFFIX.match(e)) else e for e in entries]
    return ";".join(dict.fromkeys(plain))


def fix_arch_list() -> None:
    """Rewrite TORCH_CUDA_ARCH_LIST, where needed, to what DeepSpeed can build for."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    fixed = deepspeed_arch_list(value)
    if fixed != value.replace(" ", ";"):
        say(f"TORCH_CUDA_ARCH_LIST={value!r} has entries DeepSpeed cannot build for; using {fixed!r}")
        os.environ["TORCH_CUDA_ARCH_LIST"] = fixed


def extensions_root() -> Path:
    """Where this process builds extensions: $TORCH_EXTENSIONS_DIR, which kolm sets to its own
    cache unless the user chose one (per Python and accelerator build, as torch's own default)."""
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    if configured:
        return Path(configured)
    import torch

    build = f"py{sys.version_info.major}{sys.version_info.minor}_" + (
        f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = cache / "kolm" / "torch_extensions" / build
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    return root


@contextmanager
def exclusive(root: Path) -> Iterator[None]:
    """Hold kolm's guard on ``root``; released by the kernel if this process dies."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / GUARD_NAME, "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def stale_batons(root: Path) -> list[Path]:
    """torch's lock files under ``root`` (one per extension, one or two folders down)."""
    return sorted(p for pattern in ("*/lock", "*/*/lock") for p in root.glob(pattern) if p.is_file())


def load_start_up_ops() -> None:
    """Build or load DeepSpeed's start-up ops now, so init_distributed finds them loaded."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    root = extensions_root()  # also for any op DeepSpeed builds later
    fix_arch_list()
    names = START_UP_OPS.get(get_accelerator().device_name(), ())
    builders = [get_accelerator().create_op_builder(name) for name in names]
    builders = [b for b in builders if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False)]
    if not builders:
        return
    with exclusive(root):
        for baton in stale_batons(root):
            # Said by whichever rank gets here first, not only rank 0: it concerns this machine.
            say(f"removing {baton}, left by a process killed while loading a DeepSpeed op", every_rank=True)
            baton.unlink(missing_ok=True)
        for builder in builders:
            builder.load(verbose=False)
