"""``lora-ft plan``: the planner's breakdown for a recipe, and what fits a memory budget."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from ..recipe import Recipe
from .estimate import estimate, largest_micro_batch
from .launch import device_memory, resolve_auto_checkpointing
from .shape import fmt_size, model_shape, setting_for


def plan_report(recipe: Recipe, device: str, memory: int | None, answer_fraction: float = 1.0,
                seq_len: int | None = None, micro_batch: int | None = None) -> str:
    """``lora-ft plan``: the breakdown for the recipe's micro-batch × max_length, and what fits the budget."""
    shape = model_shape(recipe)
    budget = memory if memory is not None else device_memory(device)
    seq = seq_len or recipe.data.max_length
    if micro_batch and recipe.train.micro_batch_size == "auto":
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"micro_batch_size": micro_batch})})
    # As training decides it (resolve_for_launch), with the answer fraction standing in for the data.
    recipe = resolve_auto_checkpointing(recipe, 1, device, budget, max(1, math.ceil(answer_fraction * seq)) - 1 or None)
    s = setting_for(recipe, device)
    mb = micro_batch or (recipe.train.micro_batch_size if recipe.train.micro_batch_size != "auto" else None)
    if mb is None:
        mb = max(1, largest_micro_batch(shape, s, seq, budget, answer_fraction))
    e = estimate(shape, s, mb, seq, answer_fraction)
    quant = s.quant + (" + double quant" if s.quant in ("nf4", "fp4") and s.double_quant else "")
    lines = [
        f"{Path(shape.name).name or shape.name}: {shape.architecture}, {shape.total_params / 1e9:.2f}B parameters, "
        f"{shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}",
        f"quant {quant}; LoRA r={s.r} on {len(shape.layer_targets)} modules per layer; {s.device}, compute "
        f"{s.compute}, gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}",
        f"micro-batch {mb}" + (f" prompts (× {s.sequences} completions of up to {s.generated} tokens)" if s.generated
                               else f" pairs (× {s.sequences} sequences)" if s.sequences > 1 else "")
        + (f" rows (+ {s.scored} mismatched KL sequence each, without gradients)" if s.scored else "")
        + f" × sequence {seq}"
        + (f"; logits for the last {e.keep} positions (the completions)" if s.generated else
           f"; logits for the last {e.keep} positions ({answer_fraction:.0%} of the sequence, --answer-fraction)"
           if shape.task == "causal_lm" else ""),
        "",
    ]
    width = max(len(r.label) for r in e.rows) + 2
    lines.append(f"{'component':<{width}}{'memory':>11}   note")
    for r in e.rows:
        lines.append(f"{r.label:<{width}}{fmt_size(r.bytes):>11}   {r.note}")
    peak_what = "torch.cuda.max_memory_allocated" if s.device == "cuda" else "tensor memory"
    over_what = "CUDA context + allocator slack" if s.device == "cuda" else (
        "Python, torch and libraries" + (", the heap's previous recomputed layer" if s.gradient_checkpointing else ""))
    which = (f"the training step (evaluation: {fmt_size(e.eval_peak)})" if e.step_peak >= e.eval_peak
             else f"the evaluation step (training step: {fmt_size(e.step_peak)})")
    lines.append(f"{'peak (' + peak_what + ')':<{width}}{fmt_size(e.peak):>11}   {which}")
    lines.append(f"{'framework overhead':<{width}}{fmt_size(e.overhead):>11}   {over_what}")
    verdict = "fits" if e.total <= budget else "does NOT fit"
    lines.append(f"{'total':<{width}}{fmt_size(e.total):>11}   {verdict} in {fmt_size(budget)}")
    other = estimate(shape, replace(s, gradient_checkpointing=not s.gradient_checkpointing), mb, seq, answer_fraction)
    lines.append("* not at the same time: the training step holds the activations + the larger of logits and")
    lines.append("  working set; the evaluation step holds the weights and its own row.")
    lines.append(f"Gradient checkpointing {'off' if s.gradient_checkpointing else 'on'} would make the peak "
                 f"{fmt_size(other.peak)}.")
    lines.append("")
    lines.append(f"largest micro-batch that fits {fmt_size(budget)}, by sequence length:")
    lengths = sorted({2**k for k in range(7, 16) if 2**k <= max(seq, shape.max_positions or seq)} | {seq})
    cells = [f"{n}: {largest_micro_batch(shape, s, n, budget, answer_fraction)}" for n in lengths]
    lines.append("  " + " | ".join(cells))
    notes = list(shape.notes)
    if s.use_dora:
        notes.append("DoRA's weight-norm computation is not counted in the activations (the plan is low)")
    for note in notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
