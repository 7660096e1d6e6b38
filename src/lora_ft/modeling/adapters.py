"""LoRA adapters: which modules get them, peft's config, and attaching them to the base model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import (
    LoraConfig,
    PeftModel,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
)
from transformers import PreTrainedModel

from ..errors import RecipeError
from ..recipe import LoraConfigSection
from .chat_template import token_modules
from .fused_lora import fuse_lora_layers
from .loading import is_quantized
from .loftq import start_at_quantization_error
from .lora_dropout import fuse_lora_dropout
from .model_dropout import swap_model_dropout
from .packed_attention import use_packed_attention

log = logging.getLogger(__name__)

TASK_TYPES = {"causal_lm": TaskType.CAUSAL_LM, "sequence_classification": TaskType.SEQ_CLS,
              "embedding": TaskType.FEATURE_EXTRACTION, "reward": TaskType.SEQ_CLS,
              "regression": TaskType.SEQ_CLS, "token_classification": TaskType.TOKEN_CLS}


def unused_modules(model: PreTrainedModel, task: str) -> list[str]:
    """Modules whose output the task never reads, kept free of LoRA: an encoder's pooler under ``embedding`` (the
    embedding pools the token states), whose adapter would get no gradient and make DDP wait for one forever."""
    return [n for n, _ in model.named_modules() if task == "embedding" and n.rsplit(".", 1)[-1] == "pooler"]


def _is_linear(module: torch.nn.Module) -> bool:
    # bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear; GPT-2 style models use transformers' Conv1D.
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def linear_modules(model: PreTrainedModel, exclude: list[str]) -> list[str]:
    """Full names of the backbone's linear layers, minus the output embedding and ``exclude`` (heads)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not _is_linear(module) or module is output:
            continue
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        names.append(name)
    return names


def resolve_targets(model: PreTrainedModel, requested: str | list[str], heads: list[str]) -> list[str]:
    """``auto`` → every backbone linear layer, as short suffixes when those are unambiguous.

    Chosen here rather than with peft's ``target_modules="all-linear"``: that excludes only the output embedding
    (or a classifier named in its short list), and even with ``exclude_modules=["classifier"]`` peft 0.21 still
    lists a RoBERTa head's ``classifier.dense`` and ``classifier.out_proj`` among the targets (checked on a tiny
    RoBERTa): exclusion matches whole names, not the layers inside a head that we train fully
    (``modules_to_save``). The planner also needs this list without building a peft model.
    """
    candidates = linear_modules(model, heads)
    if requested == "auto":
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        # A suffix is safe only if every linear layer carrying it is a candidate (e.g. not "dense" when
        # the head also has a "dense"); otherwise fall back to full names for exactness.
        all_linear = [n for n, m in model.named_modules() if _is_linear(m)]
        if all(n in candidates for n in all_linear if n.rsplit(".", 1)[-1] in suffixes):
            return suffixes
        return candidates
    missing = [t for t in requested if not any(n == t or n.endswith("." + t) for n in candidates)]
    if missing:
        known = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise RecipeError(f"lora.target_modules {missing} match no linear layer of the backbone; "
                          f"candidates: {', '.join(known)}")
    return list(requested)


def lora_config(cfg: LoraConfigSection, task: str, targets: list[str], heads: list[str],
                tokens: dict[str, list[int]] | None = None) -> LoraConfig:
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        init_lora_weights=True if cfg.init == "loftq" else cfg.init,  # LoftQ replaces QLoRA's init afterwards
        modules_to_save=list(heads) or None,  # a copy: peft extends this list in place
        trainable_token_indices=tokens or None,
        task_type=TASK_TYPES[task],
    )


def adapter_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """peft's adapter weights, never whole embedding layers (pass ``save_embedding_layers=False`` to
    ``save_pretrained`` for the same reason).

    LoRA never targets an embedding here, and the rows a chat template trains are the adapter's own trainable
    tokens; peft's ``auto`` adds both whole embedding layers whenever the vocabulary grew (the tiny test model's
    70 KB adapter became 235 KB; an untied 128k-vocabulary 8B model's, 4 GB in fp32), and reads the base config
    again on every call.
    """
    return get_peft_model_state_dict(model, save_embedding_layers=False)


def attach_adapters(
    model: PreTrainedModel, cfg: LoraConfigSection, task: str, heads: list[str], gradient_checkpointing: bool,
    weight_files: list[Path] | None = None, token_rows: list[int] | None = None,
) -> PeftModel:
    """Freeze the base, prepare k-bit layers for training, inject LoRA; heads train in full.

    Args:
        model: the loaded base model.
        cfg: the recipe's ``lora`` section.
        task: the recipe's ``model.task``.
        heads: new task heads (trained in full).
        gradient_checkpointing: recompute each layer in backward.
        weight_files: the base checkpoint's safetensors files, whose full-precision weights ``lora.init: loftq``
            reads.
        token_rows: token ids whose embedding (and untied output) rows train too (``model.chat_template``).
    """
    targets = resolve_targets(model, cfg.target_modules, heads + unused_modules(model, task))
    tokens = token_modules(model, token_rows) if token_rows else None
    model = _prepare_base(model, gradient_checkpointing)
    peft_model = get_peft_model(model, lora_config(cfg, task, targets, heads, tokens))
    if cfg.init == "loftq":
        start_at_quantization_error(peft_model, weight_files)  # see loftq.py for why not peft's own function
    return _ready(peft_model, targets)


def attach_start_adapter(model: PreTrainedModel, adapter_dir: str, gradient_checkpointing: bool) -> PeftModel:
    """A trained adapter (``lora.init_from``) on the prepared base, trainable: training continues from it."""
    peft_model = PeftModel.from_pretrained(_prepare_base(model, gradient_checkpointing), adapter_dir,
                                           is_trainable=True)
    return _ready(peft_model, sorted(peft_model.peft_config["default"].target_modules))


def _prepare_base(model: PreTrainedModel, gradient_checkpointing: bool) -> PreTrainedModel:
    """Freeze the base for training: k-bit preparation, gradient checkpointing."""
    if is_quantized(model):
        # Casts the remaining non-quantized weights (norms, embeddings) to fp32 for stable training and
        # makes the embedding outputs require grad so checkpointed blocks still backpropagate.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        # Non-reentrant checkpointing works with DDP and frozen inputs (no "mark variable ready twice").
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def _ready(peft_model: PeftModel, targets: list[str]) -> PeftModel:
    """The adapter model as training uses it: LoRA dropout and each LoRA layer's forward fused, the model's own
    dropout drawing CPU masks, packed rows attended example by example, the trainable share logged."""
    # peft's dropout keeps a full copy of every LoRA input for backward; see lora_dropout.py.
    fuse_lora_dropout(peft_model)
    # peft's layer forward makes separate passes for the clone, scaling and sum; see fused_lora.py.
    fuse_lora_layers(peft_model)
    swap_model_dropout(peft_model)  # the model's own dropout draws CPU masks as LoRA's do; see model_dropout.py
    use_packed_attention(peft_model.get_base_model())  # SDPA computes all pairs of a packed row; packed_attention.py
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("LoRA on %s; trainable %s of %s parameters (%.2f%%)", targets if len(targets) < 12 else
             f"{len(targets)} modules", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return peft_model


def load_adapter(model: PreTrainedModel, adapter_dir: str, trainable: bool = False) -> PeftModel:
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
