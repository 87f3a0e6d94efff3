"""Everything a run decides before any process group starts: the launcher environment, the data
and tokenizer checks, the model config, the batch layout and the DeepSpeed config. Any problem
here is a clear error before a device is touched (and is what `kolm train --check` runs)."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kolm.data.blend import BlendedDataset, Source, parse_sources
from kolm.data.manifest import check_tokenizer, load_shard_dir
from kolm.data.packed import PackedDataset, check_batch_layout
from kolm.data.tokenizer import load_tokenizer_info
from kolm.errors import KolmError
from kolm.log import say
from kolm.model.flops import flops_per_token, parameter_count
from kolm.model.presets import PhiShape, build_config, get_shape, padded_vocab, phi_config_dict
from kolm.train import checkpoint, distenv, dsconfig, freeze
from kolm.train.config import RunConfig
from kolm.train.init_from import InitSource, check_recipe_shape, resolve_source, resumed_source
from kolm.train.init_from import check_tokenizer as check_source_tokenizer
from kolm.train.lr_schedule import LRSchedule
from kolm.train.rampup import BatchSchedule
from kolm.train.wandb_log import check_available

DEFAULT_MODEL = "phi-1.5"  # the preset of a recipe that names none and starts from scratch


@dataclass
class RunSetup:
    env: distenv.DistEnv
    grad_accum: int
    total_steps: int
    train: BlendedDataset  # one source, or several at their weights
    valid: dict[str, PackedDataset]  # each source's validation split (those that have one)
    model_config: object  # transformers.PhiConfig
    model_config_dict: dict
    ds_config: dict
    flops_per_token: float
    n_params: int
    eos_id: int
    source: InitSource | None = None  # where the weights come from (init_from, or the run's own checkpoint)
    trainable: freeze.Trainable = freeze.Trainable(None)
    model_name: str = DEFAULT_MODEL  # the preset, or where init_from took the weights
    tokenizer: str = ""  # the tokenizer directory (the recipe's, or init_from's source's)
    schedule: BatchSchedule | None = None  # the global batch per step (constant, or a ramp)
    lr: LRSchedule | None = None  # the learning rate by consumed samples

    @property
    def micro_batch(self) -> int:
        return self.ds_config["train_micro_batch_size_per_gpu"]

    def accumulation(self, batch: int) -> int:
        """Micro-batches per rank in a step of global batch ``batch``."""
        return batch // (self.micro_batch * self.env.world_size)

    @property
    def base_vocab_size(self) -> int | None:
        return self.source.base_vocab_size if self.source else None

    @property
    def blended(self) -> bool:
        return len(self.train.sources) > 1

    def describe(self) -> str:
        full = " at the full batch" if self.schedule.ramped else ""
        text = (f"{self.total_steps} steps, gradient accumulation {self.grad_accum}{full} on {self.env.world_size} "
                f"ranks, {self.n_params / 1e6:.1f}M parameters")
        if self.source:
            base = f", base vocabulary {self.base_vocab_size}" if self.base_vocab_size else ""
            text += f"\nweights from {self.model_name}: {self.model_config_dict['vocab_size']} rows{base}"
        if not self.trainable.everything:
            text += f"\ntrainable: {self.trainable.describe()}\n" + freeze.count_table(self.trainable_counts())
        if self.schedule.ramped:
            text += "\n" + self.schedule.table(self.micro_batch, self.env.world_size, self.total_steps)
        return text + ("\n" + self.blend_table() if self.blended else "")

    def trainable_counts(self) -> dict[str, tuple[int, int]]:
        """Parameters per group, trainable and in all, on a model built without memory (meta device)."""
        from kolm.model.phi import PhiForTraining

        with torch.device("meta"):
            model = PhiForTraining(self.model_config)
        freeze.apply(model, self.trainable)
        return freeze.count(model)

    def blend_table(self) -> str:
        """The sources, their shares, their size, and how many epochs of each the run will see."""
        samples = self.schedule.consumed_after(self.total_steps)
        rows = [f"  {'source':<20}{'weight':>8}{'tokens':>14}{'windows':>10}{'epochs':>8}"]
        for name, share, d, taken in zip(self.train.names, self.train.fractions, self.train.datasets,
                                          self.train.taken(samples)):
            rows.append(f"  {name:<20}{float(share):>8.3f}{d.total_tokens:>14,}{d.num_samples:>10,}"
                        f"{taken / d.num_samples:>8.2f}")
        return "\n".join(rows)

    @property
    def train_global_batch(self) -> int:
        return self.ds_config["train_batch_size"]


def prepare(cfg: RunConfig, ranks: int | None = None) -> RunSetup:
    """Validate the whole run (data, tokenizer, model, batch layout) without touching devices; ``ranks``
    (`kolm train --check --ranks N`) checks for that many ranks instead of the launcher's."""
    env = distenv.detect()
    if ranks is not None:
        env = replace(env, world_size=ranks)
    source = weights_source(cfg)
    tok = load_tokenizer_info(cfg.tokenizer or _source_tokenizer(source))
    sources = parse_sources(cfg.data)
    check_sources(sources, tok.fingerprint(), str(tok.path))
    if source:
        check_source_tokenizer(source, tok)
    schedule = cfg.batch_schedule()
    schedule.check_layout(cfg.micro_batch, env.world_size)
    grad_accum = check_batch_layout(cfg.global_batch, cfg.micro_batch, env.world_size)
    shape = model_shape(cfg, source)
    vocab = source.rows if source else padded_vocab(tok.vocab_size, cfg.vocab_multiple)
    trainable = freeze.resolve(cfg.trainable, source.base_vocab_size if source else None, vocab,
                               source.label() if source else "a model without init_from")
    train = BlendedDataset(sources, "train", cfg.seq_len, cfg.seed)
    # train_steps and epochs (and warmup_steps) are read as steps of the full batch, counted in samples:
    # a ramp's smaller early steps take the run no further through the data or the learning-rate schedule
    full_steps = cfg.train_steps or math.ceil(cfg.epochs * train.num_samples / cfg.global_batch)
    total = schedule.steps_to(full_steps * cfg.global_batch)
    positions = shape.max_position_embeddings
    ds_config = dsconfig.build(cfg, env.world_size, grad_accum, on_cpu=not torch.cuda.is_available())
    check_kernels(cfg)
    if cfg.wandb_project:
        check_available()
    return RunSetup(env, grad_accum, total, train, _validation_splits(sources, cfg),
                    build_config(shape, vocab, tok.eos_id, tok.eos_id, positions, cfg.attn_implementation),
                    phi_config_dict(shape, vocab, tok.eos_id, tok.eos_id, positions), ds_config,
                    flops_per_token(shape, vocab, cfg.seq_len), parameter_count(shape, vocab), tok.eos_id,
                    source, trainable, source.label() if source else cfg.model or DEFAULT_MODEL, tok.path, schedule,
                    LRSchedule.for_run(cfg.lr, cfg.min_lr, cfg.warmup_steps, full_steps, cfg.global_batch))


def weights_source(cfg: RunConfig) -> InitSource | None:
    """Where the model comes from: the run's own newest checkpoint once it has one (init_from is then
    ignored), else init_from, else nothing (random initialisation from a preset)."""
    if not cfg.init_from:
        return None
    resume = checkpoint.find_resume(Path(cfg.run_dir) / "checkpoints", say=lambda _: None)
    return resumed_source(resume) if resume else resolve_source(cfg.init_from)


def _source_tokenizer(source: InitSource | None) -> str:
    if source is None or source.tokenizer is None:
        raise KolmError("`tokenizer` is required: init_from's source holds no tokenizer; set tokenizer=PATH "
                        "(the tokenizer the shards were made with)")
    return str(source.tokenizer)


def check_sources(sources: list[Source], fingerprint: dict, tokenizer: str) -> None:
    """Every source exists and was sharded with the recipe's tokenizer (a blend names the source)."""
    for source in sources:
        shards = load_shard_dir(source.path) if len(sources) == 1 else _source_dir(source)
        if len(sources) == 1:
            check_tokenizer(shards, fingerprint, tokenizer)
        elif shards.tokenizer != fingerprint:
            raise KolmError(f"data source {source.label} ({source.path}) was sharded with another tokenizer than "
                            f"{tokenizer}: its fingerprint {_fingerprint(shards.tokenizer)}, the recipe's "
                            f"{_fingerprint(fingerprint)}; re-shard it with {tokenizer}, or drop it from the blend")


def _source_dir(source: Source):
    try:
        return load_shard_dir(source.path)
    except KolmError as e:
        raise KolmError(f"data source {source.label}: {e}") from None


def _fingerprint(fp: dict) -> str:
    return f"(sha256 {str(fp.get('sha256'))[:12]}..., vocabulary {fp.get('vocab_size')}, EOS {fp.get('eos_id')})"


def _validation_splits(sources: list[Source], cfg: RunConfig) -> dict[str, PackedDataset]:
    found = {}
    for source in sources:
        try:
            found[source.label] = PackedDataset(source.path, "valid", cfg.seq_len, cfg.seed)
        except KolmError as e:
            say(f"no evaluation{f' of {source.label}' if len(sources) > 1 else ''}: {e}")
    return found


def model_shape(cfg: RunConfig, source: InitSource | None = None) -> PhiShape:
    if source:
        check_recipe_shape(source, cfg.model, cfg.model_overrides)
        shape, name = source.shape(), source.label()
    else:
        preset = cfg.model or DEFAULT_MODEL
        shape, name = get_shape(preset, **cfg.model_overrides), f"model {preset}"
    if cfg.seq_len > shape.max_position_embeddings:
        raise KolmError(
            f"seq_len {cfg.seq_len} exceeds {name}'s max_position_embeddings {shape.max_position_embeddings}; "
            "lower seq_len" + ("" if source else " or set model_overrides.max_position_embeddings")
        )
    return shape


def check_kernels(cfg: RunConfig) -> None:
    """The attention kernel and compilation the recipe asks for must exist on this machine."""
    cuda = torch.cuda.is_available()
    if cfg.attn_implementation == "flash_attention_2":
        if not cuda:
            raise KolmError("attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa (the default) here")
        if importlib.util.find_spec("flash_attn") is None:
            raise KolmError("attn_implementation=flash_attention_2 needs the flash-attn package "
                            "(`pip install flash-attn --no-build-isolation`); or use sdpa (the default)")
    if cfg.precision == "fp8":
        from kolm.model.fp8 import fp8_unavailable

        why = fp8_unavailable()
        if why:
            raise KolmError(f"precision=fp8 cannot run here: {why}. It needs a CUDA GPU of compute capability 9.0 "
                            "or newer (Hopper: H100, H200) and torchao; use precision=bf16")
    if cfg.compile and not cuda and cfg.precision == "bf16":
        raise KolmError("compile=true on a CPU works in fp32 only: torch's inductor fails to build bf16 kernels for "
                        "these blocks on CPU. Use precision=fp32, or compile=false")
