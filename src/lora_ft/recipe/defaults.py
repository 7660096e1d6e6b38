"""The rules behind the ``train`` section's ``auto`` values, and the record of where every resolved value came from.

A minimal recipe (model, task, data) is what a new user runs first, so the defaults are chosen per objective
(classification with a new head, SFT, preference tuning) and data size rather than as one set of constants tuned
for chat SFT. Each rule below names the measurement behind it (``scripts/bench_defaults.py`` on the held-out tasks
of ``scripts/build_heldout_tasks.py``, none of them shipped or used by the tests). The trainer resolves them when
a run starts, in two steps because the evaluation cadence needs the number of optimizer steps: ``resolve_training``
once the data is prepared, ``resolve_cadence`` once the loaders exist. ``sources`` then says, for every value a
reader asks about first, whether the recipe gave it, the schema's constant default, or a rule (and which); the
trainer writes that into ``run_config.yaml`` (as comments, so the file still loads as a recipe) and
``run_info.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .compare import flatten
from .objective import PREFERENCE_OBJECTIVES
from .schema import Recipe
from .train import TrainConfig

# ----------------------------------------------------------------------------------------------------- the rules
REFERENCE_BATCH = {"classification": 16, "sft": 4, "preference": 4, "embedding": 32, "grpo": 2}
"""Examples per optimizer step and process for ``micro_batch_size: auto`` (packed rows for SFT). Classification: 16,
the ``Trainer`` + peft setting that issue 16's 12-way task measured against (micro-batch 4 took 1,254 steps where 314
would do, 993 s vs ≈630 s, and under-trained at the same epochs). SFT and preference: 4, unchanged: a packed SFT
row of ``max_length`` tokens holds several conversations, and the minimal chat recipe already matched TRL there.
Embedding: 32, because the batch is also the number of in-batch negatives of the ranking loss (sentence-transformers'
own examples use 32-128 pairs, and more where memory allows). GRPO: 2 prompts, each with
``objective.num_generations`` sampled completions (16 sequences at the default 8)."""

AUTO_LR = {"classification": 5e-4, "sft": 2e-4, "preference": 2e-4, "embedding": 2e-4, "grpo": 5e-5}
"""``lr: auto``. Classification 5e-4 (was 2e-4, which under-trained a new head and its adapters: issue 16's task
was still rising at the last epoch). Measured with ``AUTO_MIN_STEPS`` on the held-out tasks (test accuracy, lr 5e-4
vs 1e-3): man-section 0.62 vs 0.67, license-clause 0.60 vs 0.54, man-pair 0.81 vs 0.50 (1e-3 collapsed to one
class; so did 2e-3 and 4e-3 in three epochs). 1e-3 helps one task and ruins another, so it is not the default.
SFT 2e-4 (TRL's documented LoRA rate, QLoRA's for 7-13B models; ``SMALL_SFT_LR`` for small models); preference
2e-4. Embedding 2e-4: see the embedding quickstart's measurements in the README. GRPO 5e-5: ten times TRL's full
fine-tuning rate (1e-6), the factor TRL's LoRA guide gives for SFT; the quickstart's higher rate is measured there."""

SMALL_MODEL = 1_000_000_000
"""Below this many parameters an SFT run's ``lr: auto`` is ``SMALL_SFT_LR``: the QLoRA paper's 2e-4 is for 7-13B
models (1e-4 above), and on SmolLM2-135M it under-trains: test loss at 2e-4 / 4e-4 (TRL + peft at 2e-4): whatis
3.957 / 3.861 (3.967), man-options 3.568 / 3.545 (3.574)."""
SMALL_SFT_LR = 4e-4

PACKED_LR_MAX_BATCH = 2.0
"""``lr: auto`` on packed rows is scaled by √κ, κ = the examples an optimizer step's packed rows carry over the
``REFERENCE_BATCH`` examples an unpacked step would, clamped to [1, this] (lr × √2 at most). Why: a packed row of
``max_length`` holds several short examples, so a packed run takes fewer, larger steps at the rate that was chosen
for steps of ``REFERENCE_BATCH`` examples, and under-trains where steps are scarce; the square-root rule is Adam's
batch-size scaling (Malladi et al., 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"). Measured
with ``scripts/bench_defaults.py`` (SmolLM2-135M NF4, fp32, test loss, packed minus unpacked at 4e-4 in 180 steps of
4): whatis (240 examples pack 8 to a row, one row a step by ``AUTO_MIN_STEPS``: κ = 2, 93 steps) at the unscaled
4e-4: +0.022 (seed 42; session 7: +0.020 over three seeds); at 4e-4 × √2: −0.007 / +0.002 / −0.003 (seeds 42-44);
man-options (κ = 1.67, 108 steps): +0.002 unscaled, −0.000 / −0.006 scaled (seeds 42, 43). Rows of 256 tokens instead
(189 steps of ~4 examples, whatis seed 42) trained as well (3.881) but gave packing's speed back (98 vs 114 tokens/s
beside the 512-token run): the rate is scaled and the rows kept. See the README's "Packing on short, varied chat".
Not scaled below 1 (a step of fewer examples keeps the rate, as an unpacked batch lowered by ``AUTO_MIN_STEPS``
does), nor above 2, the largest κ measured: on large sets packed 4 rows a step κ is far larger (4 rows of 2,048
tokens of short chat: κ ≈ 14), steps are not scarce, and the peers train such batches at the unscaled 2e-4 (axolotl's
``examples/llama-2/qlora.yml``: 2 × 4 packed rows of 4,096 tokens a step), so there the factor stays √2 until a
larger model and data set measure more."""

HEAD_LR_FACTOR = {"multilabel": 50.0}
"""``head_lr: auto`` is ``lr`` × this factor for the training data's format, else × 1 (as ``Trainer`` + peft train the
head, at one rate). Multi-label heads: × 50. With one rate, a multi-label head learned only the label priors on two
tasks (MiniLM-L6, 800 training rows, 300 steps at lr 5e-4): one sigmoid per label on pooled features of norm ~1.4
(≈0.07 a dimension) moves too little at 5e-4 to leave the priors, as ``Trainer`` + peft at its own settings also
showed (test micro-F1 0.00 at 0.5, 0.22 with tuned thresholds). Test micro-F1 at head_lr = lr × 1 / 10 / 50 / 100:
``data/debian_tags`` 0.24 / 0.42 / 0.62 (seed 1: 0.60) / 0.59; a held-out task (Debian package descriptions → the
language and field tags, 10 labels, not shipped) seeds 0 and 1: 0.28 and 0.28 → 0.60 and 0.61 at × 50 (a TF-IDF
logistic regression: 0.57). Single-label heads keep × 1: on the held-out man-section task × 50 gave test accuracy
0.563 against 0.597."""
HEAD_LR_DEFAULT_FACTOR = 1.0

AUTO_WARMUP = {"classification": 0.06, "sft": 0.03, "preference": 0.03, "embedding": 0.1, "grpo": 0.0}
"""``warmup: auto``, a fraction of the steps. Classification 0.06 (RoBERTa's GLUE setting, the ``Trainer``
comparison's); SFT and preference 0.03 (QLoRA's); embedding 0.1 (sentence-transformers' LoRA example); GRPO none
(TRL's GRPOConfig)."""

AUTO_EPOCHS = {"classification": 3.0, "sft": 3.0, "preference": 1.0, "embedding": 1.0, "grpo": 1.0}
"""``epochs: auto`` for data sets up to ``AUTO_EPOCH_EXAMPLES / epochs`` examples. Classification and SFT: 3, as
transformers' ``Trainer`` and TRL default to; with validation data the best adapter is kept and early stopping ends
a run that stops improving, so a third pass costs time, not quality. Preference: 1 (the quickstart's DPO run reached
reward accuracy 0.81 in one). Embedding: 1, as sentence-transformers' LoRA example trains: the base of an
embedding run is usually an embedding model already, which the adapter adjusts (the quickstart: see the README)."""

AUTO_MIN_STEPS = {"classification": 300, "sft": 100}
"""The fewest optimizer steps a run of ``auto`` values gets: a new head and its adapters need a few hundred updates
whatever the data set's size, and so do adapters learning a new output format. Where the recipe leaves the batch
to lora_ft, a run gets them by smaller batches (fewer examples or packed rows a step, down to one) in the same
epochs, so its wall time stays that of ``AUTO_EPOCHS`` epochs; only where batches of one are still too few (or the
recipe gives the batch) does a classifier get more epochs (up to ``AUTO_MAX_EPOCHS``). Measured on the held-out
classification tasks (660, 223 and 600 training examples; three epochs in batches of 16 are 126, 42 and 114
steps, under-trained at any rate: man-section validation accuracy 0.53 / 0.59 / 0.62 / 0.43 at lr 5e-4 / 1e-3 /
2e-3 / 4e-3). Test accuracy at lr 5e-4: batches of 16, 3 epochs (the ``Trainer`` + peft) 0.49 / 0.25 / 0.77;
batches of 6 / 2 / 6, 3 epochs (this rule) 0.60 / 0.59 / 0.78 in about the ``Trainer``'s training-loop time;
batches of 16, 8 / 10 / 8 epochs (the rule before) 0.62 / 0.60 / 0.81 in 2.6-3x that time, where lr 1e-3 also
collapsed man-pair to one class (the batch rule at 1e-3: validation 0.74). SFT: 240 short answers pack into ~32 rows
of 512 tokens, 24 steps in batches of 4 rows where TRL's 8 unpacked examples take 90."""

AUTO_MAX_EPOCHS = 10.0
"""The most epochs ``AUTO_MIN_STEPS`` may ask for (a data set of a few dozen examples is not helped by more)."""

AUTO_EPOCH_EXAMPLES = 50_000
"""``epochs: auto`` caps the examples seen at this (never below one epoch): on a large data set the extra passes
cost hours and a single pass already sees enough (not measured here: no such data on these machines)."""

AUTO_EVALUATIONS = 4
"""``eval_every: auto`` with validation data: this many evaluations over the run (the last at its end), so the best
adapter is chosen among several (one per epoch gave one candidate in one-epoch runs). With a validation split of
10% of the training data, four evaluations cost about 4% of a three-epoch run (a forward pass is ~1/3 of a step)."""

AUTO_PATIENCE = 2
"""``early_stopping_patience: auto`` with validation data: stop after this many evaluations without improving."""


def objective_kind(recipe: Recipe) -> str:
    """``classification``, ``sft`` or ``preference``: what the rules are chosen by."""
    kind = recipe.objective.type
    if kind == "auto":
        # Every task with a new head on an encoder (tags, several labels, scores) trains like a classifier;
        # embeddings have their own rules; reward models train on preference data.
        kind = {"causal_lm": "sft", "embedding": "embedding", "reward": "reward"}.get(recipe.model.task,
                                                                                     "classification")
    # KTO and reward models train on preference data, at the preference objectives' batch, rate and epochs.
    return "preference" if kind in (*PREFERENCE_OBJECTIVES, "kto", "reward") else kind


def reference_batch(recipe: Recipe) -> int:
    """The per-process batch that ``micro_batch_size: auto`` keeps (``REFERENCE_BATCH``)."""
    return REFERENCE_BATCH[objective_kind(recipe)]


def auto_epochs(kind: str, train_examples: int, steps_per_epoch: int) -> float:
    """``AUTO_EPOCHS[kind]``; for a classifier, more where that gives fewer than ``AUTO_MIN_STEPS`` steps (at most
    ``AUTO_MAX_EPOCHS``); fewer where it would show the model more than ``AUTO_EPOCH_EXAMPLES`` examples (never
    below one)."""
    epochs = AUTO_EPOCHS[kind]
    floor = AUTO_MIN_STEPS.get(kind, 0) if kind == "classification" else 0
    if steps_per_epoch * epochs < floor:
        epochs = min(AUTO_MAX_EPOCHS, float(math.ceil(floor / max(steps_per_epoch, 1))))
    if train_examples * epochs > AUTO_EPOCH_EXAMPLES:
        epochs = max(1.0, round(AUTO_EPOCH_EXAMPLES / max(train_examples, 1), 2))
    return epochs


@dataclass(frozen=True)
class DataFacts:
    """What the rules need to know of the prepared training data and the launch."""

    examples: int
    """Examples in the training split."""
    units: int
    """What a micro-batch counts in an epoch: the examples, or the rows they pack into."""
    processes: int = 1
    """Processes training together (the global batch, hence the steps of an epoch)."""
    batch_auto: bool = False
    """The recipe left the batch to lora_ft (``micro_batch_size: auto`` without ``global_batch_size``)."""
    parameters: int = 0
    """The model's parameters (0: unknown)."""
    data_format: str = ""
    """The training split's format as detected (``multilabel``, ``classification``, ``messages``...; "": unknown)."""
    packed_rows: bool = False
    """Micro-batches are rows of examples packed up to ``max_length`` (``units`` counts the rows)."""

    def packed_lr_factor(self, kind: str, rows_per_step: int) -> tuple[float, float]:
        """(√κ, the examples a step carries) for ``rows_per_step`` packed rows per process (``PACKED_LR_MAX_BATCH``);
        (1, ``rows_per_step``) where batches are examples. Processes cancel: unpacked steps grow with them too."""
        if not self.packed_rows:
            return 1.0, float(rows_per_step)
        carried = rows_per_step * self.examples / max(self.units, 1)
        return math.sqrt(min(max(carried / REFERENCE_BATCH[kind], 1.0), PACKED_LR_MAX_BATCH)), carried


def resolve_training(recipe: Recipe, facts: DataFacts) -> tuple[Recipe, dict[str, str]]:
    """Resolve ``epochs``, ``lr``, ``head_lr``, ``warmup`` and ``early_stopping_patience`` when they are ``auto``, and
    lower an ``auto`` batch where the run would get fewer than ``AUTO_MIN_STEPS`` steps.

    Args:
        recipe: the recipe with its memory settings already resolved (``memory.launch``) for ``facts.processes``.
        facts: the training data's size and the launch.

    Returns:
        The recipe with those values set, and for each one set here the rule that chose it.
    """
    tc, kind = recipe.train, objective_kind(recipe)
    update, why = _epochs_and_batch(tc, kind, facts)
    if tc.lr == "auto":
        small = kind == "sft" and 0 < facts.parameters < SMALL_MODEL
        # rows a step per process, after the AUTO_MIN_STEPS floor (the batch arithmetic lives in TrainConfig)
        factor, carried = facts.packed_lr_factor(kind, tc.model_copy(update=update).global_batch(1))
        update["lr"] = (SMALL_SFT_LR if small else AUTO_LR[kind]) * factor
        why["lr"] = f"{kind}" + (f", a model under {SMALL_MODEL / 1e9:g}B parameters" if small else "") + (
            f", × {factor:.2f} for packed steps of {carried:.1f} examples (√ of {factor ** 2:.2f} × "
            f"{REFERENCE_BATCH[kind]})" if factor > 1 else "")
    if tc.head_lr == "auto":
        factor = HEAD_LR_FACTOR.get(facts.data_format, HEAD_LR_DEFAULT_FACTOR)
        update["head_lr"] = update.get("lr", tc.lr) * factor
        why["head_lr"] = f"lr × {factor:g}" + (f" ({facts.data_format} head)" if facts.data_format in HEAD_LR_FACTOR
                                               else "")
    if tc.warmup == "auto":
        update["warmup"], why["warmup"] = AUTO_WARMUP[kind], f"{kind}"
    if tc.early_stopping_patience == "auto":
        update["early_stopping_patience"] = AUTO_PATIENCE if recipe.validates else None
        why["early_stopping_patience"] = "validation data" if recipe.validates else "no validation data"
    resolved = recipe.model_copy(update={"train": tc.model_copy(update=update)})
    return resolved, {f"train.{k}": v for k, v in why.items()}


def _epochs_and_batch(tc: TrainConfig, kind: str, facts: DataFacts) -> tuple[dict[str, Any], dict[str, str]]:
    """An ``auto`` batch lowered to give ``AUTO_MIN_STEPS`` steps in ``AUTO_EPOCHS`` epochs (when the recipe leaves
    both to lora_ft), then ``epochs: auto`` (``auto_epochs``) at the batch that results."""
    update: dict[str, Any] = {}
    why: dict[str, str] = {}
    floor = AUTO_MIN_STEPS.get(kind, 0)
    planned = tc.global_batch(facts.processes)
    epochs_then = AUTO_EPOCHS[kind] if tc.epochs == "auto" else tc.epochs
    per_epoch = max(math.ceil(facts.units / planned), 1)  # the loader keeps the last
    if facts.batch_auto and tc.max_steps is None and per_epoch * epochs_then < floor:
        per_process = max(1, int(facts.units * epochs_then // (floor * facts.processes)))
        micro = min(tc.micro_batch_size, per_process)
        accum = max(1, per_process // micro)
        update.update(micro_batch_size=micro, grad_accum=accum, global_batch_size=micro * accum * facts.processes)
        why["micro_batch_size"] = why["grad_accum"] = why["global_batch_size"] = (
            f"{kind}: {floor}+ steps ({facts.units} {'packed rows' if facts.packed_rows else 'examples'}"
            f" an epoch, {epochs_then:g} epochs; planner's batch {planned})")
        per_epoch = max(math.ceil(facts.units / (micro * accum * facts.processes)), 1)
    if tc.epochs == "auto":
        update["epochs"] = epochs = auto_epochs(kind, facts.examples, per_epoch)
        why["epochs"] = f"{kind}: {AUTO_EPOCHS[kind]:g}" + (
            f", capped at {AUTO_EPOCH_EXAMPLES} examples seen ({facts.examples} training examples)"
            if epochs < AUTO_EPOCHS[kind] else
            f", raised to {AUTO_MIN_STEPS[kind]}+ steps ({per_epoch} an epoch, at most {AUTO_MAX_EPOCHS:g} epochs)"
            if epochs > AUTO_EPOCHS[kind] else "")
    return update, why


def resolve_cadence(recipe: Recipe, total_steps: int) -> tuple[Recipe, dict[str, str]]:
    """``eval_every: auto`` → ``AUTO_EVALUATIONS`` evaluations over ``total_steps`` with validation data, else None."""
    if recipe.train.eval_every != "auto":
        return recipe, {}
    every = max(1, math.ceil(total_steps / AUTO_EVALUATIONS)) if recipe.validates else None
    why = f"{AUTO_EVALUATIONS} evaluations over {total_steps} steps" if every else "no validation data"
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"eval_every": every})}), \
        {"train.eval_every": why}


# ---------------------------------------------------------------------------------------------------- the record
RECORDED = ("train.epochs", "train.max_steps", "train.micro_batch_size", "train.grad_accum", "train.global_batch_size",
            "train.lr", "train.head_lr", "train.schedule", "train.warmup", "train.eval_every",
            "train.early_stopping_patience", "train.gradient_checkpointing", "train.trim_cpu_memory")
"""The values whose source ``sources`` always reports (and any other ``train`` value that was ``auto``)."""


def _given_keys(recipe: Recipe) -> set[str]:
    """Dotted keys the recipe's author set (YAML or ``--set``), from pydantic's record of the fields given."""
    keys = set()
    for name in recipe.model_fields_set:
        section = getattr(recipe, name)
        if hasattr(section, "model_fields_set"):
            keys |= {f"{name}.{field}" for field in section.model_fields_set}
        else:
            keys.add(name)
    return keys


def sources(given: Recipe, resolved: Recipe, rules: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Dotted key → ``{"value", "source"}`` for ``RECORDED`` keys, every ``train`` key ``given`` left ``auto``, and
    the keys of other sections that ``rules`` resolved (``model.compute_dtype``).

    Args:
        given: the recipe as its author wrote it (before anything was resolved).
        resolved: the recipe the run trains with.
        rules: key → the rule that resolved it (``resolve_training``, ``resolve_cadence``); an ``auto`` value
            without one was resolved by the memory planner.
    """
    before, after, written = flatten(given.model_dump(mode="json")), flatten(resolved.model_dump(mode="json")), \
        _given_keys(given)
    out: dict[str, dict[str, Any]] = {}
    for key in sorted(after, key=lambda k: (k not in RECORDED, RECORDED.index(k) if k in RECORDED else 0, k)):
        if not key.startswith("train.") and key not in rules:  # other sections': recorded where a rule is given
            continue
        if before.get(key) == "auto" or key in rules:  # rules: also what a rule changed along (the batch's parts)
            rule = rules.get(key, "the memory planner for this device (lora-ft plan)")
            source = f"auto: {rule}"
        elif key in RECORDED:
            derived = key in ("train.grad_accum", "train.global_batch_size") and before.get(key) != after[key]
            source = "derived from the batch" if derived else ("recipe" if key in written else "default")
        else:
            continue
        out[key] = {"value": after[key], "source": source}
    return out


def sources_comment(record: dict[str, dict[str, Any]]) -> str:
    """``sources`` as a YAML comment block for the end of ``run_config.yaml``."""
    width = max((len(k) for k in record), default=0)
    lines = [f"#   {k:<{width}}  {v['value']!s:<10}  {v['source']}" for k, v in record.items()]
    return "\n".join(["# Where the training values came from (recipe, default, or an auto rule):", *lines]) + "\n"
