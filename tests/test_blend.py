"""Data mixtures: the blending rule, per-source epochs, rank-independent order, bad blends."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kolm.data.blend import BlendedDataset, Source, blend_period, parse_sources, shares
from kolm.errors import KolmError

pytestmark = pytest.mark.unit
SEQ = 64


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(1, 20), st.sampled_from([0.6, 0.3, 0.1, 0.25, 0.05, 1.5, 2.0])), min_size=1,
                max_size=5))
def test_every_prefix_takes_within_one_of_each_share(weights):
    fractions = shares(weights)
    assert sum(fractions) == 1
    choice, _, _ = blend_period(fractions)
    counts = np.zeros(len(weights))
    for n in range(min(3 * len(choice), 4000)):
        counts[choice[n % len(choice)]] += 1
        expected = np.array([float(f) * (n + 1) for f in fractions])
        assert np.abs(counts - expected).max() < 1


def test_odd_weights_are_rounded_to_a_bounded_period():
    fractions = shares([0.1234567, 1 / 3, 0.5])
    assert sum(fractions) == 1 and max(f.denominator for f in fractions) <= 1_000_000


@pytest.fixture(scope="module")
def two_sources(shards, second_shards) -> list[Source]:
    return [Source(str(shards), 0.75, "all"), Source(str(second_shards), 0.25, "")]


def test_each_source_follows_its_own_permutation_and_wraps_to_its_next_epoch(two_sources):
    blend = BlendedDataset(two_sources, "train", SEQ, seed=7)
    small = blend.datasets[1]
    n = 4 * small.num_samples * 4  # far past the small source's end: several of its epochs
    taken = [0, 0]
    for g in range(0, n, 97):  # spot checks along the stream
        i, k = blend.locate(g)
        assert k == blend.taken(g)[i]
    for g in range(n):
        i, k = blend.locate(g)
        assert k == taken[i]
        taken[i] += 1
    assert blend.taken(n) == taken and blend.epochs(n)[1] >= 3
    second_epoch = small.permutation(1)
    first = next(g for g in range(n) if blend.locate(g) == (1, small.num_samples))
    np.testing.assert_array_equal(blend.samples(first, 1)[0], small.window(int(second_epoch[0])))
    assert not np.array_equal(small.permutation(0), second_epoch)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_order_does_not_depend_on_the_number_of_ranks(two_sources, world):
    blend = BlendedDataset(two_sources, "train", SEQ, seed=7)
    global_batch, micro = 8, 2
    expected = blend.samples(16, 3 * global_batch)
    got = []
    streams = [blend.rank_batches(16, global_batch, micro, r, world) for r in range(world)]
    for _ in range(3):
        for stream in streams:
            for _ in range(global_batch // (micro * world)):
                got.append(next(stream))
    np.testing.assert_array_equal(np.concatenate(got), expected)


def test_one_source_is_the_plain_packed_dataset(shards):
    blend = BlendedDataset(parse_sources(str(shards)), "train", SEQ, seed=3)
    plain = blend.datasets[0]
    np.testing.assert_array_equal(blend.samples(5, 20), plain.samples(5, 20))
    assert blend.fingerprint == plain.fingerprint


def test_the_fingerprint_covers_every_source_and_weight(two_sources, shards, second_shards):
    a = BlendedDataset(two_sources, "train", SEQ, seed=7).fingerprint
    reweighted = [Source(str(shards), 0.5, "all"), Source(str(second_shards), 0.5, "")]
    assert a != BlendedDataset(reweighted, "train", SEQ, seed=7).fingerprint
    assert [p["name"] for p in a["sources"]] == ["all", second_shards.name]


@pytest.mark.parametrize("data, message", [
    ([{"path": "a", "name": "x"}, {"path": "b", "name": "x"}], "names x more than once"),
    ([{"path": "a/books"}, {"path": "b/books"}], "names books more than once"),
    ([{"path": "a", "weight": 0}], "weight must be a positive number, got 0"),
    ([{"path": "a", "weight": -1.5}], "weight must be a positive number, got -1.5"),
    ([{"weight": 1}], "needs a `path`"),
    ([{"path": "a", "wieght": 2}], "unknown key(s) wieght"),
    ([], "must be a shard directory or a list"),
])
def test_bad_blends_are_clear_errors(data, message):
    with pytest.raises(KolmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_sources(data)
