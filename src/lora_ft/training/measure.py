"""Measuring what the planner predicts: the peak tensor memory of one training (or evaluation) step, on this machine.

For ``scripts/bench_plan.py`` and the planner's tests. The model is built exactly as training builds it
(``session.build_model``) and the step runs the objective's own loss.
"""

from __future__ import annotations

import gc
import math
from typing import Any

import torch
from accelerate.state import AcceleratorState
from torch.profiler import ProfilerActivity, profile

from ..data.chat import IGNORE
from ..memory.activations import attended_pairs
from ..modeling.loading import load_tokenizer, resolve_source
from ..objectives import Objective, objective_for
from ..recipe import Recipe
from .session import build_model, make_accelerator

EXAMPLES_PER_ROW = 4
"""Examples in each packed row of a causal LM's ``synthetic_batch``."""


def synthetic_lengths(micro_batch: int, seq_len: int, per_row: int = 1) -> list[int]:
    """``synthetic_batch``'s example lengths: ``per_row`` examples per row of ``seq_len``, the last 8 tokens short."""
    count = micro_batch * per_row
    return [seq_len // per_row - (8 if k == count - 1 and count > 1 else 0) for k in range(count)]


def synthetic_pairs(micro_batch: int, seq_len: int) -> float:
    """The planner's ``attended`` for ``synthetic_batch``'s packed causal LM rows."""
    return attended_pairs(synthetic_lengths(micro_batch, seq_len, EXAMPLES_PER_ROW))


def _held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the distinct tensor storages the model and optimizer hold: parameters, buffers, bitsandbytes'
    quantization state (absmax, code books, int8 row scales) and the optimizer state."""
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    for module in model.modules():
        for p in module.parameters(recurse=False):
            add(p)
            qs = getattr(p, "quant_state", None)
            while qs is not None:
                for k in ("absmax", "code", "offset"):
                    add(getattr(qs, k, None))
                qs = getattr(qs, "state2", None)
            add(getattr(p, "SCB", None))
        for b in module.buffers(recurse=False):
            add(b)
        state = getattr(module, "state", None)
        for k in ("CB", "SCB"):
            add(getattr(state, k, None))
    if optimizer is not None:
        for st in optimizer.state.values():
            for v in st.values():
                add(v)
    seen.pop(0, None)
    return sum(seen.values())


def synthetic_batch(objective: Objective, micro_batch: int, seq_len: int, answer_fraction: float,
                    seed: int = 0, packed: bool = False) -> dict:
    """A training batch as the objective collates it: random tokens, the last example 8 tokens shorter (so the
    batch carries padding, as length-grouped real batches do), and for a causal LM labels on the last
    ``answer_fraction`` of each example (a classifier's examples get labels 0 and 1 in turn; a preference pair's
    rejected side is its chosen one). ``packed``: rows of four examples each, packed as ``data.packing`` packs
    them."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    low = min(1000, max(objective.tokenizer.vocab_size - 1, 2))
    # an encoder packs its micro-batch's examples
    per_row = EXAMPLES_PER_ROW if packed and not objective.packs_examples else 1
    for k, n in enumerate(synthetic_lengths(micro_batch, seq_len, per_row)):
        ids = torch.randint(1, low, (n,), generator=g).tolist()
        if objective.model_task == "causal_lm":
            answer = max(2, math.ceil(answer_fraction * n))
            rows.append({"input_ids": ids, "labels": [IGNORE] * (n - answer) + ids[n - answer:]})
        else:
            rows.append({"input_ids": ids, "attention_mask": [1] * n, "labels": k % 2})
    if objective.sequences_per_example == 2:  # preference pairs: a rejected answer as long as the chosen one
        rows = [{**r, "rejected_input_ids": r["input_ids"], "rejected_labels": r["labels"]} for r in rows]
    return objective.collate_packed(rows, seq_len) if packed else objective.collate(rows)


def measure_peak(recipe: Recipe, micro_batch: int, seq_len: int, answer_fraction: float = 1.0,
                 evaluation: bool = False) -> dict[str, float]:
    """Peak tensor memory of a training step, measured on this machine.

    The model is loaded and prepared as ``lora-ft train`` does (``load_model``, ``attach_adapters``, accelerate
    with the recipe's precision), then two steps run (forward, backward, gradient clipping, AdamW, zero_grad):
    the second is measured, so the optimizer state exists as it does for every later step (the first is a
    small one: it only has to create that state).

    - CUDA: ``torch.cuda.max_memory_allocated`` over the second step.
    - CPU: the bytes held before the step (distinct storages of parameters, buffers, quantization state and
      optimizer state) + the peak of the net allocations during the step, read from the profiler's CPU
      allocator events (``profile_memory=True``: every allocation and free with its size). Unlike RSS this
      ignores the allocator's cache, the Python heap and memory-mapped checkpoint files, so it is the CPU
      counterpart of ``max_memory_allocated``.

    ``evaluation``: measure an evaluation step instead (no gradients, as ``evaluate_loader`` runs it), on
    ``micro_batch`` examples.

    Meant for a process of its own (``scripts/bench_plan.py`` runs one per configuration): it resets
    accelerate's process state before and after.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        # accelerate's process state is a singleton that refuses a second precision: each measurement sets
        # its recipe's own, and leaves none behind (see the finally below).
        AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return _measure(recipe, micro_batch, seq_len, answer_fraction, evaluation)
    finally:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            AcceleratorState._reset_state(reset_partial_state=True)


def _measure(recipe: Recipe, micro_batch: int, seq_len: int, answer_fraction: float,
             evaluation: bool) -> dict[str, float]:
    accelerator, compute = make_accelerator(recipe)
    source = resolve_source(recipe.model.name)
    tok = load_tokenizer(source, recipe.model)
    objective = objective_for(recipe, tok)
    labels = {0: "a", 1: "b"} if objective.model_task == "sequence_classification" else None
    _, model = build_model(recipe, accelerator, compute, source, tok, labels)
    device = accelerator.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    def on_device(batch: dict) -> dict:
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    packed = not evaluation and objective.use_packing(recipe.data.packing, model)
    batch = on_device(synthetic_batch(objective, micro_batch, seq_len, answer_fraction, packed=packed))

    def step(batch: dict, evaluation: bool = False) -> None:
        if evaluation:  # as evaluate_loader runs it
            model.eval()
            with torch.no_grad():
                objective.eval_step(model, batch)
            model.train()
            return
        accelerator.backward((objective.loss(model, batch) / objective.items(batch).clamp(min=1)).sum())
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(on_device(synthetic_batch(objective, 1, 16, 0.5)))  # a small first step creates the AdamW state
    gc.collect()
    held = _held_bytes(model, optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(batch, evaluation)
        torch.cuda.synchronize()
        return {"held": held, "step": torch.cuda.max_memory_allocated() - before,
                "peak": float(torch.cuda.max_memory_allocated())}
    top = cpu_allocation_peak(lambda: step(batch, evaluation))
    return {"held": held, "step": top, "peak": float(held + top)}


def cpu_allocation_peak(fn) -> int:
    """Peak of the net CPU tensor allocations while ``fn`` runs, from the profiler's allocator events (bytes above
    what was allocated when it started)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    net = top = 0
    for e in events:
        net += e.nbytes()
        top = max(top, net)
    return top
