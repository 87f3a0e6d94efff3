"""`kolm train`: PhiForCausalLM on packed shards with a DeepSpeed engine, resumable at any step.

Runs unchanged under torchrun, the deepspeed launcher, srun and submitit (see kolm.train.distenv).
Exit status: 0 finished, EXIT_REQUEUE (75) stopped by a signal after a checkpoint, 2 bad input,
3 too many non-finite steps in a row, 4 the launcher died (kolm.train.watchdog), 5 no progress
for hang_timeout seconds (kolm.train.hang).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from kolm.files import atomic_write_json
from kolm.log import say
from kolm.model.documents import attention_inputs
from kolm.train import checkpoint, evaluation
from kolm.train.config import RunConfig
from kolm.train.engine import build_engine, join_process_group
from kolm.train.hang import HangWatch, agree_launch
from kolm.train.hardware import device_peak_flops
from kolm.train.metrics import MetricSinks, ProgressDisplay, StepWindow
from kolm.train.resume import check_resumable, needs_universal, prepare_universal, restore
from kolm.train.runlock import RunLock, check_not_held_by_another_launch
from kolm.train.setup import prepare
from kolm.train.signals import EXIT_REQUEUE, GracefulStop
from kolm.train.state import TrainState
from kolm.train.watchdog import watch_launcher

EXIT_NONFINITE = 3


def train(cfg: RunConfig, stop: GracefulStop | None = None, on_hang: Callable[[], None] | None = None) -> int:
    """The training loop. Returns the process exit status.

    Pass `stop` installed as early as possible: a stop signal that arrives while the engine
    starts is then honoured at the first step instead of killing the process. ``on_hang`` runs
    on a rank whose watchdog found a hang, just before it exits (a launcher's requeue)."""
    own_stop = stop is None
    stop = stop or GracefulStop()
    t = None
    try:
        t = Trainer(cfg, on_hang)
        if cfg.eval_at_start and t.state.step == 0 and t.setup.valid:
            t.evaluate()
        while not t.done:
            loss = t.train_step()
            stopping, finite = t.agree(stop.pending, loss)
            give_up = t.state.count_nonfinite(finite, cfg.max_nonfinite_steps)
            t.record(loss)
            if give_up:
                return t.finish(EXIT_NONFINITE)
            eval_loss = t.evaluate() if t.due(cfg.eval_every) and t.setup.valid else None
            if t.due(cfg.save_every) or stopping:
                t.save(eval_loss)
            elif t.due(cfg.log_every):
                t.flush_metrics(timed=True)
            if stopping and not t.done:
                return t.finish(EXIT_REQUEUE)
        return t.finish(0)
    finally:
        if t is not None:
            t.hang.stop()
        stop.restore() if own_stop else stop.run_ended()  # a caller's handlers stay until it exits


class Trainer:
    """One training run: the engine, its state, and what happens around each step."""

    def __init__(self, cfg: RunConfig, on_hang: Callable[[], None] | None = None):
        self.cfg = cfg
        self.setup = prepare(cfg)
        self.watch = watch_launcher(self.setup.env)
        env = self.setup.env
        self.hang = HangWatch(cfg.hang_timeout, Path(cfg.run_dir), env.rank, env.world_size, on_hang)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.rank0 = self.setup.env.is_main
        resume = checkpoint.find_resume(self.ckpt_dir)
        if resume:
            check_resumable(resume, cfg, self.setup)
        self.lock = self._lock_run_dir()
        self.init_record = resume.marker.get("init_from") if resume else None
        self.engine = self._start(resume)
        self.device = self.engine.device
        self.state = restore(self.engine, cfg, self.setup, resume) if resume else TrainState.fresh(
            cfg.grad_spike_factor)
        if resume:
            say(f"resuming from {resume.tag}: step {self.state.step}, {self.state.consumed_samples} samples consumed")
        self.sinks = MetricSinks(self.run_dir, self.rank0, cfg.tensorboard)
        self.sinks.truncate_after(self.state.step)
        self.sinks.wandb = self._wandb()  # after the truncation: it mirrors metrics.jsonl
        self.window = self._step_window()
        self.progress = ProgressDisplay(self.rank0, self.setup.total_steps, self.state.step)
        self.epochs = self.setup.train.epochs(self.state.consumed_samples)
        schedule = self.setup.schedule
        self.batch = schedule.batch_at(self.state.consumed_samples)  # of the step about to run
        self.batches = self.setup.train.rank_batches(self.state.consumed_samples, cfg.global_batch, cfg.micro_batch,
                                                     self.setup.env.rank, self.setup.env.world_size,
                                                     schedule.batch_at if schedule.ramped else None)
        self.hang.start(agree_launch(self.device), self.state.step)  # start-up ends here

    def _lock_run_dir(self) -> RunLock | None:
        """One writer per run directory: refused here, before anything is written, when in use."""
        if self.rank0:
            return RunLock(self.run_dir).acquire()
        check_not_held_by_another_launch(self.run_dir)
        return None

    def _start(self, resume: checkpoint.Checkpoint | None):
        join_process_group(self.setup.env)
        ds_config = self.setup.ds_config
        if resume is not None and needs_universal(resume, self.setup):
            ds_config = prepare_universal(resume, self.setup, ds_config)
        if self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run_dir / "run_config.json", self.cfg.to_dict())
            atomic_write_json(self.run_dir / "ds_config.json", ds_config)
        return build_engine(self.setup.model_config, ds_config, self.cfg.seed, self.cfg.weight_decay,
                            self.cfg.activation_checkpointing, self.cfg.compile, self._init_state(resume),
                            self.setup.trainable, fp8=self.cfg.precision == "fp8")

    def _init_state(self, resume: checkpoint.Checkpoint | None) -> dict | None:
        """The weights the model is built with: init_from's for a fresh run (rank 0 records their
        hash); a resumed run with frozen parts takes its own checkpoint's, so frozen parameters are
        right whatever DeepSpeed restores (a universal checkpoint holds optimizer-owned ones only)."""
        source = self.setup.source
        if resume is not None:
            if self.cfg.init_from and self.rank0:
                say(f"init_from {self.cfg.init_from} ignored: the run resumes from its own checkpoint {resume.tag}")
            return None if self.setup.trainable.everything else checkpoint.consolidated_state_dict(resume)
        if source is None:
            return None
        state = source.state_dict()
        if self.rank0:
            self.init_record = source.record(state)
            say(f"starting from {source.label()} (weights sha256 {self.init_record['weights_sha256'][:16]}...)")
        return state

    def _wandb(self):
        """Rank 0's W&B run when the recipe names a project (kolm.train.wandb_log)."""
        if not (self.rank0 and self.cfg.wandb_project):
            return None
        from kolm.train.wandb_log import WandbSink

        config = {**self.cfg.to_dict(), "model_config": self.setup.model_config_dict,
                  "parameters": self.setup.n_params, "world_size": self.setup.env.world_size}
        return WandbSink(self.run_dir, self.cfg.to_dict(), config)

    def _step_window(self) -> StepWindow:
        cfg, setup = self.cfg, self.setup
        # fp8 runs are measured against the bf16 peak: their MFU is bf16-equivalent (kolm.model.fp8)
        peak, source = device_peak_flops(self.device, torch.float32 if cfg.precision == "fp32" else torch.bfloat16)
        ramp = (f" (ramped up from {setup.schedule.start}, {setup.accumulation(setup.schedule.start)} accumulation, "
                f"over {setup.schedule.samples:,} samples)" if setup.schedule.ramped else "")
        say(f"{setup.model_name}: {setup.n_params / 1e6:.1f}M parameters, {setup.env.world_size} ranks x micro "
            f"batch {cfg.micro_batch} x {setup.grad_accum} accumulation = global batch {cfg.global_batch}{ramp}; "
            f"{setup.total_steps} steps; peak {peak / 1e9:.1f} GFLOP/s per device ({source})"
            + ("; fp8: MFU is bf16-equivalent (model FLOPs over the bf16 peak)" if cfg.precision == "fp8" else ""))
        return StepWindow(cfg.seq_len, setup.env.world_size, setup.flops_per_token, peak,
                          "bf16-equivalent" if cfg.precision == "fp8" else "")

    @property
    def done(self) -> bool:
        return self.state.step >= self.setup.total_steps

    def due(self, every: int) -> bool:
        """True on multiples of ``every`` and on the last step."""
        return self.state.step % every == 0 or self.done

    def train_step(self) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns its mean loss (on the device).

        The step's global batch comes from the batch schedule (constant, or a ramp): its
        accumulation is that batch over micro batch x ranks. kolm marks the accumulation boundary
        itself (DeepSpeed's own counts micro-steps modulo one fixed accumulation) and tells the
        engine the batch, so that DeepSpeed's 1/accumulation loss scaling matches the step."""
        self.watch.check()  # a rank whose launcher died stops here, before another step
        batch = self.setup.schedule.batch_at(self.state.consumed_samples)
        accum = self.setup.accumulation(batch)
        if batch != self.engine.train_batch_size():
            self.engine.set_train_batch_size(batch)
        self.setup.lr.apply(self.engine.optimizer, self.state.consumed_samples + batch)
        loss = torch.zeros((), device=self.device)
        hang = self.hang  # what this rank is doing, for a hang report (an attribute write each)
        for a in range(accum):
            hang.phase = "data"
            self.engine.set_gradient_accumulation_boundary(a == accum - 1)
            x = to_device(next(self.batches), self.device)
            hang.phase = "forward"
            micro = self.engine(input_ids=x[:, :-1], targets=x[:, 1:], **self.inputs(x[:, :-1])) / x[:, 1:].numel()
            hang.phase = "backward"
            self.engine.backward(micro)
            hang.phase = "optimizer"
            self.engine.step()
            loss += micro.detach() / accum
        self.state.step += 1
        self.state.consumed_samples += batch
        self.batch = batch
        return loss

    def inputs(self, x: torch.Tensor) -> dict:
        """The forward pass's attention inputs: none for causal attention; document masks and
        restarted positions for ``attention: document``."""
        dtype = torch.float32 if self.cfg.precision == "fp32" else torch.bfloat16
        return attention_inputs(x, self.cfg.attention, self.setup.eos_id, self.cfg.attn_implementation, dtype)

    def record(self, loss: torch.Tensor) -> None:
        """Keep this step's figures (on the device) for the next flush."""
        state = self.state
        self.window.add(state.step, state.consumed_samples, self.batch, loss, self.engine.get_global_grad_norm(),
                        self.engine.get_lr()[0], state.nonfinite_total)

    def agree(self, stop_here: bool, loss: torch.Tensor) -> tuple[bool, bool]:
        """The one collective of a step: (any rank asked to stop, the step was finite everywhere)."""
        import torch.distributed as dist

        self.hang.phase = "collective"
        flags = torch.stack([torch.tensor(float(stop_here), device=self.device), (~torch.isfinite(loss)).float()])
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, bad = flags.tolist()
        self.hang.progress(self.state.step)  # every rank finished this step
        return bool(stop), not bad and self.engine.was_step_applied()

    def flush_metrics(self, timed: bool) -> None:
        """Reduce and write the steps since the last flush (every rank takes part)."""
        self.hang.phase = "collective"
        records = self.window.flush(timed)
        watch = self.state.grad_watch
        for record in records:
            spike = watch.observe(record["step"], record["grad_norm"], self.cfg.grad_clip)
            if spike:
                say(spike)
            record["grad_norm_spikes"] = watch.spikes
        if self.setup.blended:
            self._count_sources(records)
        self.sinks.write(records)
        self.progress.show(records)

    def _count_sources(self, records: list[dict]) -> None:
        """Samples consumed per source on every record; a source that starts another epoch is said."""
        blend = self.setup.train
        for record in records:
            record.update({f"consumed_samples/{name}": n
                           for name, n in zip(blend.names, blend.taken(record["consumed_samples"]))})
        if records:
            epochs = blend.epochs(records[-1]["consumed_samples"])
            for name, before, now in zip(blend.names, self.epochs, epochs):
                if now > before:
                    say(f"{name}: epoch {now}")
            self.epochs = epochs

    def evaluate(self) -> float | None:
        """Loss, perplexity and next-token accuracy on the validation split, written as a record;
        None (nothing written) when it scored no token."""
        self.flush_metrics(timed=True)
        env = self.setup.env
        self.hang.phase = "eval"
        metrics = evaluation.evaluate(self.engine, self.setup.valid, self.cfg.micro_batch, env.rank, env.world_size,
                                      self.cfg.eval_samples, self._eval_batch, self.inputs)
        if metrics is None:
            self.window.restart_clock()
            return None
        loss = metrics["eval_loss"]
        if self.state.best_eval_loss is None or loss < self.state.best_eval_loss:
            self.state.best_eval_loss = loss
        self.sinks.write([{"kind": "eval", "step": self.state.step,
                           "tokens": self.state.consumed_samples * self.cfg.seq_len, **metrics}])
        say(f"step {self.state.step}: {evaluation.describe(metrics, list(self.setup.valid))}")
        self.window.restart_clock()
        return loss

    def _eval_batch(self, batch) -> torch.Tensor:
        self.hang.progress()  # each evaluation batch is progress: a long evaluation is not a hang
        return to_device(batch, self.device)

    def save(self, eval_loss: float | None) -> None:
        """A complete checkpoint of this step on every rank, then pruning (rank 0)."""
        import torch.distributed as dist

        self.flush_metrics(timed=True)
        setup, cfg, state = self.setup, self.cfg, self.state
        client = {"kolm_state": asdict(state), "data_fingerprint": setup.train.fingerprint,
                  "run_config": cfg.to_dict()}
        # What `kolm convert` needs, readable without unpickling anything.
        marker = {"world_size": setup.env.world_size, "zero_stage": cfg.zero_stage, "eval_loss": eval_loss,
                  "consumed_samples": state.consumed_samples, "model_config": setup.model_config_dict,
                  "seq_len": cfg.seq_len, "tokenizer": str(Path(setup.tokenizer).resolve()),
                  "data_fingerprint": setup.train.fingerprint, "run_config": cfg.to_dict(),
                  "total_steps": setup.total_steps, "init_from": self.init_record,
                  "base_vocab_size": setup.base_vocab_size}
        if cfg.zero_stage == 0:  # the order of the fp32 master copies in the optimizer's state
            marker["param_group_names"] = self.engine.kolm_param_group_names
        with self.hang.saving(self.ckpt_dir / checkpoint.tag_for(state.step)):
            try:
                checkpoint.save(self.engine, self.ckpt_dir, state.step, client, setup.env.rank, dist.barrier, marker)
            except (OSError, RuntimeError) as e:
                raise checkpoint.write_failed(self.ckpt_dir, state.step, e) from e
            if self.rank0:
                checkpoint.prune(self.ckpt_dir, cfg.keep_checkpoints)
        self.window.restart_clock()

    def finish(self, code: int) -> int:
        import torch.distributed as dist

        self.flush_metrics(timed=True)
        self.progress.close()
        self.sinks.close()
        if code == 0:
            say(f"finished: {self.state.step} steps, {self.state.consumed_samples} samples; "
                f"run directory {self.run_dir}")
        elif code == EXIT_REQUEUE:
            say(f"stopped by signal after checkpoint {checkpoint.tag_for(self.state.step)}; "
                f"exit {EXIT_REQUEUE} (requeue)")
        self.hang.phase = "collective"
        dist.barrier()
        self.hang.stop()
        dist.destroy_process_group()
        if self.lock is not None:
            self.lock.release()
        return code


def to_device(batch, device: torch.device) -> torch.Tensor:
    """A batch of windows on the device; through pinned memory on a GPU, so the copy overlaps."""
    x = torch.from_numpy(batch)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
