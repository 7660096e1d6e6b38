"""Optimizer parameter groups: layer-wise learning rates (``train.lr_layer_decay``) and a new head's own rate."""

from __future__ import annotations

import torch

from ..modeling.layers import layer_of
from ..recipe import TrainConfig


def is_head(name: str, heads: list[str]) -> bool:
    # peft names head copies "<head>.modules_to_save.default.weight"
    return any(f".{h}.modules_to_save." in f".{name}" or name.startswith(f"{h}.") for h in heads)


def param_groups(model: torch.nn.Module, tc: TrainConfig, heads: list[str]) -> list[dict]:
    """AdamW groups: one per block with ``lr · decay^(L−l)`` (l = 1 … L from the bottom), one for heads.

    Parameters outside the blocks (e.g. a pooler's adapter) count as the top layer: they sit above it.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layers = [x for n, _ in named if (x := layer_of(n)) is not None]
    top = max(layers, default=0)
    groups: dict[str, dict] = {}
    for name, p in named:
        if is_head(name, heads):
            key, lr = "head", tc.head_lr or tc.lr
        else:
            layer = layer_of(name)
            depth = top - layer if layer is not None else 0  # 0 for the top block
            key, lr = f"layer{layer if layer is not None else 'top'}", tc.lr * (tc.lr_layer_decay or 1.0) ** depth
        groups.setdefault(key, {"params": [], "lr": lr, "name": key})["params"].append(p)
    return list(groups.values())
