"""`kolm train --check`: every start-up check of a real launch, without a process group or a device.

The config, data, tokenizer and model as the launch will see them; the batch layout and ramp for the
number of ranks the launch will use (``--ranks``; default the launcher's world size, or 1); and, when
the run directory holds a complete checkpoint, the same resume check the real start runs."""

from __future__ import annotations

from pathlib import Path

from kolm.train import checkpoint
from kolm.train.config import RunConfig
from kolm.train.resume import check_resumable, needs_universal
from kolm.train.setup import RunSetup, prepare


def check_launch(cfg: RunConfig, ranks: int | None = None) -> str:
    """What `kolm train --check` prints when the launch would start; any problem is a KolmError."""
    setup = prepare(cfg, ranks)
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    resume = checkpoint.find_resume(ckpt_dir)
    if resume:
        check_resumable(resume, cfg, setup)  # may keep the checkpoint's run length: before describe()
    n = setup.env.world_size
    checked = f"config OK (checked for {n} rank{'s' if n != 1 else ''}): {setup.describe()}"
    return f"{checked}\n{start_line(setup, resume, ckpt_dir)}"


def start_line(setup: RunSetup, resume: checkpoint.Checkpoint | None, ckpt_dir: Path) -> str:
    """Where the launch starts: a new run, or the checkpoint it resumes from."""
    if resume is None:
        return f"starts a new run: no complete checkpoint in {ckpt_dir}"
    done = f"step {resume.step} of {setup.total_steps}, {resume.marker.get('consumed_samples', '?')} samples consumed"
    text = f"resumes from {resume.tag} ({done})"
    if needs_universal(resume, setup):
        text += (f"; written on {resume.marker.get('world_size')} ranks, it is converted once to DeepSpeed's "
                 f"universal checkpoint format for {setup.env.world_size}")
    return text

