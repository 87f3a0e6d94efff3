"""`kolm train`: PhiForCausalLM on packed shards with a DeepSpeed engine, resumable at any step.

Runs unchanged under torchrun, the deepspeed launcher, srun and submitit (see kolm.distenv).
Exit status: 0 finished, EXIT_REQUEUE (75) stopped by a signal after a checkpoint, 2 bad input,
3 too many non-finite steps in a row.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kolm.data.manifest import check_tokenizer, load_shard_dir
from kolm.data.packed import PackedDataset, check_batch_layout
from kolm.data.tokenizer import load_tokenizer_info
from kolm.errors import KolmError
from kolm.files import atomic_write_json
from kolm.model.presets import (
    build_config,
    flops_per_token,
    get_shape,
    padded_vocab,
    parameter_count,
    phi_config_dict,
    untie_padding,
)
from kolm.train import checkpoint, distenv, dsconfig
from kolm.train.config import RunConfig
from kolm.train.health import GradNormWatch
from kolm.train.metrics import EvalTotals, MetricSinks, device_peak_flops, token_stats
from kolm.train.signals import EXIT_REQUEUE, GracefulStop

EXIT_NONFINITE = 3
# Recipe keys a checkpoint's optimizer, learning-rate schedule or sample order were built from.
# DeepSpeed restores those from the checkpoint, so a changed value would be silently ignored (or
# fail deep inside the load): resuming refuses it. Everything else (micro_batch, node count,
# eval/log/save cadence, grad_clip, activation_checkpointing) may change between restarts.
FIXED_ON_RESUME = ("global_batch", "lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                   "warmup_steps", "zero_stage", "precision")


@dataclass
class TrainState:
    """What a checkpoint's client state carries besides DeepSpeed's own state."""

    step: int = 0
    consumed_samples: int = 0
    best_eval_loss: float | None = None
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    grad_watch: GradNormWatch = field(default_factory=GradNormWatch)

    @classmethod
    def from_client(cls, saved: dict, spike_factor: float) -> TrainState:
        """The state a checkpoint carried (older ones have no gradient-norm watch)."""
        watch = GradNormWatch(**{**saved.get("grad_watch", {}), "factor": spike_factor})
        return cls(**{**saved, "grad_watch": watch})


@dataclass
class Plan:
    """Everything decided before any process group starts."""

    env: distenv.DistEnv
    grad_accum: int
    total_steps: int
    train: PackedDataset
    valid: PackedDataset | None
    model_config: object
    model_config_dict: dict
    ds_config: dict
    flops_per_token: float
    n_params: int


def say(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"kolm: {msg}", file=sys.stderr, flush=True)


def prepare(cfg: RunConfig) -> Plan:
    """Validate the whole run (data, tokenizer, model, batch layout) without touching devices."""
    env = distenv.detect()
    tok = load_tokenizer_info(cfg.tokenizer)
    check_tokenizer(load_shard_dir(cfg.data), tok.fingerprint(), cfg.tokenizer)
    grad_accum = check_batch_layout(cfg.global_batch, cfg.micro_batch, env.world_size)
    shape = get_shape(cfg.model, **cfg.model_overrides)
    if cfg.seq_len > shape.max_position_embeddings:
        raise KolmError(
            f"seq_len {cfg.seq_len} exceeds model {cfg.model}'s max_position_embeddings "
            f"{shape.max_position_embeddings}; lower seq_len or set model_overrides.max_position_embeddings"
        )
    vocab = padded_vocab(tok.vocab_size, cfg.vocab_multiple)
    train = PackedDataset(cfg.data, "train", cfg.seq_len, cfg.seed)
    valid = _valid_or_none(cfg)
    total = cfg.train_steps or math.ceil(cfg.epochs * train.num_samples / cfg.global_batch)
    config_dict = phi_config_dict(shape, vocab, tok.eos_id, tok.eos_id, shape.max_position_embeddings)
    model_config = build_config(shape, vocab, tok.eos_id, tok.eos_id, shape.max_position_embeddings)
    ds_config = dsconfig.build(cfg, env.world_size, grad_accum, total, on_cpu=not torch.cuda.is_available())
    return Plan(env, grad_accum, total, train, valid, model_config, config_dict, ds_config,
                flops_per_token(shape, vocab, cfg.seq_len), parameter_count(shape, vocab))


def _valid_or_none(cfg: RunConfig) -> PackedDataset | None:
    try:
        return PackedDataset(cfg.data, "valid", cfg.seq_len, cfg.seed)
    except KolmError as e:
        say(f"no evaluation: {e}")
        return None


def _set_cpu_threads(env: distenv.DistEnv) -> None:
    """Share the cores among the processes of this node unless the user chose."""
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", env.world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


def start_engine(cfg: RunConfig, plan: Plan, resume: checkpoint.Checkpoint | None):
    """Process group, model, optimizer and scheduler inside a DeepSpeed engine."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _set_cpu_threads(plan.env)
    distenv.export(plan.env)
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from transformers import PhiForCausalLM

    distenv.start_process_group()
    on_cpu = get_accelerator().device_name() == "cpu"
    if not on_cpu:
        get_accelerator().set_device(plan.env.local_rank)
    ds_config = dict(plan.ds_config)
    if resume is not None and resume.marker.get("world_size") != plan.env.world_size:
        if plan.env.is_main:
            checkpoint.to_universal(resume, say)
        torch.distributed.barrier()
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    torch.manual_seed(cfg.seed)
    model = PhiForCausalLM(plan.model_config)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=_param_groups(model, cfg), config=ds_config)
    return engine, ds_config


def _param_groups(model: torch.nn.Module, cfg: RunConfig) -> list[dict]:
    """Weight decay on matrices only: biases and LayerNorm weights are exempt, as in HF Trainer."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "layernorm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_resumable(ckpt: checkpoint.Checkpoint, cfg: RunConfig, plan: Plan) -> None:
    """Refuse, before any engine starts, a checkpoint of a different model or different data."""
    saved, mine = ckpt.marker.get("model_config"), plan.model_config_dict
    if saved is not None:
        saved, untied = untie_padding(saved)
        if untied:
            say(f"{ckpt.tag} was written with pad_token_id = EOS, which froze the EOS embedding at zero; "
                "continuing with it trainable (exported models no longer tie padding to EOS)")
    if saved is not None and saved != mine:
        keys = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        shown = ", ".join(f"{k} {saved.get(k)!r} vs {mine.get(k)!r}" for k in keys[:4])
        raise KolmError(
            f"{cfg.run_dir} holds a run of a different model ({shown}; checkpoint vs recipe): "
            "use a new run_dir for this recipe, or the recipe that run was started with"
        )
    saved_fp = ckpt.marker.get("data_fingerprint")
    if saved_fp is not None:
        check_same_data(ckpt, saved_fp, plan, cfg)
    check_same_schedule(ckpt, cfg, plan)


def check_same_schedule(ckpt: checkpoint.Checkpoint, cfg: RunConfig, plan: Plan) -> None:
    """Refuse a recipe whose optimizer or schedule differs from the one the checkpoint was built with."""
    saved = {**ckpt.marker.get("run_config", {}), "total steps": ckpt.marker.get("total_steps")}
    mine = {**cfg.to_dict(), "total steps": plan.total_steps}
    diffs = [k for k in (*FIXED_ON_RESUME, "total steps") if saved.get(k) is not None and saved[k] != mine[k]]
    if diffs:
        shown = ", ".join(f"{k} {saved[k]!r} vs {mine[k]!r}" for k in diffs)
        raise KolmError(
            f"{cfg.run_dir} was started with different settings ({shown}; checkpoint vs recipe). The checkpoint's "
            "optimizer and learning-rate schedule were built from the original values and would override the "
            "recipe's: resume with the original values (see run_config.json), or start a new run_dir"
        )


def check_same_data(ckpt: checkpoint.Checkpoint, saved_fp: dict, plan: Plan, cfg: RunConfig) -> None:
    """Refuse a checkpoint whose data fingerprint differs, naming what differs in a fixed order."""
    mine = plan.train.fingerprint
    if saved_fp == mine or cfg.ignore_data_fingerprint:
        return
    diffs = [k for k in mine if saved_fp.get(k) != mine[k]] + sorted(set(saved_fp) - set(mine))
    raise KolmError(
        f"{ckpt.path} was trained on different data ({', '.join(diffs)} differ); use the original data, "
        "a new run_dir, or pass ignore_data_fingerprint=true to continue anyway"
    )


def restore(engine, cfg: RunConfig, plan: Plan, ckpt: checkpoint.Checkpoint) -> TrainState:
    """Load a checkpoint and check it belongs to this run's data."""
    universal = ckpt.marker.get("world_size") != plan.env.world_size
    if universal:
        _, client = engine.load_checkpoint(str(ckpt.path), tag=checkpoint.UNIVERSAL)
    else:
        _, client = engine.load_checkpoint(str(ckpt.path.parent), tag=ckpt.tag)
    if client is None:
        raise KolmError(f"{ckpt.path}: DeepSpeed could not load it; remove it to fall back to an earlier one")
    check_same_data(ckpt, client["data_fingerprint"], plan, cfg)
    if not checkpoint.load_rng(ckpt.path, plan.env.rank):
        say(f"{ckpt.tag} has no RNG state for rank {plan.env.rank}; continuing with a fresh one")
    return TrainState.from_client(client["kolm_state"], cfg.grad_spike_factor)


def evaluate(engine, plan: Plan, cfg: RunConfig, device: torch.device) -> dict:
    """Loss, perplexity and next-token accuracy on the validation split, streaming."""
    totals = EvalTotals()
    limit = cfg.eval_samples or None
    engine.eval()
    with torch.no_grad():
        for batch in plan.valid.eval_batches(cfg.micro_batch, plan.env.rank, plan.env.world_size, limit):
            x = torch.from_numpy(batch).to(device)
            logits = engine(input_ids=x[:, :-1]).logits
            totals.add(*token_stats(logits, x[:, 1:]))
    engine.train()
    return totals.all_reduce(device).summary()


class Trainer:
    """One training run: the engine, its state, and what happens around each step."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.plan = prepare(cfg)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        resume = checkpoint.find_resume(self.ckpt_dir, say)
        if resume:
            check_resumable(resume, cfg, self.plan)
        self.engine, ds_config = start_engine(cfg, self.plan, resume)
        self.device = self.engine.device
        self.rank0 = self.plan.env.is_main
        fresh = TrainState(grad_watch=GradNormWatch(cfg.grad_spike_factor))
        self.state = restore(self.engine, cfg, self.plan, resume) if resume else fresh
        if resume:
            say(f"resuming from {resume.tag}: step {self.state.step}, {self.state.consumed_samples} samples consumed")
        if self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run_dir / "run_config.json", cfg.to_dict())
            atomic_write_json(self.run_dir / "ds_config.json", ds_config)
        self.sinks = MetricSinks(self.run_dir, self.rank0, cfg.tensorboard)
        self.sinks.truncate_after(self.state.step)
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        self.peak, peak_source = device_peak_flops(self.device, dtype)
        say(f"{cfg.model}: {self.plan.n_params / 1e6:.1f}M parameters, {self.plan.env.world_size} ranks x micro "
            f"batch {cfg.micro_batch} x {self.plan.grad_accum} accumulation = global batch {cfg.global_batch}; "
            f"{self.plan.total_steps} steps; peak {self.peak / 1e9:.1f} GFLOP/s per device ({peak_source})")
        self.batches = self.plan.train.rank_batches(self.state.consumed_samples, cfg.global_batch, cfg.micro_batch,
                                                    self.plan.env.rank, self.plan.env.world_size)
        self.progress = _progress(self.rank0, self.plan.total_steps, self.state.step)
        self.window_start, self.window_steps = time.perf_counter(), 0

    def train_step(self) -> torch.Tensor:
        """One optimizer step over the rank's micro-batches; the loss averaged over all ranks."""
        import torch.distributed as dist

        loss = torch.zeros((), device=self.device)
        for _ in range(self.plan.grad_accum):
            x = torch.from_numpy(next(self.batches)).to(self.device)
            loss_sum, _, n = token_stats(self.engine(input_ids=x[:, :-1]).logits, x[:, 1:])
            self.engine.backward(loss_sum / n)
            self.engine.step()
            loss += loss_sum.detach() / n / self.plan.grad_accum
        dist.all_reduce(loss)
        self.state.step += 1
        self.state.consumed_samples += self.cfg.global_batch
        self.window_steps += 1
        return loss / self.plan.env.world_size

    def log_step(self, loss: torch.Tensor) -> None:
        cfg, state = self.cfg, self.state
        grad_norm = _grad_norm(self.engine)
        spike = state.grad_watch.observe(state.step, grad_norm, cfg.grad_clip)
        if spike:
            say(spike)
        record = {"kind": "train", "step": state.step, "consumed_samples": state.consumed_samples,
                  "tokens": state.consumed_samples * cfg.seq_len, "loss": float(loss),
                  "lr": self.engine.get_lr()[0], "grad_norm": grad_norm,
                  "skipped_steps": state.nonfinite_total, "grad_norm_spikes": state.grad_watch.spikes}
        if state.step % cfg.log_every == 0 or state.step == self.plan.total_steps:
            tps = self.window_steps * cfg.global_batch * cfg.seq_len / (time.perf_counter() - self.window_start)
            per_device = tps / self.plan.env.world_size
            record.update(tokens_per_s=tps, tokens_per_s_per_device=per_device,
                          mfu=per_device * self.plan.flops_per_token / self.peak)
            self.restart_clock()
        self.sinks.write(record)
        self.progress(record)

    def restart_clock(self) -> None:
        """Throughput windows exclude evaluation and checkpoint time."""
        self.window_start, self.window_steps = time.perf_counter(), 0

    def maybe_evaluate(self) -> float | None:
        step = self.state.step
        if self.plan.valid is None or (step % self.cfg.eval_every and step != self.plan.total_steps):
            return None
        metrics = evaluate(self.engine, self.plan, self.cfg, self.device)
        loss = metrics["eval_loss"]
        if self.state.best_eval_loss is None or loss < self.state.best_eval_loss:
            self.state.best_eval_loss = loss
        self.sinks.write({"kind": "eval", "step": step, "tokens": self.state.consumed_samples * self.cfg.seq_len,
                          **metrics})
        say(f"step {step}: eval loss {loss:.4f}, perplexity {metrics['eval_perplexity']:.2f}, "
            f"accuracy {metrics['eval_accuracy']:.4f}")
        self.restart_clock()
        return loss

    def save_due(self) -> bool:
        return self.state.step % self.cfg.save_every == 0 or self.state.step == self.plan.total_steps

    def save(self, eval_loss: float | None) -> None:
        import torch.distributed as dist

        client = {"kolm_state": asdict(self.state), "data_fingerprint": self.plan.train.fingerprint,
                  "run_config": self.cfg.to_dict()}
        # What `kolm convert` needs, readable without unpickling anything.
        extra = {"world_size": self.plan.env.world_size, "zero_stage": self.cfg.zero_stage,
                 "eval_loss": eval_loss, "consumed_samples": self.state.consumed_samples,
                 "model_config": self.plan.model_config_dict, "seq_len": self.cfg.seq_len,
                 "tokenizer": str(Path(self.cfg.tokenizer).resolve()),
                 "data_fingerprint": self.plan.train.fingerprint, "run_config": self.cfg.to_dict(),
                 "total_steps": self.plan.total_steps}
        try:
            checkpoint.save(self.engine, self.ckpt_dir, self.state.step, client, self.plan.env.rank, dist.barrier,
                            extra)
        except (OSError, RuntimeError) as e:
            raise checkpoint.write_failed(self.ckpt_dir, self.state.step, e) from e
        if self.rank0:
            checkpoint.prune(self.ckpt_dir, self.cfg.keep_checkpoints, say)
        self.restart_clock()

    def finish(self, code: int) -> int:
        import torch.distributed as dist

        self.sinks.close()
        if code == 0:
            say(f"finished: {self.state.step} steps, {self.state.consumed_samples} samples; "
                f"run directory {self.run_dir}")
        elif code == EXIT_REQUEUE:
            say(f"stopped by signal after checkpoint {checkpoint.tag_for(self.state.step)}; "
                f"exit {EXIT_REQUEUE} (requeue)")
        dist.barrier()
        dist.destroy_process_group()
        return code


def train(cfg: RunConfig, stop: GracefulStop | None = None) -> int:
    """The training loop. Returns the process exit status.

    Pass `stop` installed as early as possible: a stop signal that arrives while the engine
    starts is then honoured at the first step instead of killing the process."""
    stop = stop or GracefulStop()
    try:
        t = Trainer(cfg)
        if cfg.eval_at_start and t.state.step == 0:
            t.maybe_evaluate()
        while t.state.step < t.plan.total_steps:
            loss = t.train_step()
            give_up = _count_nonfinite(t.state, loss, t.engine, cfg)
            t.log_step(loss)
            if give_up:
                return t.finish(EXIT_NONFINITE)
            eval_loss = t.maybe_evaluate()
            stopping = stop.requested(t.device)
            if t.save_due() or stopping:
                t.save(eval_loss)
            if stopping and t.state.step < t.plan.total_steps:
                return t.finish(EXIT_REQUEUE)
        return t.finish(0)
    finally:
        stop.restore()


def _count_nonfinite(state: TrainState, loss: torch.Tensor, engine, cfg: RunConfig) -> bool:
    """Count a step whose loss or gradient was not finite (DeepSpeed skipped its update);
    True when there were too many in a row."""
    if torch.isfinite(loss) and engine.was_step_applied():
        state.nonfinite_in_a_row = 0
        return False
    state.nonfinite_in_a_row += 1
    state.nonfinite_total += 1
    say(f"step {state.step}: non-finite loss or gradient; update skipped ({state.nonfinite_in_a_row} in a row)")
    if state.nonfinite_in_a_row < cfg.max_nonfinite_steps:
        return False
    say(f"stopping: {state.nonfinite_in_a_row} non-finite steps in a row (max_nonfinite_steps); "
        "lower lr, check the data, or resume from an earlier checkpoint")
    return True


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    norm = float(norm)
    return norm if math.isfinite(norm) else None


def _progress(enabled: bool, total: int, initial: int):
    """Rank 0's console output: a progress bar on a terminal, else (batch job logs) one plain
    line per logging step. Returns a function taking each step's record."""
    if not enabled:
        return lambda record: None
    if not sys.stderr.isatty():
        def log_line(record: dict) -> None:
            if "tokens_per_s" in record:
                say(f"step {record['step']}/{total} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                    f"tok/s {record['tokens_per_s']:.0f} mfu {record['mfu']:.1%}")
        return log_line
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)

    def update(record: dict) -> None:
        bar.update(1)
        post = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}
        if "tokens_per_s" in record:
            post.update(tok_s=f"{record['tokens_per_s']:.0f}", mfu=f"{record['mfu']:.1%}")
        bar.set_postfix(post, refresh=False)
        if record["step"] >= total:
            bar.close()

    return update
