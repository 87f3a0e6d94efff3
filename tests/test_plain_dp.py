"""The fp32 stage-0 optimizer wrapper: the gradient norm is measured before clipping, a non-finite
step is skipped (and reported as such), and a finite one clips and steps as DeepSpeed would."""

from __future__ import annotations

import math

import pytest
import torch

from kolm.train.plain_dp import CheckedOptimizer

pytestmark = pytest.mark.unit


def _setup(max_norm: float) -> tuple[torch.nn.Linear, CheckedOptimizer]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    return layer, CheckedOptimizer(torch.optim.AdamW(layer.parameters(), lr=0.1), max_norm)


def test_finite_step_measures_the_unclipped_norm_then_clips_and_steps():
    layer, opt = _setup(max_norm=0.5)
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(layer.state_dict())
    plain = torch.optim.AdamW(twin.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    for model in (layer, twin):
        (model(x) ** 2).sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    plain.step()
    opt.step()
    assert opt._global_grad_norm == pytest.approx(float(expected)) and expected > 0.5 and not opt.overflow
    for a, b in zip(layer.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_non_finite_step_is_skipped():
    layer, opt = _setup(max_norm=1.0)
    before = [p.detach().clone() for p in layer.parameters()]
    (layer(torch.randn(2, 4)).sum() * float("nan")).backward()
    opt.step()
    assert opt.overflow and math.isnan(opt._global_grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), before))
    assert not opt.state  # no moment was updated either
    assert opt.state_dict()["param_groups"][0]["lr"] == 0.1


def test_fused_bf16_stage0_layout_reads_the_masters_by_group_order(tmp_path):
    """DeepSpeed's fused bf16 optimizer at stage 0 (on GPUs, with FusedAdam) saves one flat fp32
    tensor per parameter group (the group's parameters concatenated in order): the consolidation reads
    each parameter's master copy from it by the group order kolm records in the marker."""
    import json

    from kolm.train.checkpoint import MARKER, Checkpoint, consolidated_state_dict

    torch.manual_seed(0)
    masters = {"a.weight": torch.randn(3, 4), "b.weight": torch.randn(2, 4), "a.bias": torch.randn(3)}
    groups = [["a.weight", "b.weight"], ["a.bias"]]
    path = tmp_path / "global_step1"
    path.mkdir()
    module = {name: t.to(torch.bfloat16) for name, t in masters.items()}
    flat = [torch.cat([masters[n].flatten() for n in g]) for g in groups]
    torch.save({"module": module, "buffer_names": [], "optimizer": {"fp32_groups_flat": flat, "cur_scale": 1.0}},
               path / "mp_rank_00_model_states.pt")
    marker = {"zero_stage": 0, "param_group_names": groups, "run_config": {"trainable": "all"}}
    (path / MARKER).write_text(json.dumps(marker))
    state = consolidated_state_dict(Checkpoint(path, 1, marker))
    assert set(state) == set(masters)
    for name, value in masters.items():
        assert torch.equal(state[name], value)
