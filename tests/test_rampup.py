"""The batch ramp (kolm.train.rampup) against Megatron-LM's rule, its refusals, the learning-rate
schedule by consumed samples, and the data order a ramp takes on any number of ranks."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from kolm.data.packed import rank_batches
from kolm.errors import KolmError
from kolm.train.lr_schedule import LRSchedule
from kolm.train.rampup import BatchSchedule

pytestmark = pytest.mark.unit


def megatron_batch(consumed: int, start: int, increment: int, samples: int, global_batch: int) -> int:
    """Megatron's RampupBatchsizeNumMicroBatches rule, in exact arithmetic: ``increment`` more every
    ``samples / n`` consumed samples, the full batch past ``samples``."""
    n = (global_batch - start) // increment
    if consumed > samples:
        return global_batch
    return start + math.floor(Fraction(consumed) / Fraction(samples, n)) * increment


def megatron_steps(ramp: list[int], global_batch: int, steps: int) -> list[tuple[int, int]]:
    """(batch, consumed before the step) for the first ``steps`` steps of Megatron's training loop."""
    out, consumed = [], 0
    for _ in range(steps):
        batch = megatron_batch(consumed, *ramp, global_batch)
        out.append((batch, consumed))
        consumed += batch
    return out


RAMPS = [([4, 4, 48], 16), ([8, 2, 10], 16), ([32, 32, 4_882_812], 1536), ([16, 16, 5_859_375], 1024),
         ([6, 6, 72], 24), ([1, 1, 7], 5), ([3, 5, 1000], 23)]


@pytest.mark.parametrize(("ramp", "global_batch"), RAMPS)
def test_schedule_matches_megatrons_rule_step_by_step(ramp, global_batch):
    s = BatchSchedule.from_config(global_batch, ramp)
    ramp_steps = s.steps_to(ramp[2]) + 3
    reference = megatron_steps(ramp, global_batch, ramp_steps)
    assert [(s.batch_at(c), s.consumed_after(k)) for k, (_, c) in enumerate(reference)] == reference
    # Every sample count, not only the ones a run reaches (small ramps).
    for c in range(0, min(ramp[2], 5000) + 2):
        assert s.batch_at(c) == megatron_batch(c, *ramp, global_batch)
    segments = s.segments()
    assert [seg.batch for seg in segments] == sorted({b for b, _ in reference})
    for seg in segments[:-1]:
        assert [b for b, _ in reference[seg.first_step - 1:seg.first_step - 1 + seg.steps]] == [seg.batch] * seg.steps
        assert reference[seg.first_step - 1][1] == seg.first_sample
    assert segments[-1].steps is None and reference[segments[-1].first_step - 1] == (global_batch,
                                                                                     segments[-1].first_sample)


def test_a_small_ramp_by_hand():
    s = BatchSchedule.from_config(16, [4, 4, 48])
    assert [s.batch_at(s.consumed_after(k)) for k in range(10)] == [4, 4, 4, 4, 8, 8, 12, 12, 16, 16]
    assert [(g.batch, g.first_step, g.first_sample, g.steps) for g in s.segments()] == [
        (4, 1, 0, 4), (8, 5, 16, 2), (12, 7, 32, 2), (16, 9, 56, None)]
    assert s.steps_to(8 * 16) == 13 and s.consumed_after(13) == 136  # the last step runs past 128
    table = s.table(micro_batch=2, ranks=2, total_steps=13)
    assert "13 steps in all" in table
    assert [line.split() for line in table.splitlines()[2:]] == [
        ["4", "1", "0", "4", "1"], ["8", "5", "16", "2", "2"], ["12", "7", "32", "2", "3"], ["16", "9", "56", "5", "4"]]


def test_without_a_ramp_the_batch_is_constant():
    s = BatchSchedule.from_config(256, [])
    assert not s.ramped and s.batch_at(0) == s.batch_at(10**12) == 256
    assert s.steps_to(256 * 1000) == 1000 and s.consumed_after(7) == 7 * 256


@pytest.mark.parametrize(("ramp", "message"), [
    ([4, 4], r"is \[start, increment, samples\] \(three integers\)"),
    ([4, "a", 10], "three integers"),
    ([0, 4, 100], "must all be positive"),
    ([4, -4, 100], "must all be positive"),
    ([4, 4, 0], "must all be positive"),
    ([16, 4, 100], "starts at 16, not below global_batch 16"),
    ([4, 5, 100], "16 minus start 4 = 12 is not a multiple of the increment 5"),
])
def test_a_malformed_ramp_is_refused(ramp, message):
    with pytest.raises(KolmError, match=message):
        BatchSchedule.from_config(16, ramp)


@pytest.mark.parametrize(("ramp", "micro", "ranks", "first_bad"), [
    ([2, 2, 100], 2, 2, 2),  # the start
    ([4, 2, 100], 2, 2, 6),  # the first increment
    ([4, 4, 100], 2, 3, 4),
    ([12, 12, 100], 2, 3, None),
])
def test_every_batch_of_the_ramp_must_split_over_ranks_and_micro_batch(ramp, micro, ranks, first_bad):
    s = BatchSchedule.from_config(36 if ramp[0] == 12 else 16, ramp)
    if first_bad is None:
        s.check_layout(micro, ranks)
        return
    with pytest.raises(KolmError, match=f"batch {first_bad} of the ramp is not divisible by micro batch {micro} x "
                                        f"{ranks} data-parallel ranks = {micro * ranks}"):
        s.check_layout(micro, ranks)


def test_learning_rate_counts_samples_and_the_first_step_already_moves():
    full = LRSchedule.for_run(1.0, 0.1, warmup_steps=4, total_full_steps=10, global_batch=16)
    # A constant batch: step k (ending with 16k samples) gets k/4 of the peak during warmup.
    assert [full.at(16 * k) for k in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]
    assert full.at(16 * 10) == pytest.approx(0.1) and full.at(16 * 50) == pytest.approx(0.1)
    assert full.at(16 * 7) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 2)) / 2)
    # A ramp's small steps advance the schedule by their own samples only.
    assert full.at(4) == pytest.approx(4 / 64) and full.at(12) == pytest.approx(12 / 64)
    none = LRSchedule.for_run(1.0, 0.0, warmup_steps=0, total_full_steps=10, global_batch=16)
    assert none.at(16) == pytest.approx((1 + math.cos(math.pi * 16 / 160)) / 2)


@pytest.mark.parametrize("world", [1, 2, 3, 6])
def test_a_ramp_takes_the_same_samples_on_any_number_of_ranks(world):
    s = BatchSchedule.from_config(24, [6, 6, 72])
    stream = lambda start, count: np.arange(start, start + count)[:, None]  # noqa: E731 (sample ids)
    steps = 12
    per_rank = [rank_batches(stream, 0, 24, 1, r, world, s.batch_at) for r in range(world)]
    for k in range(steps):
        batch = s.batch_at(s.consumed_after(k))
        taken = [int(next(per_rank[r])[0, 0]) for r in range(world) for _ in range(batch // world)]
        assert taken == list(range(s.consumed_after(k), s.consumed_after(k + 1)))
    # A resume mid-ramp starts from the checkpoint's count with the step it would have taken.
    resumed = rank_batches(stream, s.consumed_after(5), 24, 1, 0, world, s.batch_at)
    assert int(next(resumed)[0, 0]) == s.consumed_after(5)


def test_a_deepspeed_json_with_its_own_scheduler_is_refused(tmp_path):
    import json

    from kolm.train import dsconfig
    from kolm.train.config import RunConfig

    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}}}))
    cfg = RunConfig(data="d", tokenizer="t", run_dir="r", deepspeed_config=str(user))
    with pytest.raises(KolmError, match="sets scheduler = .* but kolm sets the learning rate itself"):
        dsconfig.build(cfg, 1, 64, True)
    assert "scheduler" not in dsconfig.build(RunConfig(data="d", tokenizer="t", run_dir="r"), 1, 64, True)


def test_the_recipe_key_takes_a_list_or_nothing(tmp_path):
    from kolm.train.config import load_config

    base = ["data=/d", "tokenizer=/t", "run_dir=/r", "global_batch=16", "micro_batch=2"]
    assert load_config(None, [*base, "rampup_batch_size=[4, 4, 1000]"]).rampup_batch_size == [4, 4, 1000]
    assert load_config(None, [*base, "rampup_batch_size=null"]).batch_schedule().ramped is False
    with pytest.raises(KolmError, match="`rampup_batch_size` in the command line must be list"):
        load_config(None, [*base, "rampup_batch_size=4"])
    with pytest.raises(KolmError, match="batch 6 of the ramp is not divisible by micro batch 4 x 1"):
        load_config(None, [*base, "micro_batch=4", "rampup_batch_size=[6, 2, 100]"])
