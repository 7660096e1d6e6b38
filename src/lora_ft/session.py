"""Building a run's pieces: the Accelerator, the data loaders, and tokenizer → data → model → adapters.

Shared by training (``train.py``), evaluation of a saved run, merging, inference and the planner's
measurements, so that every command loads a model exactly the way training did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from peft import PeftModel
from torch.utils.data import DataLoader

from .adapters import attach_adapters, load_adapter
from .config import Recipe, resolve_compute_dtype
from .craft import Augmenter
from .data import CAUSAL_WINDOW, Collator, LengthGroupedBatches, TaskData, prepare_data
from .model import LoadedModel, load_model, load_tokenizer, resolve_source
from .report import available_trackers


def make_accelerator(recipe: Recipe) -> tuple[Accelerator, str]:
    cuda = torch.cuda.is_available()
    compute = resolve_compute_dtype(recipe.model.compute_dtype, cuda, cuda and torch.cuda.is_bf16_supported())
    precision = {"bf16": "bf16", "fp16": "fp16"}.get(compute, "no")
    # On a machine without GPUs, accelerate forms a (gloo) process group only when told it runs on the CPU:
    # otherwise every process that torchrun / `accelerate launch --multi_gpu` starts trains alone, and all of
    # them write the same files.
    cpu = torch.distributed.is_available() and torch.distributed.is_torchelastic_launched() and not cuda
    # gradient_accumulation_steps stays 1: the loop accumulates itself, with token-weighted normalisation.
    # A freezing schedule leaves some adapters without gradients for a while; DDP must be told to expect that.
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if recipe.freeze.strategy != "none" else []
    accelerator = Accelerator(mixed_precision=precision, log_with=available_trackers(recipe.train.trackers) or None,
                              project_dir=recipe.output_dir, cpu=cpu, kwargs_handlers=ddp)
    if not accelerator.is_main_process:
        # Every process runs the same code: without this each message would appear once per process.
        logging.getLogger("lora_ft").setLevel(logging.WARNING)
    return accelerator, compute


def make_loader(ds, batch_size: int, tokenizer, causal: bool, shuffle: bool, seed: int,
                window: int = CAUSAL_WINDOW, augment: Augmenter | None = None) -> DataLoader:
    """``window``: batches per length-sorted window when shuffling (0: shuffle only)."""
    sampler = LengthGroupedBatches([len(x) for x in ds["input_ids"]], batch_size, shuffle, seed, window)
    # A private generator: creating an iterator would otherwise draw from the global RNG, so a resumed run
    # (which creates its iterator after restoring the RNG) would see different dropout masks.
    return DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(tokenizer.pad_token_id, causal, augment),
                      generator=torch.Generator().manual_seed(seed))


@dataclass
class Session:
    """Everything ``setup`` builds; the rest of the recipe only reads it."""

    loaded: LoadedModel
    model: PeftModel
    data: TaskData
    causal: bool


def setup(recipe: Recipe, accelerator: Accelerator, compute: str, adapter_dir: str | None = None,
          extra_splits: dict[str, str] | None = None, id2label: dict[int, str] | None = None) -> Session:
    """Tokenizer → data → model → adapters. Data comes first because a classifier's head size is the
    number of labels found in the training split."""
    cfg = recipe.model
    with accelerator.main_process_first():  # one rank fetches/converts example or GGUF models
        source = resolve_source(cfg.name)
    tokenizer = load_tokenizer(source, cfg)
    need_train = adapter_dir is None
    data = prepare_data(recipe.data, cfg.task, tokenizer, recipe.train.seed, need_train, extra_splits, id2label)
    device = accelerator.device if accelerator.device.type != "cuda" else accelerator.local_process_index
    loaded = load_model(cfg.model_copy(update={"name": source}), compute, device, data.id2label, tokenizer)
    if adapter_dir is not None:
        model = load_adapter(loaded.model, adapter_dir)
    else:
        gc = recipe.train.gradient_checkpointing
        model = attach_adapters(loaded.model, recipe.lora, cfg.task, loaded.head_modules,
                                torch.cuda.is_available() if gc == "auto" else gc)
    return Session(loaded, model, data, cfg.task == "causal_lm")
