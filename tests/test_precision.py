"""``model.compute_dtype: auto``: the decision from the device, the CPU's flags and a measured GEMM check."""

from __future__ import annotations

import pytest

from lora_ft.modeling.precision import (
    MIN_BF16_SPEEDUP,
    choose_compute_dtype,
    cpu_flags,
    gemm_seconds,
    resolve_compute_dtype,
)
from lora_ft.recipe import ModelConfig

EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


class Timings:
    """(fp32, bf16) seconds as a measurement on some machine would return them, and how often it was asked."""

    def __init__(self, fp32_s: float, bf16_s: float):
        self.seconds, self.calls = (fp32_s, bf16_s), 0

    def __call__(self) -> tuple[float, float]:
        self.calls += 1
        return self.seconds


def test_cpu_flags_are_read_from_x86_flags_and_arm_features_lines():
    assert {"avx512_bf16", "avx2"} <= cpu_flags(EPYC) and "bf16" in cpu_flags(GRAVITON3)
    assert "avx512_bf16" not in cpu_flags(AVX2_ONLY) and cpu_flags("") == frozenset()


def test_a_cpu_with_bf16_units_and_a_clearly_faster_bf16_gemm_trains_in_bf16():
    choice = choose_compute_dtype(False, False, cpu_flags(EPYC), Timings(2.1e-3, 1.0e-3))
    assert choice.dtype == "bf16"
    assert "avx512_bf16" in choice.reason and "2.10×" in choice.reason


def test_a_cpu_with_bf16_flags_whose_gemm_is_not_clearly_faster_stays_fp32():
    # A flag the library does not use (a hypervisor's, a torch build without the kernels): bf16 on par with fp32.
    just_under = Timings(MIN_BF16_SPEEDUP * 0.99, 1.0)
    choice = choose_compute_dtype(False, False, cpu_flags(EPYC), just_under)
    assert choice.dtype == "fp32" and just_under.calls == 1 and "1.29×" in choice.reason
    assert choose_compute_dtype(False, False, cpu_flags(GRAVITON3), Timings(MIN_BF16_SPEEDUP, 1.0)).dtype == "bf16"


def test_an_avx2_only_cpu_stays_fp32_without_measuring():
    # Where bf16 is emulated it is many times slower; even a (noisy) measurement saying otherwise is not taken.
    timing = Timings(9.0, 1.0)
    choice = choose_compute_dtype(False, False, cpu_flags(AVX2_ONLY), timing)
    assert choice.dtype == "fp32" and timing.calls == 0 and "without native bf16" in choice.reason


def test_a_gpu_gets_bf16_where_it_supports_it_and_the_cpu_check_is_not_run():
    timing = Timings(1.0, 9.0)  # the CPU's bf16 is slow: irrelevant when training on the GPU
    assert choose_compute_dtype(True, True, cpu_flags(AVX2_ONLY), timing).dtype == "bf16"
    assert choose_compute_dtype(True, False, cpu_flags(EPYC), timing).dtype == "fp32" and timing.calls == 0


@pytest.mark.parametrize("given", ["fp32", "bf16", "fp16"])
def test_a_compute_dtype_the_recipe_gives_wins_over_the_machines_choice(given):
    assert resolve_compute_dtype(ModelConfig(compute_dtype=given), cuda=False).dtype == given
    assert resolve_compute_dtype(ModelConfig(compute_dtype=given), cuda=False).reason == "recipe"


def test_the_gemm_check_costs_well_under_a_second_of_cpu_and_leaves_the_thread_count_as_it_was():
    import time

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t0 = time.process_time()
        fp32_s, bf16_s = gemm_seconds()
        assert 0 < fp32_s < 0.1 and 0 < bf16_s < 0.5 and time.process_time() - t0 < 1.0
        assert torch.get_num_threads() == 2  # measured on one thread, then the run's count is back
    finally:
        torch.set_num_threads(threads)


def test_launched_processes_use_the_choice_the_launching_process_measured(monkeypatch):
    """``--num-processes N`` measures once and hands the choice down: every process then trains in the same dtype,
    whatever its own measurement on a busy machine would say."""
    from lora_ft.cli import _dtype_for_processes
    from lora_ft.modeling import precision

    precision._machine_choice.cache_clear()
    mine = resolve_compute_dtype(ModelConfig(compute_dtype="auto"), cuda=False)
    env = _dtype_for_processes()
    assert env[precision.INHERITED_CHOICE].startswith(f"{mine.dtype}:")
    other = "fp32" if mine.dtype == "bf16" else "bf16"  # a child that would have measured otherwise
    monkeypatch.setenv(precision.INHERITED_CHOICE, f"{other}:CPU with the launcher's measurement")
    precision._machine_choice.cache_clear()
    try:
        child = resolve_compute_dtype(ModelConfig(compute_dtype="auto"), cuda=False)
        assert child.dtype == other and "launching process" in child.reason
    finally:
        precision._machine_choice.cache_clear()
