"""A checkpoint as far as the start-up checks read it: its completion marker, with the fields
`kolm train` writes there (kolm.train.loop), for tests of those checks that need no training."""

from __future__ import annotations

import json
from pathlib import Path

from kolm.train.checkpoint import MARKER, tag_for


def write_marker(run_dir: Path, cfg, setup, step: int, **changes) -> Path:
    """RUN_DIR/checkpoints/global_stepN with the marker a run of ``cfg`` on ``setup`` writes at ``step``."""
    path = Path(run_dir) / "checkpoints" / tag_for(step)
    path.mkdir(parents=True)
    marker = {"world_size": setup.env.world_size, "zero_stage": cfg.zero_stage, "eval_loss": None,
              "consumed_samples": setup.schedule.consumed_after(step), "model_config": setup.model_config_dict,
              "seq_len": cfg.seq_len, "data_fingerprint": setup.train.fingerprint, "run_config": cfg.to_dict(),
              "total_steps": setup.total_steps, "init_from": None, "base_vocab_size": None, "files": {}, **changes}
    (path / MARKER).write_text(json.dumps(marker), encoding="utf-8")
    return path
