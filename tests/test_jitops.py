"""DeepSpeed's op builds under the CUDA architecture lists that PyTorch's own images set."""

from __future__ import annotations

import os

import pytest

from kolm.train.jitops import deepspeed_arch_list, fix_arch_list

pytestmark = pytest.mark.unit


def _deepspeed_arch_args():
    """What DeepSpeed's CUDA builder makes of TORCH_CUDA_ARCH_LIST for a just-in-time build."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

    builder = FusedAdamBuilder()
    builder.jit_mode = True
    return builder.compute_capability_args()


@pytest.mark.parametrize("value, plain", [
    ("9.0a", "9.0"),
    ("8.0 8.6 9.0a+PTX", "8.0;8.6;9.0+PTX"),
    ("7.5;8.0;9.0;10.0f;12.0a", "7.5;8.0;9.0;10.0;12.0"),
    ("8.0;9.0a;9.0", "8.0;9.0"),
    ("9.0", "9.0"),
])
def test_architecture_specific_entries_become_ones_deepspeed_builds_for(monkeypatch, value, plain):
    assert deepspeed_arch_list(value) == plain
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
    if plain != value:
        with pytest.raises(ValueError, match="invalid literal"):  # why kolm rewrites the list
            _deepspeed_arch_args()
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
    fix_arch_list()
    assert _deepspeed_arch_args() == []  # just-in-time: DeepSpeed hands the list to torch's builder
    assert plain.split("+")[0].split(";")[-1] in os.environ["TORCH_CUDA_ARCH_LIST"]


def test_an_unset_list_is_left_unset(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    fix_arch_list()
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ
