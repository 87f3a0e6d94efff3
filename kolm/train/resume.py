"""Resuming a run: refuse, before any engine starts, a checkpoint of another model, other data or
another optimizer schedule; then load it (through DeepSpeed's universal format on a different
number of ranks) with every rank's RNG state and kolm's own state."""

from __future__ import annotations

import torch

from kolm.errors import KolmError
from kolm.log import say
from kolm.model.presets import untie_padding
from kolm.train import checkpoint
from kolm.train.config import RunConfig
from kolm.train.lr_schedule import LRSchedule
from kolm.train.setup import RunSetup
from kolm.train.state import TrainState

# Recipe keys a checkpoint's optimizer, learning-rate schedule, batch schedule or sample order were built from.
# DeepSpeed restores the optimizer (Adam settings, weight decay, ZeRO layout, precision) from the checkpoint, and
# the learning rate and batch follow from the consumed samples and these values: a changed one would be silently
# ignored, make a schedule jump, or fail deep inside the load, so resuming refuses it. Everything else
# (micro_batch, node count, eval/log/save cadence, grad_clip, activation_checkpointing) may change between restarts.
FIXED_ON_RESUME = ("global_batch", "lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                   "warmup_steps", "zero_stage", "precision", "trainable", "rampup_batch_size")


def check_resumable(ckpt: checkpoint.Checkpoint, cfg: RunConfig, setup: RunSetup) -> None:
    """Refuse a checkpoint of a different model, different data or a different schedule. On data that
    changed (ignore_data_fingerprint), an epochs-based run keeps the checkpoint's length: ``setup`` is updated."""
    saved = ckpt.marker.get("model_config")
    if saved is not None:
        check_same_model(ckpt, saved, cfg, setup)
    saved_fp = ckpt.marker.get("data_fingerprint")
    if saved_fp is not None:
        check_same_data(ckpt, saved_fp, setup, cfg)
        if saved_fp != setup.train.fingerprint:
            keep_run_length(ckpt, cfg, setup)
    check_same_schedule(ckpt, cfg, setup)


def check_same_model(ckpt: checkpoint.Checkpoint, saved: dict, cfg: RunConfig, setup: RunSetup) -> None:
    saved, untied = untie_padding(saved)
    if untied:
        say(f"{ckpt.tag} was written with pad_token_id = EOS, which froze the EOS embedding at zero; "
            "continuing with it trainable (exported models no longer tie padding to EOS)")
    mine = setup.model_config_dict
    if saved != mine:
        keys = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        shown = ", ".join(f"{k} {saved.get(k)!r} vs {mine.get(k)!r}" for k in keys[:4])
        raise KolmError(
            f"{cfg.run_dir} holds a run of a different model ({shown}; checkpoint vs recipe): "
            "use a new run_dir for this recipe, or the recipe that run was started with"
        )


def keep_run_length(ckpt: checkpoint.Checkpoint, cfg: RunConfig, setup: RunSetup) -> None:
    """On changed data, an epochs-based run keeps the total steps (and so the learning-rate decay) it was
    started with, as a fixed train_iters would: `epochs` of the new data would move the end of the run."""
    saved, total = ckpt.marker.get("run_config", {}), ckpt.marker.get("total_steps")
    same_batches = all(saved.get(k, getattr(cfg, k)) == getattr(cfg, k) for k in ("global_batch", "rampup_batch_size"))
    by_epochs = not cfg.train_steps and not saved.get("train_steps") and saved.get("epochs", cfg.epochs) == cfg.epochs
    if total is None or total == setup.total_steps or not (by_epochs and same_batches):
        return
    full_steps = full_batch_steps(setup, total)
    say(f"ignore_data_fingerprint: the data changed; the run keeps the length {ckpt.tag} was written with, {total} "
        f"steps ({full_steps} of the full batch) and its learning-rate decay (epochs={cfg.epochs:g} of the new data "
        f"would make it {setup.total_steps} steps)")
    setup.total_steps = total
    setup.lr = LRSchedule.for_run(cfg.lr, cfg.min_lr, cfg.warmup_steps, full_steps, cfg.global_batch)


def full_batch_steps(setup: RunSetup, total_steps: int) -> int:
    """The `train_steps` (steps of the full batch) that make a run ``total_steps`` steps long."""
    return setup.schedule.consumed_after(total_steps) // setup.schedule.global_batch


def check_same_schedule(ckpt: checkpoint.Checkpoint, cfg: RunConfig, setup: RunSetup) -> None:
    """Refuse a recipe whose optimizer or schedule differs from the one the checkpoint was built with."""
    saved = {**ckpt.marker.get("run_config", {}), "total steps": ckpt.marker.get("total_steps")}
    mine = {**cfg.to_dict(), "total steps": setup.total_steps}
    diffs = [k for k in (*FIXED_ON_RESUME, "total steps") if saved.get(k) is not None and saved[k] != mine[k]]
    if not diffs:
        return
    shown = ", ".join(f"{k} {saved[k]!r} vs {mine[k]!r}" for k in diffs)
    length = ""
    if "total steps" in diffs and not {"global_batch", "rampup_batch_size"} & set(diffs):
        length = f"; for its length, train_steps={full_batch_steps(setup, saved['total steps'])}"
    raise KolmError(
        f"{cfg.run_dir} was started with different settings ({shown}; checkpoint vs recipe). The checkpoint's "
        "optimizer state comes back as it was built (Adam settings, weight decay, ZeRO layout, precision), and the "
        "learning rate and batch follow from these values and the samples consumed, so the run would not continue "
        f"as it began: resume with the original values (run_config.json in the run directory{length}), or start a "
        "new run_dir"
    )


def check_same_data(ckpt: checkpoint.Checkpoint, saved_fp: dict, setup: RunSetup, cfg: RunConfig) -> None:
    """Refuse a checkpoint whose data fingerprint differs, naming what differs in a fixed order."""
    mine = setup.train.fingerprint
    if saved_fp == mine or cfg.ignore_data_fingerprint:
        return
    diffs = [k for k in mine if saved_fp.get(k) != mine[k]] + sorted(set(saved_fp) - set(mine))
    raise KolmError(
        f"{ckpt.path} was trained on different data ({', '.join(diffs)} differ); use the original data, "
        "a new run_dir, or pass ignore_data_fingerprint=true to continue anyway"
    )


def needs_universal(ckpt: checkpoint.Checkpoint, setup: RunSetup) -> bool:
    """ZeRO state written by another number of ranks loads only through the universal format. Stage 0
    (plain data parallel) keeps the whole optimizer state in rank 0's file, which any number of ranks
    loads as it is."""
    return ckpt.marker.get("zero_stage") != 0 and ckpt.marker.get("world_size") != setup.env.world_size


def prepare_universal(ckpt: checkpoint.Checkpoint, setup: RunSetup, ds_config: dict) -> dict:
    """Convert the checkpoint once (rank 0, the others wait) and ask DeepSpeed to load it so."""
    if setup.env.is_main:
        checkpoint.to_universal(ckpt)
    torch.distributed.barrier()
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def restore(engine, cfg: RunConfig, setup: RunSetup, ckpt: checkpoint.Checkpoint) -> TrainState:
    """Load a checkpoint into the engine and this rank's RNG; returns kolm's state from it."""
    if needs_universal(ckpt, setup):
        _, client = engine.load_checkpoint(str(ckpt.path), tag=checkpoint.UNIVERSAL)
    else:
        _, client = engine.load_checkpoint(str(ckpt.path.parent), tag=ckpt.tag)
    if client is None:
        raise KolmError(f"{ckpt.path}: DeepSpeed could not load it; remove it to fall back to an earlier one")
    check_same_data(ckpt, client["data_fingerprint"], setup, cfg)
    if not checkpoint.load_rng(ckpt.path, setup.env.rank):
        say(f"{ckpt.tag} has no RNG state for rank {setup.env.rank}; continuing with a fresh one", every_rank=True)
    return TrainState.from_client(client["kolm_state"], cfg.grad_spike_factor)
