"""The launch policy: ``train.micro_batch_size: auto`` and ``train.gradient_checkpointing: auto`` resolved against the
device a run starts on, from the planner's estimate (``estimate.py``) and the data's longest answer.

``train()`` calls ``resolve_for_launch`` before any loader is built; the resolved values go to ``run_config.yaml``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch

from ..data.prepare import column, prepare_data
from ..errors import LoraFtError, RecipeError, UsageError, first_line
from ..modeling.loading import check_max_length, load_config, load_tokenizer, resolve_source
from ..objectives import objective_for
from ..recipe import Recipe
from ..recipe.defaults import reference_batch
from .estimate import estimate, largest_micro_batch
from .shape import fmt_size, model_shape, setting_for

log = logging.getLogger(__name__)


def device_memory(device: str) -> int:
    """The memory to plan against: the GPU's total memory, or the machine's physical memory (not what is free
    now, so that a resumed run picks the same micro-batch)."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda on a machine without a GPU: give the card's size with --memory")
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# ---------------------------------------------------------------------------------------------- auto batch
def _fitting_divisor(per_process: int, fit: int) -> int:
    """The largest micro-batch ≤ ``fit`` that divides the per-process batch (0 when nothing fits)."""
    return max((d for d in range(1, min(fit, per_process) + 1) if per_process % d == 0), default=0)


def resolve_auto_micro_batch(recipe: Recipe, world: int, device: str, budget: float | None = None,
                             answer_tokens: int | None = None, source: str | None = None,
                             bf16_supported: bool = True) -> Recipe:
    """``train.micro_batch_size: auto`` → the largest micro-batch the planner fits into ``budget`` at
    ``data.max_length`` that divides the global batch per process, with ``global_batch_size`` set to the recipe's
    global batch (``TrainConfig.per_process_batch`` of the objective's ``reference_batch``), so that ``grad_accum``
    is derived from it where it always is
    (``TrainConfig.for_processes``). Recipes with an int micro_batch_size are returned unchanged.
    """
    tc = recipe.train
    if tc.micro_batch_size != "auto":
        return recipe
    shape = model_shape(recipe, source)
    s = setting_for(recipe, device, bf16_supported)
    budget = device_memory(device) if budget is None else budget
    seq = recipe.data.max_length
    fit = largest_micro_batch(shape, s, seq, budget, answer_tokens=answer_tokens)
    if fit == 0:
        need = estimate(shape, s, 1, seq, answer_tokens=answer_tokens).total
        raise RecipeError(
            f"train.micro_batch_size auto: one example of data.max_length {seq} needs {fmt_size(need)}, more than the "
            f"{fmt_size(budget)} of this {device}; lower data.max_length, use model.quant nf4 or turn on "
            "train.gradient_checkpointing")
    per_process = tc.per_process_batch(world, reference_batch(recipe))
    micro = _fitting_divisor(per_process, fit)
    log.info("micro_batch_size auto: %d (largest that fits %s at max_length %d: %d; global batch %d = %d × %d × %d)",
             micro, fmt_size(budget), seq, fit, per_process * world, micro, per_process // micro, world)
    tc = tc.model_copy(update={"micro_batch_size": micro, "global_batch_size": per_process * world})
    return recipe.model_copy(update={"train": tc})


def resolve_auto_checkpointing(recipe: Recipe, world: int, device: str, budget: float,
                               answer_tokens: int | None = None, source: str | None = None,
                               bf16_supported: bool = True) -> Recipe:
    """``train.gradient_checkpointing: auto`` → on only when memory needs it: recomputing every layer costs about
    a third more compute, so it is worth it only when the step does not fit without it, or (with an ``auto``
    micro-batch) when it lets a larger micro-batch of the global batch fit."""
    tc = recipe.train
    if tc.gradient_checkpointing != "auto":
        return recipe
    shape = model_shape(recipe, source)
    s = setting_for(recipe, device, bf16_supported)
    on, off = replace(s, gradient_checkpointing=True), replace(s, gradient_checkpointing=False)
    seq = recipe.data.max_length
    if tc.micro_batch_size == "auto":
        per_process = tc.per_process_batch(world, reference_batch(recipe))
        fits = {x: _fitting_divisor(per_process, largest_micro_batch(shape, x, seq, budget,
                                                                     answer_tokens=answer_tokens))
                for x in (on, off)}
        need = fits[on] > fits[off]
        why = f"micro-batch {fits[off]} without, {fits[on]} with it"
    else:
        peak = estimate(shape, off, tc.micro_batch_size, seq, answer_tokens=answer_tokens).total
        need = peak > budget
        why = f"without it the step needs {fmt_size(peak)}"
    log.info("gradient_checkpointing auto: %s (%s; %s of %s)", "on" if need else "off", why, fmt_size(budget), device)
    return recipe.model_copy(update={"train": tc.model_copy(update={"gradient_checkpointing": need})})


TRIM_MIN_ACTIVATIONS = 1 << 30
"""``train.trim_cpu_memory: auto`` trims the heap when a step saves at least this much activation memory.
Measured with one thread (``scripts/bench_classify.py``, ``scripts/bench_train.py``, their ``--no-trim``): MiniLM-L6
classification, micro-batch 16 × 128 (589 MiB planned activations): trimming took tokens/s from 923 to 689 (its
system time was 7.1 s of 32.7 s CPU) for a peak RSS of 1,396 instead of 1,637 MB: it does not pay. SmolLM2-135M
NF4 chat, 8 packed rows × 256 (2.8 GiB planned): 116.3 → 105.3 tokens/s (−9%) for a peak RSS of 4,750 instead of
7,322 MB (−35%): it does. Saved RSS grows with the activations, the time lost much less."""


def resolve_auto_trim(recipe: Recipe, device: str, source: str | None = None, bf16_supported: bool = True,
                      seq: int | None = None, attended: float | None = None) -> Recipe:
    """``train.trim_cpu_memory: auto`` → on for CPU runs whose layers produce ``TRIM_MIN_ACTIVATIONS`` or more of
    activations in a step (what it saves without checkpointing, at the resolved micro-batch and ``seq`` tokens,
    default ``data.max_length``; ``attended``: ``estimate``'s, from the data), off below that and on
    GPUs (where it does nothing)."""
    tc = recipe.train
    if tc.trim_cpu_memory != "auto":
        return recipe
    on = False
    if device == "cpu":
        # With checkpointing a step saves little, but every layer's activations still pass through the heap (once
        # in forward, again when the layer is recomputed): those are what the heap keeps. Measured on
        # SmolLM2-135M NF4, one packed row of 1,024 tokens with checkpointing (bench_scale.py, --gc on): peak RSS
        # 1.92-2.36 GiB untrimmed, 1.15 GiB trimmed, for a 0.35 GiB tensor peak.
        s = replace(setting_for(recipe, device, bf16_supported), gradient_checkpointing=False)
        est = estimate(model_shape(recipe, source), s, tc.micro_batch_size,
                       min(seq or recipe.data.max_length, recipe.data.max_length), attended=attended)
        acts = next(r.bytes for r in est.rows if r.label == "activations")
        on = acts >= TRIM_MIN_ACTIVATIONS
        log.info("trim_cpu_memory auto: %s (a step's layers produce %s of activations; threshold %s)",
                 "on" if on else "off", fmt_size(acts), fmt_size(TRIM_MIN_ACTIVATIONS))
    return recipe.model_copy(update={"train": tc.model_copy(update={"trim_cpu_memory": on})})


def answer_tokens_of(dataset) -> int | None:
    """The longest stretch from the first label token to the end of an example (what ``logits_to_keep``
    covers in the worst batch), from tokenized causal LM data."""
    if dataset is None or "labels" not in dataset.column_names or not len(dataset):  # None: a stream
        return None
    if "answer_tokens" in dataset.column_names:  # written by data.prepare for every example: one Arrow column
        return int(column(dataset, "answer_tokens").max())
    longest = 0
    for labels in dataset["labels"]:
        if not isinstance(labels, list):
            return None
        first = next((k for k, v in enumerate(labels) if v != -100), len(labels))
        longest = max(longest, len(labels) - first)
    return longest


def answer_tokens_from_data(recipe: Recipe) -> int | None:
    """``answer_tokens_of`` the recipe's training split (tokenized as ``setup`` will, which reuses the datasets
    cache); None for classifiers. Without data the planner assumes the worst case: loss on every position."""
    if recipe.model.task != "causal_lm" or not recipe.data.train or recipe.data.streaming:  # a stream: not read
        return None
    tok = load_tokenizer(resolve_source(recipe.model.name), recipe.model)
    cfg = recipe.data.model_copy(update={"validation": None, "test": None, "validation_split": 0.0})
    return answer_tokens_of(prepare_data(cfg, objective_for(recipe, tok), recipe.train.seed).splits["train"])


def resolve_for_launch(recipe: Recipe, accelerator) -> Recipe:
    """``train()``'s step for the ``auto`` memory settings ``gradient_checkpointing``, then ``micro_batch_size``:
    plan against this process's device (its GPU's total memory, or the machine's RAM) with the data's longest
    answer, before any loader is built. ``trim_cpu_memory`` waits for the prepared data (``resolve_trim``). The
    resolved values go to ``run_config.yaml``."""
    return _resolve_batch_and_checkpointing(recipe, accelerator)


def resolve_trim(recipe: Recipe, device: str, source: str, longest: int, attended: float | None = None) -> Recipe:
    """``trim_cpu_memory: auto`` (``resolve_auto_trim``) at the longest training sequence, not ``data.max_length``:
    the held-out classification tasks' texts are 10-130 tokens, and at max_length 512 the planner counted 4.8 GiB
    of activations for MiniLM batches of 16 that hold well under 1 GiB, turning on a trim that costs a quarter of
    the tokens/s there (``TRIM_MIN_ACTIVATIONS``)."""
    if recipe.train.trim_cpu_memory != "auto":
        return recipe
    try:
        return resolve_auto_trim(recipe, device, source, seq=longest, attended=attended)
    except LoraFtError:
        raise
    except Exception as e:  # noqa: BLE001 - an architecture the planner cannot build must still train
        log.warning("trim_cpu_memory auto: cannot plan this model (%s); trimming stays on", first_line(e))
        return recipe.model_copy(update={"train": recipe.train.model_copy(update={"trim_cpu_memory": True})})


def _resolve_batch_and_checkpointing(recipe: Recipe, accelerator) -> Recipe:
    tc = recipe.train
    if tc.micro_batch_size != "auto" and tc.gradient_checkpointing != "auto":
        return recipe
    device = accelerator.device.type
    if device not in ("cuda", "cpu"):
        log.warning("micro_batch_size / gradient_checkpointing auto: the planner knows CUDA GPUs and the CPU, not %s: "
                    "no memory check", device)
        # gradient_checkpointing auto keeps its device default (session.setup)
        return unplanned_batch(recipe, accelerator.num_processes)
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    budget, world = device_memory(device), accelerator.num_processes
    with accelerator.main_process_first():  # as in session.setup: one rank fetches/converts example or GGUF models
        source = resolve_source(recipe.model.name)
    # Before the planner reads the data: a max_length beyond the model's positions is the error to report, not
    # what truncation at that length does to the examples (session.setup checks again for the other paths).
    check_max_length(load_config(source, recipe.model), recipe.data.max_length, recipe.model.name)
    fixed = tc.micro_batch_size != "auto"
    try:
        if fixed:  # a fixed micro-batch that fits with loss on every position needs no pass over the data
            worst = resolve_auto_checkpointing(recipe, world, device, budget, source=source, bf16_supported=bf16)
            if not worst.train.gradient_checkpointing:
                return worst
        answer = answer_tokens_from_data(recipe)
        planned = resolve_auto_checkpointing(recipe, world, device, budget, answer, source, bf16)
        return planned if fixed else resolve_auto_micro_batch(planned, world, device, budget, answer, source, bf16)
    except LoraFtError:
        raise
    except Exception as e:  # noqa: BLE001 - an architecture the planner cannot build must still train
        log.warning("%s auto: cannot plan this model (%s); %s", "gradient_checkpointing" if fixed else
                    "micro_batch_size", first_line(e), "using the device default" if fixed else
                    "training the whole batch at once")
        return recipe if fixed else unplanned_batch(recipe, world)


def unplanned_batch(recipe: Recipe, world: int) -> Recipe:
    """``micro_batch_size: auto`` where the planner cannot judge memory: the whole per-process batch in one
    micro-batch (no accumulation), as a recipe that gave that number would train."""
    tc = recipe.train
    if tc.micro_batch_size != "auto":
        return recipe
    per_process = tc.per_process_batch(world, reference_batch(recipe))
    tc = tc.model_copy(update={"micro_batch_size": per_process, "global_batch_size": per_process * world})
    return recipe.model_copy(update={"train": tc})
