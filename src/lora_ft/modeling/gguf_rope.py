"""Llama 3.1+'s scaled RoPE in GGUF files: llama.cpp's ``rope_freqs`` tensor, written, read and recognised.

llama.cpp stores the ``llama3`` RoPE scaling of Llama 3.1-3.3 as one tensor, ``rope_freqs.weight``: per frequency,
the divisor it applies to the unscaled ``base^(-2i/d)``. transformers' GGUF reader ignores that tensor and builds
unscaled RoPE, so both directions need help: the export writes the tensor (``shipping/gguf_file.py``) and reads it
back (``shipping/export.py``); a GGUF file given as ``model.name`` gets its ``rope_parameters`` recovered from it
(``examples.convert_gguf``), or training would run a Llama 3.x model with the wrong positions.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

ROPE_FACTORS = "rope_freqs.weight"


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _unscaled(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def rope_factors(config) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs`` for ``config``'s scaled RoPE (None when unscaled). Derived from transformers' own
    implementation of the scaling (the one the run trained with) rather than re-written from llama.cpp's converter:
    the two agree (``test_gguf_rope.py``). Only scalings without an attention factor map to it (llama3, linear)."""
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        return None
    scaled, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config)
    if attention_factor != 1.0:
        raise ValueError(f"RoPE '{rope_type}' scales attention too; rope_freqs cannot hold it")
    return _unscaled(rope["rope_theta"], head_dim(config)) / scaled.float()


def read_rope_factors(path: Path) -> torch.Tensor | None:
    """The ``rope_freqs`` tensor of a GGUF file, read with gguf's own reader (None when it has none)."""
    tensor = next((t for t in gguf.GGUFReader(path).tensors if t.name == ROPE_FACTORS), None)
    return None if tensor is None else torch.tensor(tensor.data, dtype=torch.float32).reshape(-1)


def llama3_parameters(factors: torch.Tensor, config) -> dict | None:
    """``rope_parameters`` of type llama3 that give exactly ``factors`` for ``config`` (its ``rope_theta`` and head
    size), or None when none do.

    The factors are 1 for short wavelengths, ``factor`` for long ones, and in between ``1 / ((1 − s) / factor +
    s)`` with ``s = old_context / (high − low) / wavelength − low / (high − low)``: only the two ratios are
    identifiable, so ``low_freq_factor`` is taken as 1 (Meta's value) and the rest solved from the band in between
    (at least two frequencies must fall in it). The result is checked by recomputing the factors with transformers.
    """
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    dim = head_dim(config)
    if theta is None or factors.shape != (dim // 2,):
        return None
    factor = float(factors.max())
    wavelength = 2 * math.pi / _unscaled(theta, dim).double()
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if factor <= 1 or int(band.sum()) < 2:
        return None
    smooth = (1 / factors[band].double() - 1 / factor) / (1 - 1 / factor)  # s = a / wavelength − b
    x = torch.stack([1 / wavelength[band], -torch.ones_like(smooth)], dim=1)
    a, b = torch.linalg.lstsq(x, smooth[:, None]).solution[:, 0].tolist()
    if b <= 0:
        return None
    params = {"rope_type": "llama3", "rope_theta": float(theta), "factor": factor, "low_freq_factor": 1.0,
              "high_freq_factor": round(1.0 + 1.0 / b, 6), "original_max_position_embeddings": round(a / b)}
    trial = type(config).from_dict({**config.to_dict(), "rope_parameters": params})
    return params if torch.allclose(rope_factors(trial), factors, rtol=1e-4, atol=0) else None
