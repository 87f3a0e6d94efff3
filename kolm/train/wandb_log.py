"""Weights & Biases: rank 0 logs what metrics.jsonl holds, with the training step as W&B's step.

A run directory is one W&B run: its id lives in ``RUN_DIR/wandb.json`` beside the highest step
logged so far, so a resumed run (auto-resume, a requeue, another node count) continues the same
W&B run, and the steps it replays after its checkpoint are not logged twice. Offline mode
(``wandb_mode: offline``, or WANDB_MODE=offline) writes under ``RUN_DIR/wandb/`` on nodes without
internet; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads every segment later, in order.
"""

from __future__ import annotations

import importlib
import json
import os
import uuid
from pathlib import Path

from kolm.errors import KolmError
from kolm.files import atomic_write_json

STATE = "wandb.json"


def check_available() -> None:
    """`--check`'s test: a recipe that asks for W&B needs the package."""
    try:
        importlib.import_module("wandb")
    except ImportError as e:
        raise KolmError(f"wandb_project is set but the wandb package cannot be imported ({e}): "
                        "`pip install 'kolm[wandb]'`, or leave wandb_project empty") from None


def _numbers(record: dict) -> dict:
    """A record's figures under W&B keys: ``train/loss``, ``eval/eval_loss/books``, ..."""
    kind = record.get("kind", "train")
    return {f"{kind}/{k}": v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "kind")}


class WandbSink:
    def __init__(self, run_dir: Path, settings: dict, config: dict):
        import wandb

        self.run_dir = run_dir
        state = self._read_state()
        self.floor = state.get("last_step", -1)  # logged by an earlier process of this run
        mode = settings.get("wandb_mode") or os.environ.get("WANDB_MODE") or "online"
        self.run = wandb.init(project=settings["wandb_project"], entity=settings.get("wandb_entity") or None,
                              name=settings.get("wandb_name") or run_dir.resolve().name,
                              id=state.get("id") or uuid.uuid4().hex[:12], resume="allow", dir=str(run_dir),
                              mode=mode, config=config,
                              settings=wandb.Settings(console="off", x_disable_stats=True, save_code=False))
        self.last = self.floor
        self._save()

    def _read_state(self) -> dict:
        path = self.run_dir / STATE
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise KolmError(f"{path} is damaged ({e}); remove it to start a new W&B run for this run directory") \
                from None

    def _save(self) -> None:
        atomic_write_json(self.run_dir / STATE, {"id": self.run.id, "last_step": self.last})

    def write(self, records: list[dict]) -> None:
        logged = False
        for record in records:
            step = record.get("step", 0)
            if step <= self.floor:
                continue  # replayed after a resume: logged before
            self.run.log(_numbers(record), step=step)
            self.last, logged = max(self.last, step), True
        if logged:
            self._save()

    def close(self) -> None:
        self.run.finish()
