"""Weights & Biases: rank 0 logs what metrics.jsonl holds, with the training step as W&B's step.

A run directory is one W&B run: its id lives in ``RUN_DIR/wandb.json``, so a resumed run
(auto-resume, a requeue, another node count) continues the same W&B run, and metrics.jsonl stays
the record W&B mirrors: a resumed run first logs the records of metrics.jsonl that W&B does not
hold (online: from the step the resumed run starts at; offline: above the highest step in the
run's own offline logs, which lose what was not yet flushed when a process was killed), then the
steps it trains, each step once. Offline mode
(``wandb_mode: offline``, or WANDB_MODE=offline) writes under ``RUN_DIR/wandb/`` on nodes without
internet; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads every segment later, in order.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
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
    prefix = f"harness/{record.get('task')}" if kind == "harness" else kind
    return {f"{prefix}/{k}": v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "kind")}


BLOCK, HEADER = 32768, 7  # the offline log: leveldb's log format, 32 KiB blocks of 7-byte-headed chunks


def _payloads(path: Path):
    """The serialized records of one offline log (run-ID.wandb); a torn tail ends the read."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        return
    pos, pending = 7, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        if len(chunk) < length:
            return
        pos += HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending
            pending = b""


def history(run_dir: Path, run_id: str) -> list[dict]:
    """Every history row (``_step`` and the logged keys) of the run's offline logs under RUN_DIR/wandb,
    oldest segment first."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for log in sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for payload in _payloads(log):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "history":
                rows.append({"_step": record.history.step.num,
                             **{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item}})
    return rows


class WandbSink:
    def __init__(self, run_dir: Path, settings: dict, config: dict):
        import wandb

        self.run_dir = run_dir
        state = self._read_state()
        mode = settings.get("wandb_mode") or os.environ.get("WANDB_MODE") or "online"
        self.run = wandb.init(project=settings["wandb_project"], entity=settings.get("wandb_entity") or None,
                              name=settings.get("wandb_name") or run_dir.resolve().name,
                              id=state.get("id") or uuid.uuid4().hex[:12], resume="allow", dir=str(run_dir),
                              mode=mode, config=config,
                              settings=wandb.Settings(console="off", x_disable_stats=True, save_code=False))
        offline = [row["_step"] for row in history(run_dir, self.run.id)]
        # Steps W&B already holds from an earlier process of this run are not logged again.
        self.floor = max(self.run.starting_step - 1, max(offline, default=-1))
        self._save()
        self.write(self._history())

    def _history(self) -> list[dict]:
        """metrics.jsonl as it stands (truncated to the resumed checkpoint), in step order."""
        from kolm.train.metrics import METRICS_FILE, read_metrics

        if not (self.run_dir / METRICS_FILE).is_file():
            return []
        found = read_metrics(self.run_dir)
        return sorted([*found.train, *found.evals, *found.other], key=lambda r: r.get("step", 0))

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
        atomic_write_json(self.run_dir / STATE, {"id": self.run.id, "project": self.run.project})

    def write(self, records: list[dict]) -> None:
        for record in records:
            step = record.get("step", 0)
            if step > self.floor:  # else W&B holds it from an earlier process of this run
                self.run.log(_numbers(record), step=step)

    def close(self) -> None:
        self.run.finish()
