"""Parameter and training-FLOP counts of a Phi shape (the MFU numerator and the planner's clock)."""

from __future__ import annotations

from kolm.model.presets import PhiShape

# Logits the fused loss (kolm.model.loss) holds at once: 128 MiB in fp32; tokens per chunk are this
# divided by the vocabulary. Here, beside the other counts, for the planner's memory model.
CHUNK_ELEMENTS = 1 << 25


def parameter_count(shape: PhiShape, vocab_size: int) -> int:
    """Parameters of `PhiForCausalLM` (embeddings, blocks, final norm, biased LM head)."""
    h, i, n = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    block = 2 * h + 4 * (h * h + h) + (h * i + i) + (i * h + h)
    return vocab_size * h + n * block + 2 * h + vocab_size * h + vocab_size


def flops_per_token(shape: PhiShape, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N (N without the input embedding, a lookup) plus the
    attention score and value matmuls, 12 * layers * hidden * seq_len (as in PaLM's appendix)."""
    n = parameter_count(shape, vocab_size) - vocab_size * shape.hidden_size
    return 6.0 * n + 12.0 * shape.num_hidden_layers * shape.hidden_size * seq_len
