"""`kolm plan --measure`: the planner's memory model checked against a real single-process
DeepSpeed engine (bf16) on this machine's device, started exactly as `kolm train` starts one."""

from __future__ import annotations

import gc

import torch

from kolm.model.flops import parameter_count
from kolm.model.presets import build_config, get_shape
from kolm.train import distenv, dsconfig
from kolm.train.config import RunConfig
from kolm.train.engine import build_engine, join_process_group
from kolm.train.plan import LAYOUTS, PLAIN, MeasureRequest, activation_bytes, largest_layer_params, model_state_bytes


def _live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _engine(req: MeasureRequest):
    join_process_group(distenv.DistEnv(0, 1, 0, "127.0.0.1", distenv.free_port(), "single"))
    cfg = RunConfig(model=req.model, seq_len=req.seq_len, global_batch=req.micro_batch, micro_batch=req.micro_batch,
                    zero_stage=req.zero_stage, precision="bf16", warmup_steps=1,
                    activation_checkpointing=req.activation_checkpointing)
    ds_config = dsconfig.build(cfg, 1, 1, on_cpu=not torch.cuda.is_available())
    config = build_config(get_shape(req.model), req.vocab, 0, 0, req.seq_len)
    return build_engine(config, ds_config, 0, cfg.weight_decay, req.activation_checkpointing)


def measure(req: MeasureRequest) -> dict:
    """Model-state bytes at their peak (gradients not yet applied) and activation bytes kept for
    backward by one micro batch."""
    engine = _engine(req)
    x = torch.randint(0, req.vocab, (req.micro_batch, req.seq_len + 1), device=engine.device)

    def loss() -> torch.Tensor:
        return engine(input_ids=x[:, :-1], targets=x[:, 1:]) / x[:, 1:].numel()  # the training call

    engine.backward(loss())  # a first step creates the optimizer states
    engine.step()
    engine.backward(loss())
    gc.collect()
    states = _live_tensor_bytes() - x.untyped_storage().nbytes()
    engine.step()
    params = {p.untyped_storage().data_ptr() for p in engine.module.parameters()} | {x.untyped_storage().data_ptr()}
    saved: list = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss()
    kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
            if t.untyped_storage().data_ptr() not in params}
    return {"params": parameter_count(get_shape(req.model), req.vocab), "states": states,
            "activations": sum(kept.values())}


def format_measurement(req: MeasureRequest) -> str:
    shape = get_shape(req.model)
    got = measure(req)
    layout = next(layout for layout in (PLAIN, *LAYOUTS)
                  if layout.zero_stage == req.zero_stage and not layout.offload_optimizer)
    want_states, _ = model_state_bytes(got["params"], largest_layer_params(shape, req.vocab), layout, 1, 1)
    want_act = activation_bytes(shape, req.vocab, req.seq_len, req.micro_batch, req.activation_checkpointing)
    return "\n".join([
        f"measured on this device: {req.model}, ZeRO-{req.zero_stage}, 1 process, micro batch {req.micro_batch}, "
        f"seq_len {req.seq_len}, activation checkpointing {'on' if req.activation_checkpointing else 'off'}",
        f"  model states: estimated {want_states / 2**20:,.1f} MiB, measured {got['states'] / 2**20:,.1f} MiB "
        f"(ratio {want_states / got['states']:.2f})",
        f"  activations:  estimated {want_act / 2**20:,.1f} MiB, measured {got['activations'] / 2**20:,.1f} MiB "
        f"(ratio {want_act / got['activations']:.2f})",
    ])
