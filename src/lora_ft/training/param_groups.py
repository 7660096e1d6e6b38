"""The optimizer: parameter groups for layer-wise learning rates (``train.lr_layer_decay``) and a new head's own
rate, and ``train.optimizer`` over them (or LoRA+'s groups, ``lora.plus_lr_ratio``)."""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import DistributedType
from peft.optimizers import create_loraplus_optimizer
from transformers.optimization import Adafactor

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


FUSED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
"""Where AdamW and SGD get torch's fused kernel (transformers' ``Trainer`` default since torch 2.8,
``adamw_torch_fused``): one process or DDP. torch's own default on a CPU is a loop over the tensors: MiniLM-L6's LoRA
r16 (678k parameters in 54 tensors) took 2.53 ms a step, 0.75 ms fused, which matters where a small data set trains
in hundreds of small steps. FSDP and DeepSpeed shard or replace the optimizer's parameters and keep torch's default
(not run on a GPU here)."""

BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit",
                  "paged_adamw_32bit": "PagedAdamW32bit", "lion_8bit": "Lion8bit"}
"""``train.optimizer`` → bitsandbytes' class (QLoRA's paged optimizers and the 8-bit ones)."""
SGD_MOMENTUM = 0.9
"""SGD without momentum barely moves LoRA factors at adapter learning rates; 0.9 is the usual setting."""
ADAFACTOR = {"scale_parameter": False, "relative_step": False, "warmup_init": False}
"""transformers' Adafactor as its ``Trainer`` builds it (``optim: adafactor``): the schedule's learning rate, not
Adafactor's own relative step."""


def optimizer_class(name: str, fused: bool) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The class of ``train.optimizer`` and its constructor arguments besides the groups, rate and weight decay.

    Args:
        name: the ``train.optimizer`` value.
        fused: torch's fused kernel may be used (AdamW, SGD).
    """
    if name in ("adamw", "sgd"):
        extra = {"fused": True} if fused else {}
        return (torch.optim.AdamW, extra) if name == "adamw" else (torch.optim.SGD, {"momentum": SGD_MOMENTUM, **extra})
    if name == "adafactor":
        return Adafactor, dict(ADAFACTOR)
    import bitsandbytes.optim  # optional and heavy (loads its native library): only for these optimizers

    return getattr(bitsandbytes.optim, BNB_OPTIMIZERS[name]), {}


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, heads: list[str], distributed: DistributedType,
                   plus_lr_ratio: float | None = None) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``param_groups`` (or LoRA+'s groups), fused where ``FUSED`` says and every parameter
    is a float tensor on a CPU or CUDA device (the devices torch's fused kernels run on).

    Args:
        model: the model whose trainable parameters are optimized.
        tc: the training section (optimizer, rates, layer decay, weight decay).
        heads: the new head modules' names (their own rate).
        distributed: how Accelerate runs the processes.
        plus_lr_ratio: ``lora.plus_lr_ratio``: LoRA+ (peft's ``create_loraplus_optimizer``), the B matrices at
            ``lr`` × this; its groups replace ``param_groups`` (the recipe refuses layer decay and a head rate
            with it).
    """
    groups = param_groups(model, tc, heads)
    params = [p for g in groups for p in g["params"]]
    fused = distributed in FUSED and bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    cls, extra = optimizer_class(tc.optimizer, fused)
    if plus_lr_ratio is not None:
        return create_loraplus_optimizer(model, cls, lr=tc.lr, loraplus_lr_ratio=plus_lr_ratio,
                                         loraplus_weight_decay=tc.weight_decay, **extra)
    return cls(groups, lr=tc.lr, weight_decay=tc.weight_decay, **extra)
