"""Running the same recipe on 1 process, N processes (DDP) or sharded engines (FSDP2, DeepSpeed ZeRO).

Accelerate does the distributing; what lives here is what a LoRA run needs on top of it: the batch
arithmetic of a launch, and gathering/restoring only the adapter when the engine shards parameters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from peft import PeftModel, set_peft_model_state_dict
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from ..errors import RecipeError
from ..modeling.adapters import adapter_state_dict
from ..recipe import Recipe
from . import checkpoint as ckpt


def scale_to_processes(recipe: Recipe, accelerator: Accelerator, resume: str | None = None) -> Recipe:
    """The recipe as this launch runs it: ``grad_accum`` derived from ``train.global_batch_size`` for this many
    processes, DeepSpeed told the batch sizes, and what the sharded engines cannot do refused up front."""
    world, kind = accelerator.num_processes, accelerator.distributed_type
    tc = recipe.train.for_processes(world)
    recipe = recipe.model_copy(update={"train": tc})
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise RecipeError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                          "(see recipes/accelerate/fsdp-qlora.yaml)")
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED) and (tc.checkpoint_every or resume):
        # The optimizer state is sharded there, and checkpoints hold one process's optimizer state.
        raise RecipeError(f"train.checkpoint_every and --resume work with DDP, not yet under {kind.value}; unset "
                          "them or launch with a DDP config (recipes/accelerate/multi-gpu.yaml)")
    if kind == DistributedType.DEEPSPEED:
        # Our loader yields whole micro-batches (no batch_size for accelerate to read), and the engine decides
        # when an optimizer step happens: it must know the recipe's numbers.
        accelerator.state.deepspeed_plugin.deepspeed_config.update({
            "train_micro_batch_size_per_gpu": tc.micro_batch_size, "gradient_accumulation_steps": tc.grad_accum,
            "train_batch_size": tc.global_batch(world),
            "gradient_clipping": tc.max_grad_norm or 0.0})
    return recipe


def _zero3(accelerator: Accelerator) -> bool:
    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.zero_stage == 3)


def _sharded(accelerator: Accelerator) -> bool:
    return accelerator.is_fsdp2 or _zero3(accelerator)


def _trainable(unwrapped: PeftModel) -> dict[str, torch.nn.Parameter]:
    # Full names without activation-checkpoint wrappers: the names in the model's own state dict.
    return {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in unwrapped.named_parameters() if p.requires_grad}


def adapter_snapshot(accelerator: Accelerator, unwrapped: PeftModel) -> dict[str, torch.Tensor]:
    """The trained weights as CPU tensors, identical on every process: to keep the best adapter and to save it.

    Under FSDP2 and ZeRO-3 each process holds a shard of every weight, so every process must call this (the
    gather is a collective); only the adapter is gathered, not the frozen base. Keys are then full parameter
    names (what ``save_pretrained(state_dict=...)`` takes), otherwise peft's adapter keys.
    """
    if accelerator.is_fsdp2:
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
                for n, p in _trainable(unwrapped).items()}
    if _zero3(accelerator):
        import deepspeed  # optional: only ZeRO-3 launches get here, and only they need it installed

        params = _trainable(unwrapped)
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().cpu().clone() for n, p in params.items()}
    return {k: v.detach().cpu().clone() for k, v in adapter_state_dict(unwrapped).items()}


def restore_adapter(accelerator: Accelerator, model, unwrapped: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Put an ``adapter_snapshot`` back into the (possibly sharded) model; every process calls this."""
    if accelerator.is_fsdp2:
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    elif _zero3(accelerator):
        import deepspeed  # optional, as above

        params = _trainable(unwrapped)
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])
    else:
        set_peft_model_state_dict(unwrapped, state)


def save_adapter(accelerator: Accelerator, unwrapped: PeftModel, folder: Path, tokenizer) -> None:
    """Every process calls this (sharded engines gather first); the main process writes."""
    state = adapter_snapshot(accelerator, unwrapped) if _sharded(accelerator) else None
    if accelerator.is_main_process:
        ckpt.save_adapter(unwrapped, folder, tokenizer, state_dict=state)
