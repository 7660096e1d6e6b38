"""Bytes of optimizer state per trained tensor, for each ``train.optimizer``: what the planner adds to the weights.

Read from the optimizers' code and checked against the distinct storages their ``state`` holds after a step
(``tests/test_optimizer_state.py``, on the CPU):

- ``adamw`` (torch): two fp32 moments and a 0-d fp32 step per tensor.
- ``adamw_8bit``, ``paged_adamw_8bit`` (bitsandbytes): two uint8 moments with one fp32 absmax per block of 256
  values, plus two 256-entry fp32 code books shared by all tensors; tensors under 4,096 values (bitsandbytes'
  ``min_8bit_size``: LoRA A/B of small models) keep fp32 moments instead. Paged state lives in CUDA unified memory,
  which the driver may move to the host under pressure; it is counted as GPU memory here (the safe side).
- ``paged_adamw_32bit``: two fp32 moments (the step is a Python int).
- ``lion_8bit``: one uint8 momentum with its absmax (one code book); fp32 under 4,096 values.
- ``adafactor`` (transformers', as the ``Trainer`` builds it: no first moment): a matrix keeps fp32 row and column
  second moments, a vector a full one, each tensor a 0-d fp32 RMS.
- ``sgd`` (torch, momentum 0.9): one fp32 momentum buffer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

EIGHT_BIT_BLOCK = 256
"""Values per absmax block of bitsandbytes' blockwise 8-bit state."""
MIN_8BIT_SIZE = 4096
"""bitsandbytes' ``min_8bit_size``: smaller tensors keep 32-bit state."""
QMAP = 256 * 4
"""One 8-bit code book (256 fp32 values), shared by every tensor of an optimizer."""

OPTIMIZER_LABELS = {"adamw": "AdamW", "adamw_8bit": "AdamW 8-bit", "paged_adamw_8bit": "paged AdamW 8-bit",
                    "paged_adamw_32bit": "paged AdamW 32-bit", "lion_8bit": "Lion 8-bit", "adafactor": "Adafactor",
                    "sgd": "SGD"}
"""How the plan names each ``train.optimizer``."""

_MOMENTS = {"adamw_8bit": 2, "paged_adamw_8bit": 2, "lion_8bit": 1}


def tensor_state_bytes(optimizer: str, shape: tuple[int, ...]) -> int:
    """Optimizer state of one trained tensor of ``shape`` (code books shared across tensors excluded)."""
    n = math.prod(shape)
    if optimizer == "adamw":
        return 8 * n + 4
    if optimizer == "paged_adamw_32bit":
        return 8 * n
    if optimizer == "sgd":
        return 4 * n
    if optimizer == "adafactor":
        factored = shape[-2] * math.prod(shape[:-2]) + math.prod(shape[:-2]) * shape[-1] if len(shape) >= 2 else n
        return 4 * factored + 4
    moments = _MOMENTS[optimizer]  # a KeyError is a bug: the recipe's Literal lists the names
    if n < MIN_8BIT_SIZE:
        return 4 * moments * n
    return moments * (n + 4 * math.ceil(n / EIGHT_BIT_BLOCK))


def state_bytes(optimizer: str, shapes: Iterable[tuple[int, ...]]) -> int:
    """All the optimizer state for trained tensors of ``shapes``, including 8-bit optimizers' shared code books.

    Args:
        optimizer: a ``train.optimizer`` name.
        shapes: the shapes of the trained tensors (LoRA A and B, DoRA magnitudes, new heads).
    """
    shapes = list(shapes)
    total = sum(tensor_state_bytes(optimizer, s) for s in shapes)
    if optimizer in _MOMENTS and any(math.prod(s) >= MIN_8BIT_SIZE for s in shapes):
        total += _MOMENTS[optimizer] * QMAP
    return total
