"""The run config: one dataclass holding every training default, loaded from a recipe YAML plus
``key=value`` overrides, validated before any process group or GPU is touched."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kolm.data.blend import parse_sources
from kolm.errors import KolmError
from kolm.model.documents import ATTENTION_MODES
from kolm.model.presets import SHAPE_RULES, check_overrides
from kolm.train.freeze import parse_groups
from kolm.train.rampup import BatchSchedule

ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
WANDB_MODES = ("", "online", "offline", "disabled")


@dataclass(frozen=True)
class Bound:
    """The range a numeric key may take; ``meaning`` says what an edge value does."""

    low: float
    high: float = math.inf
    open_low: bool = False  # low itself is not allowed
    open_high: bool = False
    meaning: str = ""

    def holds(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        above = x > self.low if self.open_low else x >= self.low
        return above and (x < self.high if self.open_high else x <= self.high)

    def text(self) -> str:
        low = _number(self.low)
        if self.high == math.inf:
            said = f"{'>' if self.open_low else '>='} {low}"
        else:
            said = f"in {'(' if self.open_low else '['}{low}, {_number(self.high)}{')' if self.open_high else ']'}"
        return said + (f" ({self.meaning})" if self.meaning else "")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


AT_LEAST_1 = Bound(1)
# The range of every numeric key of RunConfig (its defaults are below); zero_stage is one of ZERO_STAGES.
BOUNDS: dict[str, Bound] = {
    "seq_len": AT_LEAST_1, "vocab_multiple": AT_LEAST_1, "global_batch": AT_LEAST_1, "micro_batch": AT_LEAST_1,
    "lr": Bound(0, meaning="0: the weights do not move, e.g. to check a start or measure a step"),
    "min_lr": Bound(0),  # and at most lr
    "weight_decay": Bound(0),
    "adam_beta1": Bound(0, 1, open_high=True),
    "adam_beta2": Bound(0, 1, open_high=True),
    "adam_eps": Bound(0, open_low=True),
    "warmup_steps": Bound(0),
    "grad_clip": Bound(0, meaning="0: no clipping"),
    "epochs": Bound(0, open_low=True),
    "train_steps": Bound(0, meaning="0: derived from epochs and the data"),
    "seed": Bound(0, 2**32 - 1),
    "eval_every": AT_LEAST_1, "log_every": AT_LEAST_1, "save_every": AT_LEAST_1, "keep_checkpoints": AT_LEAST_1,
    "eval_samples": Bound(0, meaning="0: the whole validation split"),
    "max_nonfinite_steps": AT_LEAST_1,
    "grad_spike_factor": Bound(0, meaning="0: no warning"),
    "hang_timeout": Bound(0, meaning="0: no watchdog"),
}
ZERO_STAGES = (0, 1, 2, 3)


@dataclass
class RunConfig:
    # --- where things are
    # a shard directory written by `kolm shard`, or a list of sources {path, weight, name} (kolm.data.blend)
    data: str | list = ""
    tokenizer: str = ""  # the tokenizer directory the shards were made with (default with init_from: the source's)
    run_dir: str = ""  # checkpoints, metrics.jsonl and tensorboard go here
    # --- model
    model: str = ""  # preset name (kolm.model.presets.PRESETS); empty: phi-1.5, or init_from's shape
    model_overrides: dict = field(default_factory=dict)  # e.g. {num_hidden_layers: 12}
    # start from existing weights (kolm.train.init_from): a Hugging Face PhiForCausalLM directory or a
    # kolm run directory; empty: random initialisation. Ignored once the run has a checkpoint.
    init_from: str = ""
    # what trains (kolm.train.freeze): all, or a list of new_input_embeddings, new_output_embeddings,
    # input_embeddings, output_embeddings, layers
    trainable: str | list = "all"
    seq_len: int = 512
    attention: str = "causal"  # causal | document (no attention across documents inside a window)
    vocab_multiple: int = 64  # embedding rows are the tokenizer vocabulary rounded up to this
    # --- batch layout: the global batch is fixed; gradient accumulation is derived
    global_batch: int = 256
    micro_batch: int = 4
    # [start, increment, samples]: the global batch starts at `start` and grows by `increment` in equal
    # steps to global_batch after `samples` consumed samples (Megatron's rule, kolm.train.rampup); empty: off
    rampup_batch_size: list = field(default_factory=list)
    # --- optimization (AdamW, linear warmup then cosine decay)
    lr: float = 5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 10000
    grad_clip: float = 1.0  # the largest gradient norm a step applies; 0: no clipping
    epochs: float = 2.0
    train_steps: int = 0  # 0: derived from epochs and the dataset size
    seed: int = 1234  # model initialisation and the order of the windows
    # --- DeepSpeed
    zero_stage: int = 2  # 0: plain data parallel (no ZeRO partitioning: one GPU), 1, 2 or 3
    deepspeed_config: str = ""  # a DeepSpeed JSON; "" = ds_configs/zero{stage}.json
    precision: str = "bf16"  # bf16 | fp32 | fp8 (decoder blocks' linear layers in float8, Hopper GPUs, kolm.model.fp8)
    activation_checkpointing: bool = False
    # --- kernels (same math, any may change between restarts)
    attn_implementation: str = "sdpa"  # sdpa | flash_attention_2 (CUDA, flash-attn package) | eager
    compile: bool = False  # torch.compile each decoder block (on CPU: fp32 only)
    # --- Weights & Biases (optional: pip install 'kolm[wandb]'); empty project: off
    wandb_project: str = ""
    wandb_entity: str = ""
    wandb_name: str = ""  # default: the run directory's name
    wandb_mode: str = ""  # online | offline | disabled; empty: follow WANDB_MODE (else online)
    # --- evaluation, logging, checkpoints
    eval_every: int = 10000
    eval_samples: int = 0  # windows of the validation split per evaluation; 0 = all
    eval_at_start: bool = False  # also evaluate the initial model (step 0): a baseline perplexity
    log_every: int = 10
    save_every: int = 10000
    keep_checkpoints: int = 5  # newest K are kept, plus the best by eval loss
    tensorboard: bool = True
    # --- robustness
    max_nonfinite_steps: int = 10  # stop after this many non-finite steps in a row
    grad_spike_factor: float = 1e4  # warn when a gradient norm exceeds this x its running median; 0: off
    ignore_data_fingerprint: bool = False  # resume even though the data changed
    # seconds without training progress after which a rank reports its stacks to RUN_DIR/hangs/ and
    # exits 5 (kolm.train.hang); also sets the process groups' timeout. 0: off
    hang_timeout: float = 1800.0

    def validate(self) -> None:
        for name in ("data", "run_dir") if self.init_from else ("data", "tokenizer", "run_dir"):
            if not getattr(self, name):
                raise KolmError(f"`{name}` is required: set it in the recipe or pass {name}=PATH")
        for name, bound in BOUNDS.items():
            if not bound.holds(getattr(self, name)):
                raise KolmError(f"`{name}` must be {bound.text()}, got {getattr(self, name)!r}")
        if self.zero_stage not in ZERO_STAGES:
            raise KolmError(f"`zero_stage` must be 0 (plain data parallel), 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("bf16", "fp32", "fp8"):
            raise KolmError(f"`precision` must be bf16, fp32 or fp8, got {self.precision!r}")
        if self.precision == "fp8" and self.zero_stage == 3:
            raise KolmError("precision=fp8 works with zero_stage 0, 1 or 2 (ZeRO-3's parameter gathering is untested "
                            "with float8 layers); lower zero_stage or use precision=bf16")
        if self.attention not in ATTENTION_MODES:
            raise KolmError(f"`attention` must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        if self.wandb_mode not in WANDB_MODES:
            raise KolmError(f"`wandb_mode` must be online, offline, disabled or empty, got {self.wandb_mode!r}")
        parse_sources(self.data)
        parse_groups(self.trainable)
        check_overrides(self.model_overrides)
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise KolmError(f"`attn_implementation` must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                            f"got {self.attn_implementation!r}")
        if self.min_lr > self.lr:
            raise KolmError(f"`min_lr` {self.min_lr} must be in [0, lr={self.lr}]")
        if self.global_batch % self.micro_batch:
            raise KolmError(
                f"global_batch {self.global_batch} is not a multiple of micro_batch {self.micro_batch}"
            )
        self.batch_schedule().check_layout(self.micro_batch, 1)

    def batch_schedule(self) -> BatchSchedule:
        """The global batch per step (constant, or the ramp); a malformed ramp is an error."""
        return BatchSchedule.from_config(self.global_batch, self.rampup_batch_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@functools.cache
def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)}


def _unknown_key(key: str, where: str) -> KolmError:
    close = difflib.get_close_matches(key, list(_field_types()), n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return KolmError(f"unknown config key `{key}` in {where}{hint} (see kolm/train/config.py for every key)")


def _coerce(key: str, value, kind: type, where: str):
    """Check or convert a value to the field's type; the error names key, type and value."""
    if key in ("data", "trainable"):  # a string or a list (checked by kolm.data.blend, kolm.train.freeze)
        return value if isinstance(value, (str, list)) else _bad(key, value, str, where)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else _bad(key, value, kind, where)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif kind is dict and isinstance(value, dict):
        return check_overrides(value)  # model_overrides, typed
    elif kind is list and (value is None or isinstance(value, list)):
        return [int(v) if isinstance(v, float) and v.is_integer() else v for v in value or []]
    return _bad(key, value, kind, where)


def _bad(key, value, kind, where):
    raise KolmError(f"config key `{key}` in {where} must be {kind.__name__}, got {value!r}")


KINDS = {int: "an integer", float: "a number", bool: "true or false", list: "a list [a, b]", dict: "a mapping"}


def _keeps_text(key: str) -> bool:
    """A key whose value may be text keeps the text the user wrote (YAML would read 0123 as 83)."""
    kind = _field_types().get(key)
    return kind is str or str in typing.get_args(kind)


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise KolmError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    kind = _field_types().get(key)
    if kind is str:
        return key, raw  # a path or a name, exactly as written
    try:
        return key, _load_yaml(raw, key) if raw else ""
    except yaml.YAMLError as e:
        if _keeps_text(key) or (kind is None and not key.startswith("model_overrides.")):
            return key, raw  # text; or a key refused below as unknown
        shape_rule = SHAPE_RULES.get(key.rpartition(".")[2], (None, None, "a value"))[2]
        wanted = KINDS.get(kind, "a value") if kind else shape_rule
        raise KolmError(f"override `{text}`: the value of `{key}` is not valid YAML ({getattr(e, 'problem', e)}); "
                        f"give {wanted}") from None


def _load_yaml(text: str, key: str | None = None):
    """A YAML document; in a recipe (``key`` None), the scalar values of text keys as written,
    and likewise for an override of such a key."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        value = loader.construct_document(node)
        if key is not None:
            return _written(node) if _keeps_text(key) and _written(node) is not None else value
        if isinstance(value, dict) and isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                name = loader.construct_object(key_node)
                if isinstance(name, str) and _keeps_text(name) and _written(value_node) is not None:
                    value[name] = _written(value_node)
        return value
    finally:
        loader.dispose()


def _written(node: yaml.Node) -> str | None:
    """A scalar's text as written (unquoted); None for anything else, and for null."""
    if isinstance(node, yaml.ScalarNode) and node.tag != "tag:yaml.org,2002:null":
        return node.value
    return None


def load_config(recipe: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """Recipe YAML, then ``key=value`` overrides (``model_overrides.hidden_size=256`` reaches
    into the dict), each key and type checked."""
    values: dict = {}
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            raise KolmError(f"{path}: recipe not found")
        try:
            loaded = _load_yaml(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise KolmError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(loaded, dict):
            raise KolmError(f"{path}: a recipe is a mapping of key: value")
        values.update({k: (v, str(path)) for k, v in loaded.items()})
    for text in overrides:
        key, value = _parse_override(text)
        if key.startswith("model_overrides."):
            sub = key.split(".", 1)[1]
            current = dict(values.get("model_overrides", ({}, ""))[0] or {})
            current[sub] = value
            values["model_overrides"] = (current, "the command line")
        else:
            values[key] = (value, "the command line")
    types = _field_types()
    kwargs = {}
    for key, (value, where) in values.items():
        if key not in types:
            raise _unknown_key(key, where)
        kwargs[key] = _coerce(key, value, types[key], where)
    cfg = RunConfig(**kwargs)
    cfg.validate()
    return cfg
