"""Freezing schedules (``freeze.strategy``): which adapters and heads train at each step (LP-FT, ULMFiT)."""

from __future__ import annotations

import torch

from ..modeling.layers import layer_of
from ..recipe import FreezeConfig
from .param_groups import is_head


class FreezeSchedule:
    """Sets which adapter/head parameters train at each step; the backbone stays frozen throughout.

    Frozen parameters get no gradient, so AdamW keeps no state for them until they join.
    """

    def __init__(self, model: torch.nn.Module, cfg: FreezeConfig, heads: list[str]):
        self.cfg = cfg
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.heads = heads
        layers = [x for n in self.params if (x := layer_of(n)) is not None]
        self.top = max(layers, default=0)
        self.stage: int | None = None

    def _trainable(self, name: str, stage: int) -> bool:
        if self.cfg.strategy == "head_first":
            return stage > 0 or is_head(name, self.heads)
        if self.cfg.strategy == "gradual_unfreeze":
            layer = layer_of(name)
            lowest = self.top + 1 - (stage + 1) * self.cfg.blocks_per_stage
            return layer is None or layer >= lowest
        return True

    def stage_at(self, step: int) -> int:
        if self.cfg.strategy == "head_first":
            return int(step >= self.cfg.head_steps)
        if self.cfg.strategy == "gradual_unfreeze":
            return step // self.cfg.unfreeze_every
        return 0

    def apply(self, step: int) -> str | None:
        """Update ``requires_grad`` for ``step``; return a description when the trainable set changed."""
        stage = self.stage_at(step)
        if stage == self.stage or self.cfg.strategy == "none":
            return None
        self.stage = stage
        for name, p in self.params.items():
            p.requires_grad_(self._trainable(name, stage))
        on = [n for n in self.params if self.params[n].requires_grad]
        blocks = sorted({x for n in on if (x := layer_of(n)) is not None})
        heads = any(is_head(n, self.heads) for n in on)
        return (f"step {step}: {len(on)}/{len(self.params)} trainable tensors; blocks "
                f"{blocks[0] if blocks else '-'}..{blocks[-1] if blocks else '-'}{' + head' if heads else ''}")
