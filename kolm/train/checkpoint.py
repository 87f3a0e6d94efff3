"""Checkpoints: DeepSpeed's own layout (`global_stepN/`, `latest`) plus kolm's client state,
per-rank RNG states and a completion marker written only after every rank finished writing.

Resume always uses the newest checkpoint whose marker exists and whose recorded files are all
present with their recorded sizes; anything else is skipped, and the reason is said.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kolm import log
from kolm.errors import KolmError
from kolm.files import atomic_write_bytes, atomic_write_json, read_json
from kolm.model.split_rows import merge_split_rows

MARKER = "kolm_complete.json"
_TAG = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def read_marker(path: Path) -> dict:
    return read_json(path / MARKER)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    marker: dict

    @property
    def tag(self) -> str:
        return self.path.name


def _tagged_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
    return sorted(found, reverse=True)


def why_incomplete(path: Path) -> str | None:
    """None when the checkpoint is complete; otherwise what is wrong with it."""
    marker_path = path / MARKER
    if not marker_path.is_file():
        return "no completion marker (a save was interrupted)"
    try:
        marker = read_json(marker_path)
    except ValueError:
        return "unreadable completion marker"
    for rel, size in marker.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, expected {size}"
    return None


def complete_checkpoints(ckpt_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints, newest first."""
    return [Checkpoint(p, s, read_json(p / MARKER)) for s, p in _tagged_dirs(ckpt_dir) if why_incomplete(p) is None]


def find_resume(ckpt_dir: Path, say: Callable[[str], None] = log.say) -> Checkpoint | None:
    """The newest complete checkpoint, telling the user about any newer one it had to skip (and
    about a `latest` file that names a missing or incomplete one: kolm never trusts it)."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        named = latest.read_text(errors="replace").strip()
        if not (ckpt_dir / named).is_dir() or why_incomplete(ckpt_dir / named) is not None:
            say(f"{latest} names {named!r}, which is missing or incomplete; ignoring it")
    for step, path in _tagged_dirs(ckpt_dir):
        problem = why_incomplete(path)
        if problem is None:
            return Checkpoint(path, step, read_json(path / MARKER))
        say(f"skipping checkpoint {path.name}: {problem}; falling back to an earlier one")
    return None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, client_state: dict, rank: int, barrier: Callable[[], None],
         marker_extra: dict) -> Path:
    """Collective save: DeepSpeed writes model and optimizer shards, each rank its RNG state,
    then (after a barrier) rank 0 records every file and its size in the marker and points
    `latest` at the new tag."""
    tag = tag_for(step)
    path = ckpt_dir / tag
    if rank == 0 and path.exists():
        # Left by an interrupted save of this step (resume always starts below it): start clean,
        # so that no stale file, and no stale marker, mixes into the new checkpoint.
        _remove(path)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    rng_file = path / f"rng_rank{rank}.pt"
    tmp = rng_file.with_suffix(".tmp")
    torch.save(rng_state(), tmp)
    os.replace(tmp, rng_file)
    barrier()
    if rank == 0:
        files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*"))
                 if f.is_file() and f.name != MARKER}
        atomic_write_json(path / MARKER, {"step": step, "files": files, **marker_extra})
        atomic_write_bytes(ckpt_dir / "latest", tag.encode())
    barrier()
    return path


def write_failed(ckpt_dir: Path, step: int, error: BaseException) -> KolmError:
    """The error for a save that failed (a full disk, usually): what broke, and that nothing is lost."""
    free = shutil.disk_usage(ckpt_dir).free if ckpt_dir.exists() else 0
    done = complete_checkpoints(ckpt_dir)
    kept = f"The newest complete checkpoint, {done[0].path.name}, is intact" if done else "No checkpoint is complete"
    return KolmError(
        f"writing checkpoint {tag_for(step)} in {ckpt_dir} failed ({error}); {free / 2**20:.1f} MiB free there. "
        f"{kept}: free space (or lower keep_checkpoints) and re-run the same command to resume"
    )


def load_rng(path: Path, rank: int) -> bool:
    """Restore this rank's RNG state when the checkpoint has one for it."""
    f = path / f"rng_rank{rank}.pt"
    if not f.is_file():
        return False
    # Our own file from this run directory: a plain dict of RNG states.
    set_rng_state(torch.load(f, weights_only=False))
    return True


UNIVERSAL = "universal"


def to_universal(ckpt: Checkpoint, say: Callable[[str], None] = log.say) -> Path:
    """Convert a checkpoint to DeepSpeed's universal format (once; kept beside it), the
    supported way to resume ZeRO state on a different number of data-parallel ranks."""
    import subprocess
    import sys

    out = ckpt.path / UNIVERSAL
    done = ckpt.path / f"{UNIVERSAL}.complete"
    if done.is_file():
        return out
    say(f"{ckpt.tag} was written by {ckpt.marker.get('world_size')} ranks; converting it to a universal checkpoint")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt.path),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"universal checkpoint conversion of {ckpt.path} failed:\n{proc.stderr[-3000:]}")
    atomic_write_bytes(done, b"ok\n")
    return out


def prune(ckpt_dir: Path, keep: int, say: Callable[[str], None] = log.say) -> None:
    """Keep the newest ``keep`` complete checkpoints and the best by eval loss; remove older
    ones and interrupted saves older than the newest complete checkpoint. Rank 0 only."""
    for stale in ckpt_dir.glob(".deleting-*"):  # a removal that was interrupted
        shutil.rmtree(stale, ignore_errors=True)
    complete = complete_checkpoints(ckpt_dir)
    if not complete:
        return
    scored = [c for c in complete if c.marker.get("eval_loss") is not None]
    best = min(scored, key=lambda c: c.marker["eval_loss"]) if scored else None
    keep_paths = {c.path for c in complete[:keep]} | ({best.path} if best else set())
    newest = complete[0].step
    for step, path in _tagged_dirs(ckpt_dir):
        if path in keep_paths or step >= newest:
            continue
        _remove(path)
        say(f"removed old checkpoint {path.name}")


def _remove(path: Path) -> None:
    """Rename, then delete: an interrupted removal leaves a `.deleting-*` directory, never a
    half-deleted checkpoint under its own name."""
    trash = path.with_name(f".deleting-{path.name}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def best_checkpoint(ckpt_dir: Path) -> Checkpoint | None:
    scored = [c for c in complete_checkpoints(ckpt_dir) if c.marker.get("eval_loss") is not None]
    return min(scored, key=lambda c: c.marker["eval_loss"]) if scored else None


def consolidated_state_dict(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """fp32 weights by their Hugging Face names, gathered from every rank's ZeRO partition (ZeRO-1,
    -2 or -3), frozen parameters included."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor

    if ckpt.marker.get("zero_stage") == 0:
        return merge_split_rows(_plain_state_dict(ckpt))
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.path.parent), tag=ckpt.tag, lazy_mode=True)
    state = {k: v.float() for k, v in to_torch_tensor(lazy).items()}
    if ckpt.marker.get("run_config", {}).get("trainable", "all") != "all":
        state = {**_frozen_parameters(ckpt, state), **state}
    return merge_split_rows(state)


def _plain_state_dict(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """A stage-0 checkpoint (plain data parallel): rank 0's file holds the whole model; in bf16 the
    module is rounded and the fp32 master copies are the optimizer's (DeepSpeed's bf16 optimizer for
    stage 0: one flat tensor per group, or one tensor per parameter), in the groups' order."""
    saved = torch.load(ckpt.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    buffers = set(saved.get("buffer_names") or ())
    state = {k: v.float() for k, v in saved["module"].items() if k not in buffers}
    optimizer = saved.get("optimizer") or {}
    masters = optimizer.get("fp32_groups_flat", optimizer.get("fp32_groups"))
    if masters is None:  # fp32: the module is the master copy
        return state
    names = ckpt.marker.get("param_group_names")
    if names is None or len(names) != len(masters):
        raise KolmError(f"{ckpt.path}: a bf16 stage-0 checkpoint without the order of its master weights in "
                        f"{MARKER}; it was not written by kolm train")
    for group, master in zip(names, masters):
        flat = master if isinstance(master, torch.Tensor) else torch.cat([t.flatten() for t in master])
        offset = 0
        for name in group:
            n = state[name].numel()
            state[name] = flat[offset:offset + n].view(state[name].shape).float().clone()
            offset += n
    return state


def _frozen_parameters(ckpt: Checkpoint, found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters DeepSpeed's consolidation leaves out (ZeRO-1 omits frozen ones), from the saved
    module state, which holds them whole under ZeRO-1 and -2."""
    path = ckpt.path / "mp_rank_00_model_states.pt"
    if not path.is_file():
        return {}
    module = torch.load(path, map_location="cpu", weights_only=False).get("module") or {}
    return {k: v.float() for k, v in module.items() if k not in found and v.numel() > 0}


def resolve_checkpoint(src: str | os.PathLike, tag: str | None = None, best: bool = False) -> Checkpoint:
    """A run directory (newest complete checkpoint, or ``tag``, or the best), a checkpoints
    directory, or one checkpoint directory."""
    p = Path(src)
    if not p.exists():
        raise KolmError(f"{p}: no such run or checkpoint directory")
    if (p / MARKER).is_file() or step_of(p.name) is not None:
        return _complete(p)
    ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if tag:
        return _complete(ckpt_dir / tag)
    if best:
        found = best_checkpoint(ckpt_dir)
        if found is None:
            raise KolmError(f"{ckpt_dir}: no complete checkpoint with an eval loss; drop --best or pass --tag")
        return found
    found = find_resume(ckpt_dir)
    if found is None:
        raise KolmError(f"{p}: no complete checkpoint found (looked for {ckpt_dir}/global_stepN/{MARKER})")
    return found


def _complete(path: Path) -> Checkpoint:
    if not path.is_dir():
        raise KolmError(f"{path}: no such checkpoint")
    problem = why_incomplete(path)
    if problem:
        raise KolmError(f"{path}: checkpoint is incomplete ({problem}); convert an earlier one with --tag")
    return Checkpoint(path, step_of(path.name) or 0, read_marker(path))
