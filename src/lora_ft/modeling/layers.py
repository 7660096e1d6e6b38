"""Where a parameter or module sits in the stack of transformer blocks (``….layers.3.…`` → block 3).

One pattern for every use: layer-wise learning rates, gradual unfreezing and the CPU heap trimming all number
blocks the same way.
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"\.(?:layers?|h|blocks?)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Transformer block index of a parameter (``model.layers.3.…`` → 3), None outside the blocks."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks themselves (``….layers.3``), in order: the modules ``layer_of`` numbers."""
    return [m for n, m in model.named_modules() if (hit := _LAYER.search(n + ".")) and hit.end() == len(n) + 1]
