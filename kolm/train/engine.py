"""Start-up: the process group, then PhiForCausalLM with its optimizer and schedule inside a
DeepSpeed engine. One implementation for `kolm train` and `kolm plan --measure`."""

from __future__ import annotations

import os

import torch

from kolm.train import distenv, freeze, plain_dp
from kolm.train.freeze import Trainable


def join_process_group(env: distenv.DistEnv) -> None:
    """Publish the launcher's environment, share this node's cores, load DeepSpeed's start-up
    ops (see kolm.train.jitops), and start the process group on the accelerator's backend."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _share_cpu_threads(env)
    distenv.export(env)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from kolm.train.jitops import load_start_up_ops

    load_start_up_ops()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(env.local_rank)


def _share_cpu_threads(env: distenv.DistEnv) -> None:
    """Share the cores among the processes of this node unless the user chose."""
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", env.world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


def build_engine(model_config, ds_config: dict, seed: int, weight_decay: float, activation_checkpointing: bool,
                 compile: bool = False, init_state: dict[str, torch.Tensor] | None = None,
                 trainable: Trainable = Trainable(None), fp8: bool = False):
    """PhiForCausalLM inside a DeepSpeed engine: fresh (the same weights for a seed on every rank), or
    with ``init_state``'s weights (Hugging Face names, fp32); frozen as ``trainable`` says; with ``fp8``
    the decoder blocks' linear layers in float8 (kolm.model.fp8; the same parameter names)."""
    import deepspeed

    model = _model(model_config, seed, init_state)
    freeze.apply(model, trainable)
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    # References to the full-precision values: DeepSpeed casts the module to bf16 and builds its fp32
    # master weights from that rounded copy, so they are put back from these afterwards.
    masters = {n: p.data for n, p in model.named_parameters() if p.requires_grad} if init_state and bf16 else {}
    if fp8:
        from kolm.model.fp8 import convert_blocks

        convert_blocks(model)
    if activation_checkpointing:
        model.gradient_checkpointing_enable()
    if compile:
        compile_blocks(model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay),
                                      config=ds_config)
    if plain_dp.needs_guard(engine):
        plain_dp.guard(engine)
    engine.kolm_param_group_names = [g for g in param_group_names(model) if g]
    if masters:
        _set_master_weights(engine, masters)
    return engine


def _model(model_config, seed: int, init_state: dict[str, torch.Tensor] | None):
    from kolm.model.phi import PhiForTraining, phi_from_state_dict

    torch.manual_seed(seed)
    if init_state is None:
        return PhiForTraining(model_config)
    return phi_from_state_dict(model_config, init_state, PhiForTraining)


def _set_master_weights(engine, masters: dict[str, torch.Tensor]) -> None:
    """Give each trainable parameter's fp32 master copy (this rank's partition of it) the source's
    full-precision value."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, p in engine.module.named_parameters():
        if name in masters:
            safe_set_full_fp32_param(p, masters[name].to(engine.device, torch.float32))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and LayerNorm weights are exempt, as in HF Trainer.
    Frozen parameters are in no group: no decay, no optimizer state."""
    params = dict(model.named_parameters())
    decays = (weight_decay, 0.0)
    return [{"params": [params[n] for n in names], "weight_decay": decays[i]}
            for i, names in enumerate(param_group_names(model)) if names]


def param_group_names(model: torch.nn.Module) -> list[list[str]]:
    """The names in the optimizer's groups (decayed, then not), empty groups included; a stage-0
    checkpoint's fp32 master copies are in this order (kolm.train.checkpoint reads them by it)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "layernorm" in name.lower() else decay).append(name)
    return [decay, no_decay]


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each decoder block's forward (regional compilation: one small graph, compiled
    once and reused by every block, so start-up stays short). The module call around it, with
    DeepSpeed's ZeRO-3 hooks that gather each block's parameters, stays eager."""
    for layer in model.model.layers:
        layer.forward = torch.compile(layer.forward, dynamic=False)
