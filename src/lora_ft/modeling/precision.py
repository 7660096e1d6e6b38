"""The compute dtype ``model.compute_dtype: auto`` resolves to on this machine, and the reason recorded for it.

bf16 autocast is the fastest exact-enough dtype wherever the hardware multiplies bf16 natively: GPUs that support
it, and CPUs with bf16 matrix units (x86 AVX512-BF16 or AMX, Arm's BF16 extension). On this project's AMD EPYC
(AVX512-BF16) a bf16 GEMM runs 2.1× the fp32 one (512², 1 thread: 221 vs 102 GFLOP/s) and lora_ft's chat SFT
1.73× (issue 13); on AVX2-only CPUs oneDNN emulates bf16 and it is many times slower than fp32. A flag alone is
not trusted (a hypervisor may report flags the library does not use, a torch build may lack the kernels), so a CPU
with the flags must also pass a measured check: a bf16 GEMM at least ``MIN_BF16_SPEEDUP`` × as fast as the fp32
one, about 30 ms of CPU time on one thread. The result is kept for the process (training and the planner ask
once), not on disk: the check is cheap and a stored answer would go stale with a new torch or oneDNN.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from ..recipe import ModelConfig

log = logging.getLogger(__name__)

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""CPU flags of native bf16 matrix arithmetic: x86 AVX512-BF16 and AMX-BF16 (``flags`` in /proc/cpuinfo), Arm's
BF16 extension (``Features``)."""
MIN_BF16_SPEEDUP = 1.3
"""The bf16 GEMM must be this many times faster than fp32 for ``auto`` to pick bf16 on a CPU: a clear margin over
timing noise on a shared machine (measured here: 2.07-2.17× at 256²-768²), so that a CPU where bf16 is merely
on par does not trade exactness for nothing."""
CHECK_SIZE = 512
"""Side of the square matrices of the check: past the small-matrix overheads, ~3 ms per fp32 product on 1 core."""
INHERITED_CHOICE = "LORA_FT_AUTO_COMPUTE_DTYPE"
"""Environment variable through which ``lora-ft train --num-processes N`` hands the choice it measured once to the
processes it launches (``dtype:reason``): processes that measured for themselves could disagree on a loaded
machine, and DDP then averages gradients of differently rounded steps."""
CHECK_REPEATS = 5
"""Timed products per dtype (after one warm-up), interleaved so that a burst of load hits both; the best counts."""


@dataclass(frozen=True)
class DtypeChoice:
    """A resolved compute dtype and why (written beside the value in ``run_config.yaml``)."""

    dtype: str
    reason: str


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from ``cpuinfo`` (default: /proc/cpuinfo; empty where there is none, e.g. macOS)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


def gemm_seconds(repeats: int = CHECK_REPEATS, n: int = CHECK_SIZE) -> tuple[float, float]:
    """Best CPU seconds of an ``n``² matmul in (fp32, bf16) on one CPU thread.

    CPU time (``time.process_time``) on one thread, not wall time: on a busy machine a product of a few ms is often
    preempted, and wall time measured anything from 0.10× to 27× on this project's CPU under a load of 30 on 2 cores
    (within one hour of its benchmarks); with two threads even CPU time varied 0.34-2.72× (the OpenMP threads
    spin while they wait for each other). One thread's CPU time measured 1.98-2.01× in four checks under that
    load. bf16 units are per core, so one core's ratio is the machine's.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)  # a private generator: the global one drives dropout
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
        best = dict.fromkeys(pairs, float("inf"))
        for rep in range(repeats + 1):
            for dtype, (x, y) in pairs.items():
                t0 = time.process_time()
                torch.mm(x, y)
                if rep:  # the first of each is a warm-up (oneDNN primitive creation)
                    best[dtype] = min(best[dtype], time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)
    return best[torch.float32], best[torch.bfloat16]


def choose_compute_dtype(cuda: bool, cuda_bf16: bool, flags: frozenset[str],
                         timing: Callable[[], tuple[float, float]]) -> DtypeChoice:
    """What ``compute_dtype: auto`` resolves to: bf16 on a GPU that supports it; on a CPU, bf16 where it has native
    bf16 flags (``CPU_BF16_FLAGS``) *and* ``timing`` shows a bf16 GEMM ``MIN_BF16_SPEEDUP`` × faster than fp32;
    else fp32 (fp16 training needs loss scaling care, so it is never chosen).

    Args:
        cuda: training runs on a CUDA device.
        cuda_bf16: that device supports bf16 (Ampere or newer).
        flags: the CPU's feature flags (``cpu_flags``).
        timing: returns (fp32, bf16) seconds of the same GEMM; called only for a CPU with the flags.
    """
    if cuda:
        return DtypeChoice("bf16", "GPU with bf16") if cuda_bf16 else DtypeChoice("fp32", "GPU without bf16")
    native = sorted(f for f in CPU_BF16_FLAGS if f in flags)
    if not native:
        return DtypeChoice("fp32", "CPU without native bf16 (no " + "/".join(CPU_BF16_FLAGS[:2]) + " flag)")
    fp32_s, bf16_s = timing()
    speedup = fp32_s / bf16_s
    measured = f"{'+'.join(native)}, bf16 GEMM {speedup:.2f}× fp32 (≥ {MIN_BF16_SPEEDUP:g}× needed)"
    return DtypeChoice("bf16" if speedup >= MIN_BF16_SPEEDUP else "fp32", f"CPU with {measured}")


@cache
def _machine_choice(cuda: bool) -> DtypeChoice:
    """``choose_compute_dtype`` for this machine's device, measured once per process, or on a CPU the choice the
    launching process measured (``INHERITED_CHOICE``)."""
    inherited = os.environ.get(INHERITED_CHOICE, "")
    if not cuda and inherited.partition(":")[0] in ("bf16", "fp32"):
        dtype, _, reason = inherited.partition(":")
        return DtypeChoice(dtype, f"{reason} (measured by the launching process)")
    choice = choose_compute_dtype(cuda, cuda and torch.cuda.is_bf16_supported(), cpu_flags(), gemm_seconds)
    log.info("model.compute_dtype auto: %s (%s)", choice.dtype, choice.reason)
    return choice


def resolve_compute_dtype(cfg: ModelConfig, cuda: bool | None = None) -> DtypeChoice:
    """``cfg.compute_dtype``, or for ``auto`` this machine's choice (``choose_compute_dtype``).

    Args:
        cfg: the recipe's model section.
        cuda: whether training runs on a CUDA device (default: whether one is available).
    """
    if cfg.compute_dtype != "auto":
        return DtypeChoice(cfg.compute_dtype, "recipe")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return _machine_choice(cuda)
