"""Small file-system helpers: atomic writes, hashing, fsync."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from kolm.errors import KolmError

_HASH_BLOCK = 1 << 22


def sha256_file(path: str | os.PathLike, limit: int | None = None) -> str:
    """Hex sha256 of a file (or of its first ``limit`` bytes), read in blocks."""
    return sha256_update(hashlib.sha256(), path, limit).hexdigest()


def sha256_update(hasher: Any, path: str | os.PathLike, limit: int | None = None) -> Any:
    """Feed a file's bytes (up to ``limit``) into ``hasher`` and return it."""
    remaining = limit
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            want = _HASH_BLOCK if remaining is None else min(_HASH_BLOCK, remaining)
            block = f.read(want)
            if not block:
                break
            hasher.update(block)
            if remaining is not None:
                remaining -= len(block)
    return hasher


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, fsync, then rename over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as stable, human-readable JSON atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def swap_in_directory(tmp: Path, out: Path) -> None:
    """Put a finished directory at ``out``; one it replaces is set aside (``.NAME.old-PID``) until the
    new one is in place, so a kill in between never leaves neither."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def refuse_output_over_sources(out: str | os.PathLike, *sources: str | os.PathLike) -> None:
    """Stop before any work if replacing ``out`` would delete a source: ``out`` is one of them or a
    directory above one (--force replaces the whole directory)."""
    target = Path(out).resolve()
    for source in sources:
        src = Path(source).resolve()
        if target == src or target in src.parents:
            raise KolmError(f"--out {out} would replace {source}, which this command reads; choose an --out "
                            "outside it")
