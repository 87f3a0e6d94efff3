"""PackedDataset: windows cover the stream, and the sample order ignores world size and restarts."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kolm.data.indexed import open_tokens
from kolm.data.packed import PackedDataset, check_batch_layout, eval_split
from kolm.data.shard import ShardOptions, run_shard
from kolm.errors import KolmError

pytestmark = pytest.mark.unit
SEQ = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory, korean_corpus, tokenizer_dir):
    out = tmp_path_factory.mktemp("packed") / "shards"
    # Small shards so windows cross shard boundaries.
    options = ShardOptions(valid_fraction=0.05, max_shard_tokens=3000, chunk_docs=64)
    run_shard([str(korean_corpus)], str(tokenizer_dir), out, options, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def dataset(shards) -> PackedDataset:
    return PackedDataset(shards, "train", SEQ, seed=7)


def _stream(ds: PackedDataset) -> np.ndarray:
    sd = ds.shard_dir
    return np.concatenate([open_tokens(sd.shard_path(e, ".bin"), sd.dtype) for e in sd.shards("train")])


def test_windows_tile_the_stream_without_padding(dataset):
    stream = _stream(dataset)
    assert len(dataset.shard_dir.shards("train")) > 2, "fixture should span several shards"
    assert dataset.num_samples == (len(stream) - 1) // SEQ
    for i in (0, 1, dataset.num_samples // 2, dataset.num_samples - 1):
        np.testing.assert_array_equal(dataset.window(i), stream[i * SEQ : i * SEQ + SEQ + 1])
    # Consecutive windows overlap by exactly one token: inputs and shifted labels lose nothing.
    assert dataset.window(0)[-1] == dataset.window(1)[0]


def test_each_epoch_is_a_permutation_seeded_by_seed_and_epoch(dataset, shards):
    p0, p1 = dataset.permutation(0).copy(), dataset.permutation(1).copy()
    assert sorted(p0) == list(range(dataset.num_samples))
    assert not np.array_equal(p0, p1)
    again = PackedDataset(shards, "train", SEQ, seed=7)
    np.testing.assert_array_equal(again.permutation(1), p1)
    other_seed = PackedDataset(shards, "train", SEQ, seed=8)
    assert not np.array_equal(other_seed.permutation(0), p0)


def _global_batches(ds: PackedDataset, world: int, micro: int, global_batch: int, steps: int, consumed: int = 0):
    """What each optimizer step sees, gathered over all ranks in rank order."""
    accum = check_batch_layout(global_batch, micro, world)
    iters = [ds.rank_batches(consumed, global_batch, micro, r, world) for r in range(world)]
    return [np.concatenate([next(it) for it in iters for _ in range(accum)]) for _ in range(steps)]


@settings(max_examples=15, deadline=None)
@given(world=st.sampled_from([1, 2, 4]), resume_at=st.integers(0, 6))
def test_order_is_independent_of_world_size_and_resume(dataset, world, resume_at):
    gb, micro = 8, 2
    reference = _global_batches(dataset, 1, micro, gb, steps=8)
    fresh = _global_batches(dataset, world, micro, gb, steps=8)
    for a, b in zip(reference, fresh, strict=True):
        np.testing.assert_array_equal(a, b)
    resumed = _global_batches(dataset, world, micro, gb, steps=8 - resume_at, consumed=resume_at * gb)
    for a, b in zip(reference[resume_at:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_epochs_follow_one_another(dataset):
    n = dataset.num_samples
    last_of_epoch0 = dataset.window(dataset.permutation(0)[n - 1])
    first_of_epoch1 = dataset.window(dataset.permutation(1)[0])
    np.testing.assert_array_equal(dataset.samples(n - 1, 2), np.stack([last_of_epoch0, first_of_epoch1]))


def test_eval_batches_cover_every_window_once(shards):
    ds = PackedDataset(shards, "valid", 8)
    batches = [list(ds.eval_batches(4, r, 3)) for r in range(3)]
    assert len({len(b) for b in batches}) == 1  # the same number of forwards on every rank
    seen = [tuple(w) for rank in batches for b, scored in rank if scored for w in b]
    assert sorted(seen) == sorted(tuple(ds.window(i)) for i in range(ds.num_samples))
    padding = [b for rank in batches for b, scored in rank if not scored]
    assert all(b.shape == (1, 9) for b in padding)
    rounds, real = -(-ds.num_samples // 12), -(-ds.num_samples // 4)
    assert len(padding) == 3 * rounds - real


@pytest.mark.parametrize(("windows", "micro", "world"),
                         [(100, 4, 8), (4, 4, 8), (5, 2, 2), (32, 2, 2), (1, 3, 4), (17, 1, 3), (64, 4, 8), (0, 2, 2),
                          (9, 4, 1)])
def test_eval_split_gives_every_rank_as_many_batches_and_each_window_once(windows, micro, world):
    split = [eval_split(windows, micro, r, world) for r in range(world)]
    assert len({len(batches) for batches in split}) == 1
    counted = sorted(i for batches in split for b in batches for i in b)
    assert counted == list(range(windows))
    assert all(len(b) <= micro for batches in split for b in batches)
    if windows % (micro * world) == 0:  # an even layout: rank r's every world-th batch, no padding
        for r, batches in enumerate(split):
            starts = range(r * micro, windows, world * micro)
            assert batches == [range(s, s + micro) for s in starts]


def test_eval_batches_of_no_window_yield_nothing(shards):
    ds = PackedDataset(shards, "valid", 8)
    assert list(ds.eval_batches(2, 0, 2, max_samples=0)) == list(ds.eval_batches(2, 1, 2, max_samples=-3)) == []


def test_fingerprint_names_data_and_layout(dataset, shards):
    fp = dataset.fingerprint
    assert fp["seq_len"] == SEQ and fp["seed"] == 7 and len(fp["manifest_sha256"]) == 64
    assert PackedDataset(shards, "train", SEQ + 1, seed=7).fingerprint != fp


def test_impossible_layouts_and_resume_points_are_clear_errors(dataset):
    with pytest.raises(KolmError, match="not divisible by micro batch 3"):
        check_batch_layout(16, 3, 2)
    with pytest.raises(KolmError, match="not a multiple of the global batch"):
        next(dataset.rank_batches(5, 8, 2, 0, 2))
    with pytest.raises(KolmError, match="not enough for one window"):
        PackedDataset(dataset.shard_dir.path, "valid", 10**7)


def test_damaged_shard_is_refused_on_open(tmp_path, shards):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    victim = next((copy / "train").glob("*.bin"))
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(KolmError, match="kolm shard verify"):
        PackedDataset(copy, "train", SEQ)


def test_token_outside_the_vocabulary_is_named_when_read(tmp_path, shards):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    victim = next((copy / "train").glob("*.bin"))
    data = bytearray(victim.read_bytes())
    data[2 * 37 + 1] = 0xFF  # the high byte of token 37 (uint16, little-endian): an id far past the vocabulary
    victim.write_bytes(bytes(data))
    dataset = PackedDataset(copy, "train", SEQ)  # same size: opening cannot tell
    with pytest.raises(KolmError, match=rf"{re.escape(str(victim))}: token 37 has id \d+, outside the vocabulary"):
        for i in range(len(dataset)):
            dataset.window(i)
