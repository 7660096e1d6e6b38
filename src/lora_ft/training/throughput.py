"""Efficiency you can see: model FLOPs of a LoRA training step, and the device's measured matmul peak (MFU).

The base is frozen, so a token costs a forward and the activation half of the backward through every frozen
weight (4 FLOPs per weight), and forward + both backward halves through the trainable ones (6). The output head
runs only on the positions that carry a label (lora_ft computes logits nowhere else), 4 FLOPs per head weight
there. Embedding lookups cost nothing; attention scores (a few % at usual lengths) and norms are not counted,
so MFU is slightly understated. ``scripts/bench_train.py`` uses the same count for lora_ft and its peers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cache

import torch

MATMUL_SIZE = 2048
"""Side of the square matmul whose best rate is the peak: large enough to reach the BLAS/cuBLAS plateau on CPUs and
small GPUs, small enough to measure in well under a second on 2 CPU cores."""


@dataclass(frozen=True)
class FlopCounts:
    """Weights by what a training token costs through them."""

    frozen: int
    """Frozen weights of the linear layers a token goes through (quantized ones counted by their logical shape)."""
    trainable: int
    """Trained weights (LoRA, new heads)."""
    head: int
    """The frozen output head's weights, paid per labelled position only (0 when the head trains or is absent)."""

    def step(self, tokens: float, labelled: float) -> float:
        """FLOPs of a training step over ``tokens`` real tokens of which ``labelled`` carry a label."""
        return tokens * (4 * self.frozen + 6 * self.trainable) + labelled * 4 * self.head


def count_flop_weights(model: torch.nn.Module) -> FlopCounts:
    """``FlopCounts`` of a (peft) model: the weights of its linear layers by whether they train; the input
    embedding is a lookup; a frozen output embedding is the head. Quantized layers count by their logical shape
    (bitsandbytes packs two 4-bit weights to a byte)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    frozen = trainable = head_weights = 0
    for module in model.modules():
        weight = module._parameters.get("weight")  # its own weight: peft's wrappers only proxy their base layer's
        if weight is None or isinstance(module, torch.nn.Embedding) or weight.dim() != 2:
            continue  # embeddings are lookups, norms element-wise
        n = module.in_features * module.out_features if isinstance(module, torch.nn.Linear) else weight.numel()
        if weight.requires_grad:
            trainable += n
        elif module is head:
            head_weights = n
        else:
            frozen += n
    return FlopCounts(frozen, trainable, head_weights)


@cache
def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """Best FLOP/s of a ``MATMUL_SIZE``² matmul in ``dtype`` on ``device`` (one measurement per process)."""
    n = MATMUL_SIZE
    # A private generator: the global one drives dropout, and a resumed run measures at another step than the
    # uninterrupted one did, so drawing from it would change every later mask.
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=device, dtype=dtype)
    best = float("inf")
    for rep in range(4):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if rep:  # the first is a warm-up
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class ThroughputMeter:
    """Real tokens and labelled positions trained since the loop (re)started, kept on the device so that counting
    costs no host sync per step, and the loop's own time: tokens/s and MFU, read at logging steps only.

    Args:
        model: the (peft) model being trained, whose linear weights ``count_flop_weights`` counts.
        device: the device the counts live on and whose matmul peak is MFU's denominator.
        compute_dtype: ``fp32``, ``bf16`` or ``fp16``: the dtype the peak is measured in.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, compute_dtype: str):
        self.flops = count_flop_weights(model)
        self.tokens = torch.zeros((), device=device)
        self.head_positions = torch.zeros((), device=device)
        self.seconds = 0.0
        self.device = str(device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(compute_dtype, torch.float32)

    def count(self, tokens: torch.Tensor, head_positions: torch.Tensor) -> None:
        self.tokens += tokens
        self.head_positions += head_positions.to(self.tokens.device)

    def row(self, processes: int) -> dict[str, float]:
        """``tokens_per_s`` over all processes (each counts its own), this process's ``mfu``, and ``train_s``, the
        seconds this process has spent in training steps so far (evaluation and checkpointing excluded)."""
        tokens = self.tokens.item()
        flops = self.flops.step(tokens, self.head_positions.item())
        return {"tokens_per_s": tokens * processes / self.seconds,
                "mfu": flops / self.seconds / matmul_peak(self.device, self.dtype), "train_s": self.seconds}
