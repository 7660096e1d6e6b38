"""The base model's own dropout layers drawing their masks as LoRA's do (``lora_dropout.keep_mask``) on the CPU.

Written by hand because torch's CPU dropout draws one ``bernoulli_`` number per value on one thread and keeps a
noise tensor of the input's dtype for backward. BERT-family encoders drop after the embeddings and twice per
layer; measured on the MiniLM classification bench (one thread, AMD EPYC) those draws were ~5% of a training step
(the step with them set to p = 0 against as they are, interleaved). Here the mask comes from 16-bit lanes of
64-bit random integers (≈3× faster) and backward keeps it as one byte per value. Same expectation (the
scale uses the p the mask was drawn at), a different random stream. GPUs keep ``nn.Dropout``.

Only modules the model calls as modules are swapped: attention-probability dropout happens inside SDPA, which
reads the module's ``p`` and is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .lora_dropout import as_factor, keep_mask


def attention_dropout(config: Any) -> float:
    """The attention-probability dropout a model config declares: ``attention_dropout`` (DistilBERT, ModernBERT,
    Llama-style decoders), ``attention_probs_dropout_prob`` (BERT, RoBERTa, ELECTRA, DeBERTa-v2) or ``attn_pdrop``
    (GPT-2); 0 where none is set."""
    for name in ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    return 0.0


def sdpa_math_kernel(dropout: float, device_type: str) -> bool:
    """Whether SDPA runs its math kernel: on the CPU with attention dropout (no fused CPU kernel applies dropout).
    That kernel computes in fp32 even under autocast and keeps the (heads × seq²) probabilities, their dropout mask
    and the dropped ones for backward; the planner and the encoder rows' width rule both weigh it."""
    return device_type == "cpu" and dropout > 0


class MaskedDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU training path multiplies by a ``keep_mask`` (through ``as_factor``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        keep, p = keep_mask(x.shape, self.p, x.device)
        return x.mul(as_factor(keep)).mul_(1.0 / (1.0 - p))


def swap_model_dropout(model: nn.Module) -> int:
    """Make every plain ``nn.Dropout`` of the base model a ``MaskedDropout`` (same ``p``); peft's LoRA dropouts are
    left to ``lora_dropout.py``. Returns how many were swapped."""
    swapped = 0
    for name, module in model.named_modules():
        if type(module) is nn.Dropout and "lora_dropout" not in name:
            module.__class__ = MaskedDropout  # a subclass overriding forward only: same p, no state
            swapped += 1
    return swapped
