"""Checkpoint averaging for `kolm convert --average K` and `--tags A,B,...`: the element-wise mean
of the fp32 master weights of several checkpoints of one run.

Each checkpoint is consolidated on its own (DeepSpeed's `zero_to_fp32`, any ZeRO stage, any number
of ranks) and added into a running fp32 sum, so memory stays at about two fp32 copies of the model
whatever K is. Checkpoints of another shape, another tokenizer or another run are refused before
any weight is read, naming the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kolm.errors import KolmError
from kolm.files import sha256_file
from kolm.log import say
from kolm.train import checkpoint
from kolm.train.checkpoint import Checkpoint
from kolm.train.resume import FIXED_ON_RESUME

# What one run keeps from its first step to its last (a resume that changed any is refused).
RUN_IDENTITY = ("seed", *FIXED_ON_RESUME)


def select_checkpoints(src: str, average: int = 0, tags: list[str] | None = None) -> list[Checkpoint]:
    """The checkpoints to average, newest first: the newest ``average`` complete ones, or ``tags``."""
    ckpt_dir = _checkpoints_dir(Path(src))
    if tags:
        if len(set(tags)) != len(tags):
            raise KolmError(f"--tags names a checkpoint twice: {','.join(tags)}")
        found = [checkpoint.resolve_checkpoint(ckpt_dir, tag=t) for t in tags]
        return sorted(found, key=lambda c: c.step, reverse=True)
    if average < 1:
        raise KolmError(f"--average takes the number of checkpoints to average (1 or more), got {average}")
    complete = checkpoint.complete_checkpoints(ckpt_dir)
    if len(complete) < average:
        have = ", ".join(c.tag for c in complete) or "none"
        raise KolmError(f"--average {average}: {ckpt_dir} has {len(complete)} complete checkpoint"
                        f"{'s' * (len(complete) != 1)} ({have}); average fewer, or keep more (keep_checkpoints)")
    return complete[:average]


def _checkpoints_dir(p: Path) -> Path:
    if not p.is_dir():
        raise KolmError(f"{p}: no such run or checkpoints directory")
    if (p / checkpoint.MARKER).is_file() or checkpoint.step_of(p.name) is not None:
        raise KolmError(f"{p} is one checkpoint; averaging takes the run directory (or its checkpoints/)")
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def check_same_run(ckpts: list[Checkpoint]) -> None:
    """Every checkpoint has the first one's shape, tokenizer and run; the error names the odd one."""
    first = ckpts[0]
    for other in ckpts[1:]:
        odd = f"{other.tag} ({other.path})"
        shape, mine = other.marker.get("model_config"), first.marker.get("model_config")
        if shape != mine:
            keys = sorted(k for k in set(shape or {}) | set(mine or {}) if (shape or {}).get(k) != (mine or {}).get(k))
            raise KolmError(f"cannot average {odd} with {first.tag}: another model shape ({', '.join(keys[:4])} "
                            "differ)")
        if _tokenizer_id(other) != _tokenizer_id(first):
            raise KolmError(f"cannot average {odd} with {first.tag}: trained with another tokenizer "
                            f"({other.marker.get('tokenizer')} vs {first.marker.get('tokenizer')})")
        diffs = _run_differences(first, other)
        if diffs:
            raise KolmError(f"cannot average {odd} with {first.tag}: it belongs to another run ({', '.join(diffs)} "
                            "differ); average checkpoints of one run")


def _tokenizer_id(ckpt: Checkpoint) -> str:
    """The tokenizer's content hash where its directory still exists, else its recorded path."""
    path = Path(str(ckpt.marker.get("tokenizer", "")))
    return sha256_file(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else str(path)


def _run_differences(a: Checkpoint, b: Checkpoint) -> list[str]:
    ra, rb = a.marker.get("run_config", {}), b.marker.get("run_config", {})
    diffs = [k for k in RUN_IDENTITY if ra.get(k) != rb.get(k)]
    for key in ("data_fingerprint", "total_steps", "init_from"):
        if a.marker.get(key) != b.marker.get(key):
            diffs.append(key)
    return diffs


def average_weights(ckpts: list[Checkpoint]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the checkpoints' fp32 weights (a running sum, then one division)."""
    total: dict[str, torch.Tensor] | None = None
    for ckpt in ckpts:
        say(f"adding {ckpt.tag} to the average ({len(ckpts)} checkpoints)")
        state = checkpoint.consolidated_state_dict(ckpt)
        if total is None:
            total = {k: v.to(torch.float32, copy=True) for k, v in state.items()}
        else:
            _check_tensors(total, state, ckpt)
            for k, v in state.items():
                total[k].add_(v)
        del state
    for v in total.values():
        v.div_(len(ckpts))
    return total


def _check_tensors(total: dict[str, torch.Tensor], state: dict[str, torch.Tensor], ckpt: Checkpoint) -> None:
    if set(total) != set(state):
        odd = sorted(set(total) ^ set(state))[:4]
        raise KolmError(f"cannot average {ckpt.tag} ({ckpt.path}): its weights differ in name ({', '.join(odd)})")
    for k, v in state.items():
        if v.shape != total[k].shape:
            raise KolmError(f"cannot average {ckpt.tag} ({ckpt.path}): {k} has shape {tuple(v.shape)}, "
                            f"the others {tuple(total[k].shape)}")
