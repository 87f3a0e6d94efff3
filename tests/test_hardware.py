"""Device peaks: the data-sheet table, and the per-machine best of measured CPU peaks behind CPU MFU."""

from __future__ import annotations

import json

import pytest
import torch

from kolm.train.hardware import best_cpu_peak, card_of, device_peak_flops, peak_cache_path

pytestmark = pytest.mark.unit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return peak_cache_path()


def test_known_cards_are_found_by_their_device_names():
    assert card_of("NVIDIA H100 PCIe").label == "H100 80GB PCIe"
    assert card_of("NVIDIA H100 80GB HBM3").label == "H100 80GB SXM"
    assert card_of("NVIDIA A100-SXM4-40GB").memory_gib == 40
    assert card_of("NVIDIA GeForce GTX 1080") is None


def test_the_best_measurement_is_kept_and_a_lower_one_does_not_replace_it(cache):
    assert best_cpu_peak("float32", 2, 5e10) == 5e10
    assert best_cpu_peak("float32", 2, 3e10) == 5e10  # a loaded machine measures less; the best stays
    assert best_cpu_peak("float32", 2, 7e10) == 7e10
    assert best_cpu_peak("bfloat16", 2, 1e9) == 1e9  # per dtype and thread count
    assert best_cpu_peak("float32", 1, 2e10) == 2e10
    assert sorted(json.loads(cache.read_text()).values()) == [1e9, 2e10, 7e10]


def test_the_mfu_denominator_on_a_cpu_is_the_cached_best(cache):
    measured, _ = device_peak_flops(torch.device("cpu"), torch.float32, seconds=0.2)
    cached = json.loads(cache.read_text())
    assert measured == max(cached.values()) > 0
    raised = {key: 1e15 for key in cached}  # as if an idle run had once measured this
    cache.write_text(json.dumps(raised))
    peak, source = device_peak_flops(torch.device("cpu"), torch.float32, seconds=0.2)
    assert peak == 1e15 and "best measured float32" in source


def test_a_damaged_cache_is_measured_over(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    assert best_cpu_peak("float32", 2, 4e10) == 4e10
    assert json.loads(cache.read_text())
