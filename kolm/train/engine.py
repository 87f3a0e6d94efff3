"""Start-up: the process group, then PhiForCausalLM with its optimizer and schedule inside a
DeepSpeed engine. One implementation for `kolm train` and `kolm plan --measure`."""

from __future__ import annotations

import os

import torch

from kolm.train import distenv


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
                 compile: bool = False):
    """A fresh model (the same weights for a seed on every rank) inside a DeepSpeed engine."""
    import deepspeed

    from kolm.model.phi import PhiForTraining

    torch.manual_seed(seed)
    model = PhiForTraining(model_config)
    if activation_checkpointing:
        model.gradient_checkpointing_enable()
    if compile:
        compile_blocks(model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay),
                                      config=ds_config)
    return engine


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and LayerNorm weights are exempt, as in HF Trainer."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "layernorm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each decoder block's forward (regional compilation: one small graph, compiled
    once and reused by every block, so start-up stays short). The module call around it, with
    DeepSpeed's ZeRO-3 hooks that gather each block's parameters, stays eager."""
    for layer in model.model.layers:
        layer.forward = torch.compile(layer.forward, dynamic=False)
