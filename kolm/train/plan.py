"""`kolm plan`: memory per GPU, the largest micro batch, a recommended layout, and the time to
train a token budget, for a cluster shape. `--measure` checks the estimate against a real
DeepSpeed engine on this machine's device.

Model states use DeepSpeed's own estimators (ZeRO-2 and ZeRO-3; ZeRO-1 by the same accounting:
full 16-bit parameters and gradients, fp32 master weights, gradients and Adam moments
partitioned). Activations are counted per micro batch for bf16 with a fused attention kernel
(no seq_len^2 score matrix is kept), per layer ACT_PER_LAYER x s x b x h bytes, plus the
logits and their fp32 loss terms; activation checkpointing keeps each layer's input plus one
layer's activations during the recompute.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass

from kolm.errors import KolmError
from kolm.model.presets import PhiShape, flops_per_token, get_shape, padded_vocab, parameter_count

# name: (label, memory in GiB, dense bf16 TFLOP/s from the data sheet)
GPUS = {
    "a100-40": ("A100 40GB", 40, 312.0),
    "a100-80": ("A100 80GB", 80, 312.0),
    "h100": ("H100 80GB SXM", 80, 989.0),
    "h200": ("H200 141GB", 141, 989.0),
}
USABLE = 0.90  # of device memory: the CUDA context, NCCL buffers and allocator fragmentation take the rest
# Bytes per token per hidden unit that one Phi block (intermediate size 4 x hidden) keeps for
# backward: norm, q/k/v and rotary pieces, attention output, the MLP input and gelu_new's
# intermediates (transformers computes it elementwise). Measured with `kolm plan --measure`.
ACT_PER_LAYER = 55
LOGIT_BYTES = 4  # kept per token per vocabulary entry: the fp32 log-softmax
LOGIT_TRANSIENT = 6  # also alive at the loss: the bf16 logits and their fp32 copy
GIB = 1024**3


@dataclass(frozen=True)
class Layout:
    name: str  # the ds_configs/ file
    zero_stage: int
    offload_optimizer: bool = False
    offload_params: bool = False


LAYOUTS = (
    Layout("zero1", 1),
    Layout("zero2", 2),
    Layout("zero3", 3),
    Layout("zero3_offload", 3, offload_optimizer=True),
    Layout("zero3_offload_params", 3, offload_optimizer=True, offload_params=True),
)
# Fastest first: less communication, no offload traffic, no recompute.
PREFERENCE = [("zero2", False), ("zero1", False), ("zero3", False), ("zero2", True), ("zero1", True),
              ("zero3", True), ("zero3_offload", True), ("zero3_offload_params", True)]


def largest_layer_params(shape: PhiShape, vocab: int) -> int:
    block = 4 * (shape.hidden_size**2 + shape.hidden_size) + 2 * shape.hidden_size * shape.intermediate_size
    return max(vocab * shape.hidden_size + vocab, block)


def model_state_bytes(params: int, largest: int, layout: Layout, gpus_per_node: int, nodes: int) -> tuple[int, int]:
    """(bytes per GPU, bytes of CPU memory per node) for parameters, gradients and optimizer states."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    gpus = gpus_per_node * nodes
    if layout.zero_stage == 1:
        # CPU: as DeepSpeed's ZeRO-2 estimate, every process first builds the fp32 model in host memory.
        return 2 * params + 2 * params + int(16 * params / gpus), int(params * 4 * gpus_per_node * 1.5)
    if layout.zero_stage == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=False)
        return gpu, cpu
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest, gpus_per_node, nodes,
                                                        cpu_offload=layout.offload_optimizer,
                                                        cpu_offload_params=layout.offload_params, zero_init=True)
    return gpu, cpu


def activation_bytes(shape: PhiShape, vocab: int, seq_len: int, micro_batch: int, checkpointing: bool) -> int:
    """Bytes kept for backward by one micro batch (bf16)."""
    tokens = seq_len * micro_batch
    layer = ACT_PER_LAYER * tokens * shape.hidden_size
    logits = LOGIT_BYTES * tokens * vocab
    if checkpointing:
        return shape.num_hidden_layers * 2 * tokens * shape.hidden_size + layer + logits
    return shape.num_hidden_layers * layer + logits


def peak_bytes(states: int, shape: PhiShape, vocab: int, seq_len: int, micro_batch: int, checkpointing: bool) -> int:
    """Per GPU: model states, what the micro batch keeps for backward, and the transient logits."""
    transient = LOGIT_TRANSIENT * seq_len * micro_batch * vocab
    return states + activation_bytes(shape, vocab, seq_len, micro_batch, checkpointing) + transient


@dataclass
class Row:
    layout: Layout
    checkpointing: bool
    states: int  # bytes per GPU
    cpu: int  # bytes per node
    act_per_sample: int  # bytes per GPU for micro batch 1
    max_micro_batch: int


def rows(shape: PhiShape, vocab: int, seq_len: int, gpus_per_node: int, nodes: int, gpu_gib: float) -> list[Row]:
    params, largest = parameter_count(shape, vocab), largest_layer_params(shape, vocab)
    budget = USABLE * gpu_gib * GIB
    out = []
    for layout in LAYOUTS:
        states, cpu = model_state_bytes(params, largest, layout, gpus_per_node, nodes)
        for ckpt in (False, True):
            act1 = activation_bytes(shape, vocab, seq_len, 1, ckpt)
            mb = 0
            while mb < 4096 and peak_bytes(states, shape, vocab, seq_len, mb + 1, ckpt) <= budget:
                mb += 1
            out.append(Row(layout, ckpt, states, cpu, act1, mb))
    return out


def recommend(table: list[Row], global_batch: int, gpus: int) -> tuple[Row, int] | None:
    """The fastest layout whose micro batch reaches min(4, per-GPU batch); the micro batch is the
    largest that divides the per-GPU batch."""
    if global_batch % gpus:
        raise KolmError(f"global batch {global_batch} is not divisible by {gpus} GPUs; choose a multiple")
    per_gpu = global_batch // gpus
    want = min(4, per_gpu)
    by_key = {(r.layout.name, r.checkpointing): r for r in table}
    for key in PREFERENCE:
        row = by_key[key]
        if row.max_micro_batch >= want:
            mb = max(d for d in range(1, min(row.max_micro_batch, per_gpu) + 1) if per_gpu % d == 0)
            return row, mb
    fallback = [r for r in table if r.max_micro_batch >= 1]
    if fallback:
        row = min(fallback, key=lambda r: PREFERENCE.index((r.layout.name, r.checkpointing)))
        return row, 1
    return None


def training_time(shape: PhiShape, vocab: int, seq_len: int, tokens: float, gpus: int, tflops: float,
                  mfu: float) -> tuple[float, float]:
    """(wall-clock hours, GPU-hours) to train ``tokens`` at ``mfu`` of the bf16 peak."""
    seconds = tokens * flops_per_token(shape, vocab, seq_len) / (gpus * tflops * 1e12 * mfu)
    return seconds / 3600, seconds * gpus / 3600


def format_plan(model: str, shape: PhiShape, vocab: int, seq_len: int, nodes: int, gpus_per_node: int, gpu: str,
                global_batch: int, tokens: float | None, mfu: float) -> str:
    label, gib, tflops = GPUS[gpu]
    gpus = nodes * gpus_per_node
    params = parameter_count(shape, vocab)
    table = rows(shape, vocab, seq_len, gpus_per_node, nodes, gib)
    lines = [f"{model}: {params / 1e9:.2f}B parameters (vocabulary {vocab:,}), seq_len {seq_len}, "
             f"{nodes} nodes x {gpus_per_node} {label} = {gpus} GPUs, global batch {global_batch}",
             f"memory per GPU (usable: {USABLE:.0%} of {gib} GiB = {USABLE * gib:.1f} GiB):",
             f"  {'layout':<22}{'act. ckpt':<11}{'states GiB':>11}{'act. GiB/sample':>17}{'max micro batch':>17}"
             f"{'CPU GiB/node':>14}"]
    for r in table:
        lines.append(f"  {r.layout.name:<22}{'yes' if r.checkpointing else 'no':<11}{r.states / GIB:>11.2f}"
                     f"{r.act_per_sample / GIB:>17.3f}{r.max_micro_batch:>17}{r.cpu / GIB:>14.1f}")
    choice = recommend(table, global_batch, gpus)
    if choice is None:
        lines.append("nothing fits: use more GPUs, a shorter seq_len or a smaller model")
        return "\n".join(lines)
    row, mb = choice
    accum = global_batch // (gpus * mb)
    lines.append(f"recommended: zero_stage={row.layout.zero_stage} deepspeed_config=ds_configs/{row.layout.name}.json "
                 f"micro_batch={mb} activation_checkpointing={str(row.checkpointing).lower()} "
                 f"(gradient accumulation {accum}; "
                 f"{peak_bytes(row.states, shape, vocab, seq_len, mb, row.checkpointing) / GIB:.1f} GiB "
                 f"per GPU)")
    if tokens:
        hours, gpu_hours = training_time(shape, vocab, seq_len, tokens, gpus, tflops, mfu)
        if row.checkpointing:  # the recompute repeats the forward: 4/3 of the work per token
            hours, gpu_hours = hours * 4 / 3, gpu_hours * 4 / 3
        lines.append(f"time: {tokens / 1e9:.2f}B tokens x {flops_per_token(shape, vocab, seq_len) / 1e9:.2f} GFLOP "
                     f"per token at {mfu:.0%} MFU of {tflops:g} TFLOP/s: {hours:,.1f} h wall clock "
                     f"({hours / 24:.1f} days), {gpu_hours:,.0f} GPU-hours")
    return "\n".join(lines)


def _live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python."""
    import torch

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure(model: str, vocab: int, seq_len: int, micro_batch: int, zero_stage: int, checkpointing: bool) -> dict:
    """Model-state and activation bytes of a real single-process DeepSpeed engine (bf16) on this device."""
    import torch

    from kolm.model.presets import build_config
    from kolm.train import distenv, dsconfig
    from kolm.train.config import RunConfig
    from kolm.train.metrics import token_stats

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    distenv.export(distenv.DistEnv(0, 1, 0, "127.0.0.1", distenv._free_port(), "single"))
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from transformers import PhiForCausalLM

    distenv.start_process_group()
    on_cpu = get_accelerator().device_name() == "cpu"
    cfg = RunConfig(model=model, seq_len=seq_len, global_batch=micro_batch, micro_batch=micro_batch,
                    zero_stage=zero_stage, precision="bf16", warmup_steps=1, activation_checkpointing=checkpointing)
    ds_config = dsconfig.build(cfg, 1, 1, 10, on_cpu)
    shape = get_shape(model)
    torch.manual_seed(0)
    net = PhiForCausalLM(build_config(shape, vocab, 0, 0, seq_len))
    if checkpointing:
        net.gradient_checkpointing_enable()
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=ds_config)
    del net
    x = torch.randint(0, vocab, (micro_batch, seq_len + 1), device=engine.device)

    def forward():
        return token_stats(engine(input_ids=x[:, :-1]).logits, x[:, 1:])

    loss_sum, _, n = forward()  # a first step creates the optimizer states
    engine.backward(loss_sum / n)
    engine.step()
    loss_sum, _, n = forward()
    engine.backward(loss_sum / n)
    del loss_sum
    gc.collect()
    states = _live_tensor_bytes() - x.untyped_storage().nbytes()  # at their peak: gradients not yet applied
    engine.step()
    params = {p.untyped_storage().data_ptr() for p in engine.module.parameters()} | {x.untyped_storage().data_ptr()}
    saved: list = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss_sum, _, n = forward()
    kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
            if t.untyped_storage().data_ptr() not in params}
    return {"params": parameter_count(shape, vocab), "states": states, "activations": sum(kept.values())}


def format_measurement(model: str, vocab: int, seq_len: int, micro_batch: int, zero_stage: int,
                       checkpointing: bool) -> str:
    shape = get_shape(model)
    got = measure(model, vocab, seq_len, micro_batch, zero_stage, checkpointing)
    layout = next(layout for layout in LAYOUTS if layout.zero_stage == zero_stage and not layout.offload_optimizer)
    want_states, _ = model_state_bytes(got["params"], largest_layer_params(shape, vocab), layout, 1, 1)
    want_act = activation_bytes(shape, vocab, seq_len, micro_batch, checkpointing)
    return "\n".join([
        f"measured on this device: {model}, ZeRO-{zero_stage}, 1 process, micro batch {micro_batch}, "
        f"seq_len {seq_len}, activation checkpointing {'on' if checkpointing else 'off'}",
        f"  model states: estimated {want_states / 2**20:,.1f} MiB, measured {got['states'] / 2**20:,.1f} MiB "
        f"(ratio {want_states / got['states']:.2f})",
        f"  activations:  estimated {want_act / 2**20:,.1f} MiB, measured {got['activations'] / 2**20:,.1f} MiB "
        f"(ratio {want_act / got['activations']:.2f})",
    ])


def resolve_vocab(vocab: int | None, shape: PhiShape) -> int:
    v = vocab or shape.vocab_size
    if v < 1:
        raise KolmError(f"--vocab-size must be positive, got {v}")
    return padded_vocab(v)


def tokens_for(tokens: float | None, lines: float | None, tokens_per_line: float, epochs: float) -> float | None:
    if tokens and lines:
        raise KolmError("give either --tokens or --lines, not both")
    if lines:
        return lines * tokens_per_line * epochs
    return tokens * epochs if tokens else None


def check_mfu(mfu: float) -> None:
    if not 0 < mfu <= 1 or math.isnan(mfu):
        raise KolmError(f"--mfu is a fraction between 0 and 1 (e.g. 0.4), got {mfu}")
