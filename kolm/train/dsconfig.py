"""DeepSpeed JSON configs: load a template, fill the run-dependent fields from the run config,
and refuse a template whose explicit values contradict the run config."""

from __future__ import annotations

import json
from pathlib import Path

from kolm.errors import KolmError
from kolm.train.config import RunConfig

# Shipped with the package (the checkout's ds_configs/ links here), so an installed kolm finds them
# from any working directory.
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "ds_configs"


def template_path(cfg: RunConfig) -> Path:
    """The user's JSON if given (a path, or the name of a shipped config such as
    ds_configs/zero3_offload.json), else the shipped zero{stage}.json."""
    name = cfg.deepspeed_config or f"zero{cfg.zero_stage}.json"
    for candidate in (Path(name), SHIPPED_CONFIGS / Path(name).name):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.name for p in SHIPPED_CONFIGS.glob("*.json")))
    raise KolmError(f"DeepSpeed config {name!r} not found: not a file here, nor one of kolm's ({shipped})")


def load_template(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise KolmError(f"{path}: not valid JSON ({e})") from e


def run_fields(cfg: RunConfig, dp_world: int, grad_accum: int, on_cpu: bool) -> dict:
    """What kolm decides from the run config, as nested DeepSpeed config keys. The batch fields are
    the full batch's (a ramp changes them step by step); the learning-rate schedule is kolm's own
    (kolm.train.lr_schedule), so DeepSpeed gets none."""
    return {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": cfg.precision in ("bf16", "fp8")},  # fp8: bf16 outside the float8 matrix products
        "zero_optimization": {"stage": cfg.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": [cfg.adam_beta1, cfg.adam_beta2],
                "eps": cfg.adam_eps,
                "weight_decay": cfg.weight_decay,
                # PyTorch's AdamW on CPU, in its fused kernel: one pass over each flat ZeRO partition
                # instead of a dozen, which small-batch CPU runs feel on every step (bench/optimizer_bench.py)
                **({"torch_adam": True, "fused": True} if on_cpu else {}),
            },
        },
    }


# Keys a template may leave to kolm; any other explicit value must agree.
_RECIPE_KEYS = {
    "train_batch_size": "global_batch",
    "train_micro_batch_size_per_gpu": "micro_batch",
    "gradient_accumulation_steps": "global_batch / (micro_batch x ranks)",
    "gradient_clipping": "grad_clip",
    "bf16": "precision",
    "zero_optimization.stage": "zero_stage",
    "optimizer": "lr, weight_decay, adam_*",
}


def merge(template: dict, fields: dict, source: str, path: str = "") -> dict:
    """Fill ``fields`` into ``template``; a conflicting explicit value is an error naming both."""
    out = dict(template)
    for key, value in fields.items():
        dotted = f"{path}{key}"
        mine = out.get(key, "auto")
        if isinstance(value, dict) and isinstance(mine, dict):
            out[key] = merge(mine, value, source, f"{dotted}.")
        elif mine == "auto" or _same(mine, value):
            out[key] = value
        else:
            recipe_key = next((v for k, v in _RECIPE_KEYS.items() if dotted.startswith(k)), dotted)
            raise KolmError(
                f"{source} sets {dotted} = {json.dumps(mine)} but the run config gives {json.dumps(value)} "
                f"(from {recipe_key}); remove it from the JSON (or write \"auto\") or change the recipe"
            )
    return out


def _same(a, b) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def build(cfg: RunConfig, dp_world: int, grad_accum: int, on_cpu: bool) -> dict:
    path = template_path(cfg)
    config = merge(load_template(path), run_fields(cfg, dp_world, grad_accum, on_cpu), str(path))
    scheduler = config.pop("scheduler", "auto")
    if scheduler != "auto":
        raise KolmError(f"{path} sets scheduler = {json.dumps(scheduler)}, but kolm sets the learning rate itself "
                        "(from lr, min_lr, warmup_steps and train_steps/epochs, by consumed samples); remove it from "
                        "the JSON (or write \"auto\")")
    config.setdefault("steps_per_print", 1 << 30)
    config.setdefault("wall_clock_breakdown", False)
    return config
