"""The ``train`` section: the optimisation loop's settings, and the batch arithmetic derived from them.

Values that default to ``auto`` are resolved when a run starts, by the rules in ``defaults.py`` (learning rates,
epochs, warmup, evaluation cadence, early stopping: by objective, data size and validation) and by the memory
planner (``memory/launch.py``: micro-batch, gradient checkpointing, heap trimming); ``run_config.yaml`` records each
resolved value and where it came from.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from ..errors import RecipeError
from .section import Section as _Section

EVAL_BATCH_FACTOR = 2
"""Evaluation batches are this many micro-batches: no activations are kept for a backward pass (the planner
checks that this fits too)."""

Auto = Literal["auto"]
_BOUNDS: dict[str, tuple[type, float, bool, bool]] = {
    # field: (type, bound, bound allowed, None allowed)
    "micro_batch_size": (int, 0, False, False), "epochs": (float, 0, False, False), "lr": (float, 0, False, False),
    "head_lr": (float, 0, False, True), "warmup": (float, 0, True, False), "eval_every": (int, 0, False, True),
    "early_stopping_patience": (int, 0, False, True),
}


class TrainConfig(_Section):
    """The optimisation loop. The fields that default to ``auto`` are resolved when a run starts (``defaults.py``
    says by which rule and why); give a value to override the rule."""

    epochs: float | Auto = "auto"
    """Passes over the training data. ``auto``: 3 (transformers' and TRL's default), fewer for large data sets
    (at most ``defaults.AUTO_EPOCH_EXAMPLES`` examples seen), 1 for preference objectives; a classifier whose
    batch is given, or whose data is too small even for batches of one, gets more (up to
    ``defaults.AUTO_MAX_EPOCHS``) until the run has ``defaults.AUTO_MIN_STEPS`` steps."""
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps; overrides ``epochs`` when set."""
    micro_batch_size: int | Auto = "auto"
    """Examples per forward pass. ``auto``: the largest that fits the device's memory by the planner
    (``lora-ft plan``) at ``data.max_length``, with ``grad_accum`` derived to keep the global batch:
    ``global_batch_size`` if set, else the objective's batch (``defaults.reference_batch``: 16 examples for
    classification, 4 for the others, packed rows for SFT) × ``grad_accum`` × processes, lowered (down to one)
    where the run would get fewer than ``defaults.AUTO_MIN_STEPS`` steps in its epochs."""
    max_tokens_per_batch: int | None = Field(None, gt=0)
    """A token cap on every micro-batch besides ``micro_batch_size``: unpacked, a batch holds at most this many
    tokens once padded to its longest example (long examples come fewer to a batch, short ones up to
    ``micro_batch_size``); packed, at most this many tokens of rows (at least one row). Evaluation batches get
    ``EVAL_BATCH_FACTOR`` times the cap. With it, set ``micro_batch_size`` high and the cap bounds memory."""
    grad_accum: int = Field(1, gt=0)
    global_batch_size: int | None = Field(None, gt=0)
    """Examples per optimizer step over all processes. When set, ``grad_accum`` is derived (and a given one
    replaced): global / (micro_batch_size × processes), so one recipe trains the same on 1 GPU or 8."""
    lr: float | Auto = "auto"
    """Peak learning rate of the adapters. ``auto``: by objective (``defaults.AUTO_LR``)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup. Cosine (QLoRA's, TRL's LoRA examples'); linear is transformers' default. Not an ``auto``
    rule: the held-out classification runs against the linear ``Trainer`` differed by the other settings, not this."""
    warmup: float | Auto = "auto"
    """A fraction of all steps when < 1, else a number of steps. ``auto``: by objective (``defaults.AUTO_WARMUP``)."""
    lr_layer_decay: float | None = Field(None, gt=0, le=1)
    """Layer-wise learning rates: layer l of L (1 = lowest) trains at ``lr · decay^(L−l)``."""
    head_lr: float | Auto | None = "auto"
    """Learning rate of a new task head (None: ``lr``). ``auto``: ``lr`` × ``defaults.HEAD_LR_FACTOR`` (× 50 for a
    multi-label head, else × 1)."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "adafactor",
                       "sgd"] = "adamw"
    """torch's AdamW (fused where the device allows), bitsandbytes' 8-bit AdamW (moments in 8 bits: a quarter of
    AdamW's state), its paged variants (state in CUDA unified memory, moved to the host under memory pressure; on
    a CPU the same as unpaged), 8-bit Lion (one moment; use a 3-10× smaller ``lr``), transformers' Adafactor
    (factored second moment, as the ``Trainer``'s ``adafactor``), or SGD with momentum 0.9. The planner counts
    each one's state (``memory.optimizer_state``)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW's decoupled decay: 0, as transformers' and TRL's defaults (LoRA factors start at or near zero)."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient clipping (None: off): 1.0, transformers' default."""
    eval_every: int | Auto | None = "auto"
    """Evaluate every N optimizer steps (and always at the end); None: at the end of each epoch. ``auto``: with
    validation data, ``defaults.AUTO_EVALUATIONS`` evaluations spread over the run; without, None."""
    early_stopping_patience: int | Auto | None = "auto"
    """Stop after this many evaluations without a better validation score (the objective's: accuracy for
    classifiers, loss otherwise); None: never. ``auto``: ``defaults.AUTO_PATIENCE`` with validation data, else None."""
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    """``auto``: on only when memory needs it, decided by the planner (``lora-ft plan``) against the device's memory
    when training starts: when the step does not fit without it, or (``micro_batch_size: auto``) when it lets a
    larger micro-batch fit. Recomputing every layer costs about a third more compute."""
    trim_cpu_memory: bool | Literal["auto"] = "auto"
    """On the CPU, return freed activation memory to the OS every few blocks (``cpu_memory.py``); ``auto``: only
    where a step saves ``memory.launch.TRIM_MIN_ACTIVATIONS`` (the measurements are there). No effect on GPUs."""
    seed: int = 42
    log_every: int = Field(1, gt=0)
    checkpoint_every: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    trackers: list[Literal["tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive",
                           "swanlab"]] = []
    """Experiment trackers (Accelerate's), each used when its package is installed (a warning names the missing
    ones): per-step loss, evaluation and forgetting metrics, predicted vs measured peak memory, the recipe."""

    @field_validator(*_BOUNDS, mode="before")
    @classmethod
    def _number_or_auto(cls, v: Any, info: ValidationInfo) -> Any:
        # One readable error instead of pydantic's one per branch of the union; lax like plain number fields.
        kind, bound, inclusive, nullable = _BOUNDS[info.field_name]
        if v == "auto" or (v is None and nullable):
            return v
        if isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                pass
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("Input should be a finite number")
        if isinstance(v, int | float) and not isinstance(v, bool) and (v >= bound if inclusive else v > bound):
            if kind is float:
                return float(v)
            if float(v).is_integer():
                return int(v)
        what = "a positive integer" if kind is int else ("a number ≥ 0" if inclusive else "a positive number")
        raise ValueError(f"Input should be {what}{', None' if nullable else ''} or 'auto' (got {v!r})")

    # ------------------------------------------------------------------ batch arithmetic: the only place it lives
    def _micro(self) -> int:
        if self.micro_batch_size == "auto":  # a bug, not a user error: launch.resolve_for_launch runs first
            raise RuntimeError("train.micro_batch_size auto must be resolved before the batch sizes are derived")
        return self.micro_batch_size

    def _resolved(self, name: str) -> Any:
        value = getattr(self, name)
        if value == "auto":  # a bug, not a user error: defaults.resolve_training runs before the loop is built
            raise RuntimeError(f"train.{name} auto must be resolved before training")
        return value

    def rows_per_packed_batch(self, row_tokens: int) -> int:
        """Rows of ``row_tokens`` in a packed micro-batch: ``micro_batch_size``, fewer under the token cap."""
        if self.max_tokens_per_batch is None:
            return self._micro()
        return max(1, min(self._micro(), self.max_tokens_per_batch // row_tokens))

    @property
    def eval_max_tokens(self) -> int | None:
        return EVAL_BATCH_FACTOR * self.max_tokens_per_batch if self.max_tokens_per_batch else None

    @property
    def eval_batch_size(self) -> int:
        """Examples per evaluation forward pass (``EVAL_BATCH_FACTOR`` micro-batches)."""
        return EVAL_BATCH_FACTOR * self._micro()

    def global_batch(self, processes: int) -> int:
        """Examples per optimizer step over all processes."""
        return self._micro() * self.grad_accum * processes

    def for_processes(self, processes: int) -> TrainConfig:
        """This config as a launch on ``processes`` processes runs it: with ``global_batch_size`` set, ``grad_accum``
        is derived so that one recipe trains the same on 1 GPU or 8."""
        if self.global_batch_size is None:
            return self
        per_pass = self._micro() * processes
        if self.global_batch_size % per_pass:
            raise RecipeError(f"train.global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                              f"{self._micro()} × {processes} process(es) = {per_pass}; choose a multiple of "
                              f"{per_pass} or change micro_batch_size")
        return self.model_copy(update={"grad_accum": self.global_batch_size // per_pass})

    def per_process_batch(self, processes: int, reference: int) -> int:
        """Examples each process contributes to one optimizer step, as ``micro_batch_size: auto`` keeps it:
        ``global_batch_size`` when given, else ``reference`` (the objective's batch, ``defaults.reference_batch``)
        × ``grad_accum`` × processes."""
        global_batch = self.global_batch_size or reference * self.grad_accum * processes
        if global_batch % processes:
            raise RecipeError(f"train.global_batch_size {global_batch} is not a multiple of the {processes} processes")
        return global_batch // processes

    def total_steps(self, micro_batches_per_epoch: int) -> int:
        """Optimizer steps of the run: ``max_steps``, else ``epochs`` × steps per epoch (at least one)."""
        per_epoch = max(micro_batches_per_epoch // self.grad_accum, 1)
        return self.max_steps or max(math.ceil(self._resolved("epochs") * per_epoch), 1)

    def warmup_steps(self, total_steps: int) -> int:
        """``warmup`` below 1 is a fraction of ``total_steps``, otherwise a number of steps."""
        warmup = self._resolved("warmup")
        return int(warmup * total_steps) if warmup < 1 else int(warmup)
