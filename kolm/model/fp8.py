"""``precision: fp8``: the decoder blocks' linear layers (q, k, v, dense, fc1, fc2) train in float8
through torchao's float8 training (dynamic per-tensor scales; the matrix products in float8, the
weights, their fp32 master copies and everything else as in bf16). The embedding, the norms and the
LM head stay bf16.

torchao swaps each ``nn.Linear`` for its ``Float8Linear``, a subclass with the same ``weight`` and
``bias`` parameters, so parameter names, checkpoints and exported Hugging Face models are those of
plain ``PhiForCausalLM``. Float8 matrix products need a CUDA GPU of compute capability 9.0 or newer
(Hopper); torchao's emulation mode runs the same casts on any device (tests).
"""

from __future__ import annotations

import torch

from kolm.errors import KolmError

MIN_CAPABILITY = (9, 0)
INSTALL = "pip install 'kolm[fp8]' (torchao)"


def fp8_unavailable() -> str | None:
    """Why this machine cannot train in fp8, naming its device; None when it can."""
    if not torch.cuda.is_available():
        return "this machine has no CUDA device"
    capability = torch.cuda.get_device_capability(0)
    if capability < MIN_CAPABILITY:
        return (f"its GPU, {torch.cuda.get_device_name(0)}, has compute capability {capability[0]}.{capability[1]} "
                f"(float8 matrix products need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: Hopper, e.g. H100 or H200)")
    if _torchao() is None:
        return f"torchao is not installed ({INSTALL})"
    return None


def _torchao():
    try:
        import torchao.float8 as float8
    except ImportError:
        return None
    return float8


def _fits(module: torch.nn.Module, fqn: str) -> bool:
    """Float8 matrix products need both dimensions to be multiples of 16."""
    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_blocks(model: torch.nn.Module, emulate: bool = False) -> int:
    """Swap the decoder blocks' linear layers for torchao's Float8Linear in place (the LM head and
    everything outside the blocks untouched); returns how many were swapped."""
    float8 = _torchao()
    if float8 is None:
        raise KolmError(f"precision=fp8 needs torchao: {INSTALL}")
    config = float8.Float8LinearConfig(emulate=emulate)
    float8.convert_to_float8_training(model.model.layers, module_filter_fn=_fits, config=config)
    from torchao.float8.float8_linear import Float8Linear

    swapped = sum(isinstance(m, Float8Linear) for m in model.model.layers.modules())
    if swapped == 0:
        raise KolmError("precision=fp8 found no linear layer whose dimensions are multiples of 16 in the decoder "
                        "blocks; use precision=bf16 for this model shape")
    return swapped
