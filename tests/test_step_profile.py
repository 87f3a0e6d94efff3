"""The profile's categories, from the kernel and operator names a GPU or a CPU run reports."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def step_profile(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import step_profile

    return step_profile


@pytest.mark.parametrize(("name", "category"), [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTT", "matmul"),
    ("aten::addmm", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", "norm"),
    ("aten::native_layer_norm_backward", "norm"),
    ("void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>>", "optimizer"),
    ("aten::_log_softmax", "loss"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise and other"),
    ("aten::tanh", "elementwise and other"),
])
def test_names_sort_into_categories(step_profile, name, category):
    assert step_profile.classify(name) == category


def test_the_sdpa_backend_is_named_from_its_operator(step_profile):
    names = ["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_cudnn_attention",
             "aten::_scaled_dot_product_cudnn_attention_backward", "aten::mm"]
    assert step_profile.sdpa_backends(names) == ["cudnn"]
    assert step_profile.sdpa_backends(["aten::_scaled_dot_product_efficient_attention"]) == ["efficient"]
    assert step_profile.sdpa_backends(["aten::_scaled_dot_product_attention_math"]) == ["math"]
    assert step_profile.sdpa_backends(["aten::_scaled_dot_product_flash_attention"]) == ["flash"]


def test_the_summary_sets_fp8_against_bf16_and_stages_against_zero2(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_bench

    def point(stage, precision, tps, loss, cpu=None):
        return gpu_bench.Point("phi-1.5", 2048, "sdpa", True, 8, tps, 0.4, 40.0, "", stage, precision, cpu, loss)

    points = [point(2, "bf16", 44000.0, 7.50, 100.0), point(0, "bf16", 46200.0, 7.51, 105.0),
              point(2, "fp8", 60000.0, 7.53), point(1, "fp8", 0, None)]
    lines = gpu_bench.fp8_parity(points)
    assert lines == ["- fp8 against bf16 (phi-1.5 seq 2048 micro batch 8, ZeRO-2, compiled): loss after the same "
                     "steps on the same batch 7.5300 against 7.5000 (+0.40%); tokens/s 1.364x"]
    ratios = gpu_bench.stage_ratios(points)
    assert len(ratios) == 1 and "ZeRO-0 1.050" in ratios[0]  # by CPU time on a CPU, by tokens/s on a GPU: 1.05 both
