"""LoftQ for an NF4 base: each adapter starts at the best rank-r approximation of its layer's quantization error.

The base stays the NF4 model transformers loaded; A and B are set so that ``W_q + scale · B A`` is as close to the
full-precision ``W`` (read from the checkpoint) as rank r allows: the rank-r SVD of ``W − W_q`` divided by the
adapter's scale. This is the one-shot LoftQ of peft's ``replace_lora_weights_loftq`` (the base is already
quantized, so the alternating variant, which re-quantizes ``W − B A``, does not apply).

Written here rather than calling that function, for two reasons checked on peft 0.21:

- it moves every weight to ``cuda`` (or ``xpu``) for the SVD, whatever the model's device: on a CPU it raises,
  although bitsandbytes de-quantizes and torch decomposes there as well;
- it writes the SVD factors into A and B without dividing by the adapter's scale (peft issue #1982, closed
  without a change), so the adapter adds ``scale · E_r`` where ``E_r`` is the rank-r projection of the error
  ``E = W − W_q``: a correction that grows with alpha / r, not with the error. At lora_ft's default alpha 32 / r 16
  (scale 2) ``‖E − 2 E_r‖ = ‖E‖`` exactly (``E_r`` is an orthogonal projection of E): in weight norm that start is
  as far from W as plain NF4. In outputs the best multiple of ``E_r`` depends on the rank, not on alpha: measured
  on SmolLM2-135M (mean next-token KL from the fp32 model over 60 whatis test conversations; plain NF4 1.005), at
  r 16 ``W_q + c·E_r`` gives 0.745 / 0.662 / 0.631 / 0.654 / 1.230 at c = 1 / 1.5 / 2 / 2.5 / 4, at r 64 0.835 /
  0.505 / 0.510 / 0.688 / 1.042 at c = 0.25 / 1 / 1.5 / 2 / 2.5. The best c falls with the rank (about 2 at r 16,
  1 to 1.5 at r 64); c = 1 (the LoftQ paper's; its released adapters use alpha = r) helps at every rank and does
  not depend on alpha. peft's c = alpha / r happens to be the best at lora_ft's default (2 at r 16) and is far off
  at r 16 with alpha 64 (4: 1.230, worse than plain NF4) or at r 64 with alpha 16 (0.25: 0.835).
"""

from __future__ import annotations

import logging
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from ..errors import RecipeError
from .lazy_weights import read_tensor_by_tensor

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
"""What ``PeftModel.named_modules`` puts before the wrapped model's module names."""


@torch.no_grad()
def start_at_quantization_error(model: PeftModel, weight_files: list[Path] | None, adapter: str = "default") -> None:
    """Set every NF4 LoRA layer's A and B to the scaled rank-r SVD of its quantization error.

    Args:
        model: the peft model right after ``get_peft_model`` on an NF4 base (B still zero).
        weight_files: the base checkpoint's safetensors files, where the full-precision weights are read, one
            tensor at a time.
        adapter: the adapter to initialise.
    """
    checkpoint = read_tensor_by_tensor(weight_files) if weight_files else None
    if checkpoint is None:
        raise RecipeError("lora.init: loftq reads the base model's full-precision weights from its safetensors "
                          "files, and this model has none that can be opened: use lora.init: true")
    prefix = getattr(model.get_base_model(), "base_model_prefix", "")
    done = 0
    for name, layer in model.named_modules():
        if not (isinstance(layer, LoraLayer) and isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)):
            continue
        full = _checkpoint_weight(checkpoint, name.removeprefix(PEFT_PREFIX), prefix, layer.get_base_layer())
        _set_factors(layer, full, adapter)
        done += 1
    if not done:
        raise RecipeError("lora.init: loftq found no NF4 layer with an adapter: it needs model.quant: nf4")
    log.info("LoftQ: %d adapters start at their layer's NF4 quantization error (rank-%d SVD)", done,
             model.peft_config[adapter].r)


def _checkpoint_weight(checkpoint: dict, name: str, prefix: str, base: torch.nn.Module) -> torch.Tensor:
    """The full-precision weight of module ``name``: stored under its own name, or without/with the model's
    ``base_model_prefix`` (a task model built on a bare backbone checkpoint, e.g. ``bert.`` on a BertModel's)."""
    names = [name, name.removeprefix(prefix + "."), f"{prefix}.{name}"] if prefix else [name]
    for key in (f"{n}.weight" for n in names):
        if key in checkpoint:
            weight = checkpoint[key][...]
            break
    else:
        raise RecipeError(f"lora.init: loftq: the checkpoint has no tensor {name}.weight (stored under another "
                          "name or fused with others): use lora.init: true")
    if not weight.is_floating_point():  # a pre-quantized checkpoint (bitsandbytes' packed uint8, int8)
        raise RecipeError(f"lora.init: loftq needs the full-precision weights and the checkpoint stores "
                          f"{name}.weight as {weight.dtype}: use the unquantized model, or lora.init: true")
    expected = base.weight.quant_state.shape
    if tuple(weight.shape) != tuple(expected):
        raise RecipeError(f"lora.init: loftq: the checkpoint's {name}.weight is {tuple(weight.shape)}, the layer "
                          f"{tuple(expected)}: use lora.init: true")
    return weight


def _set_factors(layer: LoraLayer, full: torch.Tensor, adapter: str) -> None:
    """A, B ← the rank-r SVD of ``W − W_q``, its singular values divided by the scale and split evenly (the
    square root on each side, as peft's PiSSA does), so that ``scale · B A`` is that approximation."""
    base = layer.get_base_layer()
    quantized = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    error = full.to(device=quantized.device, dtype=torch.float32) - quantized
    u, s, vh = torch.linalg.svd(error, full_matrices=False)
    k = min(layer.r[adapter], s.numel())  # a rank above the layer's own: the extra rows and columns stay zero
    root = (s[:k] / layer.scaling[adapter]).sqrt()
    lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    lora_a.zero_()[:k].copy_(root[:, None] * vh[:k])
    lora_b.zero_()[:, :k].copy_(u[:, :k] * root)
    if layer.use_dora.get(adapter):
        # DoRA's magnitude was taken from W_q alone when peft built the layer; with B ≠ 0 it must be the column
        # norms of W_q + scale · B A, or the start would rescale every column back to W_q's norms.
        layer.lora_magnitude_vector[adapter].update_layer(base_layer=base, lora_A=lora_a, lora_B=lora_b,
                                                          scaling=layer.scaling[adapter])
