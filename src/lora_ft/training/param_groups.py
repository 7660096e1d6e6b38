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


TOKEN_ROWS_TRAVEL = 2.4
"""The embedding and output rows of ``model.chat_template``'s tokens train at ``max(lr, TRAVEL × σ / steps)``, σ the
standard deviation of their layer's weights: Adam moves a value by about its learning rate per step, so the rows can
travel about 2.4 σ over the run, never slower than the LoRA factors. At a LoRA rate they stay near their mean start
and the model does not learn to end its answers; a fixed multiple of the rate would overshoot on long runs and at
high rates. SmolLM2-135M-Instruct (σ 0.136) given a template with four new tokens (``<|user|>``, ``<|end|>``, ...),
the ``whatis`` held-out task, 57 steps at the auto lr 5.7e-4, validation loss / stop rate / ROUGE-L with the rows at
lr × 1: 4.10 / 0.53 / 0.12; × 10 (2.4 σ): 3.32 / 0.97 / 0.16; × 30: 3.41 / 1.00 / 0.18; not trained: 4.86 / 0.00 /
0.06; the model's own ChatML template, whose tokens it knows: 3.34 / 0.97 / 0.16. On ``man-options`` (72 steps),
× 1 → × 10: 3.33 → 3.19 / 0.88 → 1.00 / 0.147 → 0.158. The tests' tiny random model (σ 0.2, lr 1e-2, 40 steps,
24 answers), exact match: × 1 0.83, × 10 0.50, the rule (× 1.2) 0.75 (README, "A chat template for a base
model")."""


def token_rows_lr(model: torch.nn.Module, name: str, lr: float, total_steps: int | None) -> float:
    """The rate of the token rows parameter ``name`` (``TOKEN_ROWS_TRAVEL``); ``lr`` when the run's length is
    unknown."""
    if not total_steps:
        return lr
    layer = model.get_submodule(name.split(".trainable_tokens_delta", 1)[0])  # peft's TrainableTokensLayer
    sigma = layer.get_base_layer().weight.detach().float().std().item()
    return max(lr, TOKEN_ROWS_TRAVEL * sigma / total_steps)


def is_token_rows(name: str) -> bool:
    return "trainable_tokens_delta" in name  # peft's trainable tokens (model.chat_template's rows)


def param_groups(model: torch.nn.Module, tc: TrainConfig, heads: list[str],
                 total_steps: int | None = None) -> list[dict]:
    """AdamW groups: one per block with ``lr · decay^(L−l)`` (l = 1 … L from the bottom), one for heads, one per
    layer of a chat template's token rows (``TOKEN_ROWS_TRAVEL``; ``total_steps``: the run's optimizer steps).

    Parameters outside the blocks (e.g. a pooler's adapter) count as the top layer: they sit above it.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layers = [x for n, _ in named if (x := layer_of(n)) is not None]
    top = max(layers, default=0)
    groups: dict[str, dict] = {}
    for name, p in named:
        if is_token_rows(name):
            key, lr = f"tokens:{name}", token_rows_lr(model, name, tc.lr, total_steps)
        elif is_head(name, heads):
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
                   plus_lr_ratio: float | None = None, total_steps: int | None = None) -> torch.optim.Optimizer:
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
        total_steps: the run's optimizer steps (a chat template's token rows' rate).
    """
    groups = param_groups(model, tc, heads, total_steps)
    params = [p for g in groups for p in g["params"]]
    fused = distributed in FUSED and bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    cls, extra = optimizer_class(tc.optimizer, fused)
    if plus_lr_ratio is not None:
        return create_loraplus_optimizer(model, cls, lr=tc.lr, loraplus_lr_ratio=plus_lr_ratio,
                                         loraplus_weight_decay=tc.weight_decay, **extra)
    return cls(groups, lr=tc.lr, weight_decay=tc.weight_decay, **extra)
