"""`kolm plan`: memory per GPU, the largest micro batch, a recommended layout, and the time to
train a token budget, for a cluster shape. `--measure` checks the estimate against a real
DeepSpeed engine on this machine's device (kolm.train.measure).

Model states use DeepSpeed's own estimators (ZeRO-2 and ZeRO-3; ZeRO-1 by the same accounting:
full 16-bit parameters and gradients, fp32 master weights, gradients and Adam moments
partitioned). Activations are counted per micro batch for bf16 with a fused attention kernel
(no seq_len^2 score matrix is kept), per layer ACT_PER_LAYER x s x b x h bytes. The loss is
fused with the LM head (kolm.model.loss): it keeps the gradient of the last hidden state and an
fp32 gradient of the output matrix, and holds the logits one chunk at a time. Activation
checkpointing keeps each layer's input plus one layer's activations during the recompute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kolm.errors import KolmError
from kolm.model.flops import CHUNK_ELEMENTS, flops_per_token, parameter_count
from kolm.model.presets import PhiShape, get_shape, padded_vocab
from kolm.train.hardware import CARDS
from kolm.train.rampup import BatchSchedule

USABLE = 0.90  # of device memory: the CUDA context, NCCL buffers and allocator fragmentation take the rest
# Bytes per token per hidden unit that one Phi block (intermediate size 4 x hidden) keeps for
# backward: norm, q/k/v and rotary pieces, attention output, the MLP input and gelu_new's
# intermediates (transformers computes it elementwise). Measured with `kolm plan --measure`.
ACT_PER_LAYER = 55
HEAD_GRAD_BYTES = 4  # per LM-head parameter: the fused loss's fp32 gradient of the output matrix and bias
CHUNK_TRANSIENT = CHUNK_ELEMENTS * (4 + 2)  # one chunk's fp32 logits and their bf16 gradient
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
# Plain data parallel (`zero_stage: 0`): every GPU holds the whole model state. Not in the table nor
# among the recommendations: whether it beats ZeRO-2 on one GPU awaits a GPU measurement
# (bench/gpu_bench.py --zero-stages 0,1,2); `kolm plan --measure --zero-stage 0` checks its estimate.
PLAIN = Layout("zero0", 0)
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
    if layout.zero_stage == 0:
        # bf16 parameters and gradients, fp32 master weights and Adam moments, and the fp32 copy of the
        # gradients DeepSpeed's bf16 optimizer makes for the step: 20 bytes per parameter on every GPU.
        return 20 * params, int(params * 4 * gpus_per_node * 1.5)
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
    head = 2 * tokens * shape.hidden_size + HEAD_GRAD_BYTES * vocab * (shape.hidden_size + 1)
    if checkpointing:
        return shape.num_hidden_layers * 2 * tokens * shape.hidden_size + layer + head
    return shape.num_hidden_layers * layer + head


def peak_bytes(states: int, shape: PhiShape, vocab: int, seq_len: int, micro_batch: int, checkpointing: bool) -> int:
    """Per GPU: model states, what the micro batch keeps for backward, and one chunk of logits."""
    return states + activation_bytes(shape, vocab, seq_len, micro_batch, checkpointing) + CHUNK_TRANSIENT


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


@dataclass
class MeasureRequest:
    """The engine `kolm plan --measure` builds (kolm.train.measure); every default lives here."""

    model: str = "phi-1.5"
    vocab: int = 51200
    seq_len: int = 512
    micro_batch: int = 2
    zero_stage: int = 2
    activation_checkpointing: bool = False


@dataclass
class PlanRequest:
    """A cluster shape and token budget to plan for; every default of `kolm plan` lives here."""

    model: str = "phi-1.5"
    vocab_size: int | None = None  # the tokenizer's vocabulary; None: the preset's
    seq_len: int = 512
    nodes: int = 1
    gpus_per_node: int = 8
    gpu: str = "a100-80"  # a key of kolm.train.hardware.CARDS
    global_batch: int = 256
    tokens: float | None = None  # tokens per epoch
    lines: float | None = None  # corpus lines per epoch, instead of tokens
    tokens_per_line: float = 30.0
    epochs: float = 1.0
    mfu: float = 0.40  # assumed model FLOPs utilization for the time estimate
    rampup_batch_size: list | None = None  # [start, increment, samples], as the recipe key

    @property
    def schedule(self) -> BatchSchedule:
        return BatchSchedule.from_config(self.global_batch, self.rampup_batch_size)

    @property
    def shape(self) -> PhiShape:
        return get_shape(self.model)

    @property
    def vocab(self) -> int:
        return resolve_vocab(self.vocab_size, self.shape)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def validate(self) -> None:
        shape = self.shape
        for name in ("seq_len", "nodes", "gpus_per_node", "global_batch"):
            if getattr(self, name) < 1:
                raise KolmError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq_len > shape.max_position_embeddings:
            raise KolmError(f"--seq-len {self.seq_len} exceeds {self.model}'s {shape.max_position_embeddings} "
                            "positions")
        if self.gpu not in CARDS:
            raise KolmError(f"--gpu {self.gpu!r} is not one of {', '.join(CARDS)}")
        if not 0 < self.mfu <= 1 or math.isnan(self.mfu):
            raise KolmError(f"--mfu is a fraction between 0 and 1 (e.g. 0.4), got {self.mfu}")
        self.vocab  # noqa: B018 (validates the vocabulary)
        self.budget_tokens()
        self.schedule.check_layout(1, self.gpus)

    def budget_tokens(self) -> float | None:
        if self.tokens and self.lines:
            raise KolmError("give either --tokens or --lines, not both")
        if self.lines:
            return self.lines * self.tokens_per_line * self.epochs
        return self.tokens * self.epochs if self.tokens else None


def resolve_vocab(vocab: int | None, shape: PhiShape) -> int:
    v = vocab or shape.vocab_size
    if v < 1:
        raise KolmError(f"--vocab-size must be positive, got {v}")
    return padded_vocab(v)


def format_plan(req: PlanRequest) -> str:
    """The memory table, the recommended layout and the time estimate, as text."""
    card = CARDS[req.gpu]
    shape, vocab = req.shape, req.vocab
    table = rows(shape, vocab, req.seq_len, req.gpus_per_node, req.nodes, card.memory_gib)
    lines = [f"{req.model}: {parameter_count(shape, vocab) / 1e9:.2f}B parameters (vocabulary {vocab:,}), "
             f"seq_len {req.seq_len}, {req.nodes} nodes x {req.gpus_per_node} {card.label} = {req.gpus} GPUs, "
             f"global batch {req.global_batch}",
             *_format_table(table, card.memory_gib)]
    choice = recommend(table, req.global_batch, req.gpus)
    if choice is None:
        lines.append("nothing fits: use more GPUs, a shorter seq_len or a smaller model")
        return "\n".join(lines)
    row, unramped = choice
    mb = ramp_micro_batch(req.schedule, unramped, req.gpus)
    peak = peak_bytes(row.states, shape, vocab, req.seq_len, mb, row.checkpointing)
    lines.append(f"recommended: zero_stage={row.layout.zero_stage} deepspeed_config=ds_configs/{row.layout.name}.json "
                 f"micro_batch={mb} activation_checkpointing={str(row.checkpointing).lower()} "
                 f"(gradient accumulation {req.global_batch // (req.gpus * mb)}; {peak / GIB:.1f} GiB per GPU)")
    tokens = req.budget_tokens()
    if tokens:
        lines.append(_format_time(req, tokens, card.bf16_tflops, row.checkpointing))
        if req.schedule.ramped:
            lines += _format_ramp(req, tokens, mb, unramped)
    return "\n".join(lines)


def ramp_micro_batch(schedule: BatchSchedule, mb: int, gpus: int) -> int:
    """The largest micro batch up to ``mb`` that splits every batch of the ramp over the GPUs."""
    return max(d for d in range(1, mb + 1) if all(b % (d * gpus) == 0 for b in schedule.sizes()))


def _format_ramp(req: PlanRequest, tokens: float, mb: int, unramped: int) -> list[str]:
    """The ramp's steps within the token budget: same tokens and FLOPs, more (smaller) optimizer steps."""
    schedule = req.schedule
    full_steps = math.ceil(tokens / req.seq_len / req.global_batch)
    steps = schedule.steps_to(full_steps * req.global_batch)
    ramp_end = schedule.segments()[-1]
    share = min(1.0, ramp_end.first_sample * req.seq_len / tokens)
    capped = (f"; the ramp's batches cap the micro batch at {mb} ({unramped} without the ramp), which usually "
              "lowers the MFU: check it with --measure --micro-batch " + str(mb)) if mb < unramped else ""
    return [f"ramp {schedule.start} -> {req.global_batch} by {schedule.increment} over {schedule.samples:,} samples: "
            f"{steps:,} optimizer steps instead of {full_steps:,}, the first {ramp_end.first_step - 1:,} "
            f"({share:.2%} of the tokens) at smaller batches. The same tokens and FLOPs: at the same MFU the "
            f"same time{capped}",
            schedule.table(mb, req.gpus, steps)]


def _format_table(table: list[Row], gib: float) -> list[str]:
    lines = [f"memory per GPU (usable: {USABLE:.0%} of {gib:g} GiB = {USABLE * gib:.1f} GiB):",
             f"  {'layout':<22}{'act. ckpt':<11}{'states GiB':>11}{'act. GiB (mb 1)':>17}{'max micro batch':>17}"
             f"{'CPU GiB/node':>14}"]
    for r in table:
        lines.append(f"  {r.layout.name:<22}{'yes' if r.checkpointing else 'no':<11}{r.states / GIB:>11.2f}"
                     f"{r.act_per_sample / GIB:>17.3f}{r.max_micro_batch:>17}{r.cpu / GIB:>14.1f}")
    return lines


def _format_time(req: PlanRequest, tokens: float, tflops: float, checkpointing: bool) -> str:
    shape, vocab = req.shape, req.vocab
    hours, gpu_hours = training_time(shape, vocab, req.seq_len, tokens, req.gpus, tflops, req.mfu)
    if checkpointing:  # the recompute repeats the forward: 4/3 of the work per token
        hours, gpu_hours = hours * 4 / 3, gpu_hours * 4 / 3
    return (f"time: {tokens / 1e9:.2f}B tokens x {flops_per_token(shape, vocab, req.seq_len) / 1e9:.2f} GFLOP "
            f"per token at {req.mfu:.0%} MFU of {tflops:g} TFLOP/s: {hours:,.1f} h wall clock "
            f"({hours / 24:.1f} days), {gpu_hours:,.0f} GPU-hours")
