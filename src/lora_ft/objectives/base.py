"""The contract between a kind of training signal and the engine that trains it.

An ``Objective`` says how its examples are read and tokenized, how a list of them becomes a batch, how the loss
and the evaluation metrics are computed, and which model (head) it trains. The data preparation
(``data/prepare.py``), the trainer, the evaluation loop and the merge's fidelity check call these methods and
never branch on the task, so a new task type is one new file in this package plus a line in its registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from ..data.cells import Where, check_columns
from ..errors import RecipeError, closest
from ..recipe import AugmentConfig, DataConfig
from ..scoring.generation import GenerationExample

Batch = dict[str, Any]



class Objective(ABC):
    """One training signal (next-token SFT, sequence classification, …) for one tokenizer and data config.

    Args:
        cfg: the recipe's ``data`` section (formats, column names, ``max_length``).
        tokenizer: the model's tokenizer, with its pad token set.
    """

    model_task: ClassVar[str]
    """The ``model.task`` this objective trains: which auto class (and head) the model is loaded with."""
    length_window: ClassVar[int]
    """Batches per length-sorted window under ``data.group_by_length: auto`` (0: shuffle only)."""
    formats: ClassVar[tuple[str, ...]]
    """The ``data.format`` values this objective reads."""
    compared: ClassVar[str]
    """What ``label_logits`` returns, in words (the merge report's ``compared``)."""
    fidelity_measure: ClassVar[str] = "kl_mean"
    """The merge report's figure that must stay under the merge's limit (``compare_outputs``; None there: KL)."""
    sequences_per_example: ClassVar[int] = 1
    """Sequences one example puts through the model (preference pairs: 2); the planner counts with it."""
    packs_examples: ClassVar[bool] = False
    """Packing keeps each micro-batch's ``micro_batch_size`` examples and only lays them end to end (an encoder's
    examples, ``collate_packed`` given the same sampler as padded batches), instead of filling rows of
    ``max_length`` tokens with as many examples as fit (a causal LM's rows, ``PackedBatches``)."""
    selected_by: ClassVar[tuple[str, ...]] = ("loss",)
    """The validation metrics the best adapter (and early stopping) is chosen by, in order; loss is minimised, every
    other metric maximised (``selection_key``)."""

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase):
        self.cfg, self.tokenizer = cfg, tokenizer

    # ------------------------------------------------------------------------------------------- data
    @abstractmethod
    def detect_format(self, columns: list[str], split: str) -> str:
        """The data format of a split with these columns (``data.format``, or guessed under ``auto``)."""

    def need_columns(self, columns: list[str], split: str, *wanted: str | None) -> None:
        """Raise the one-line error for a split that lacks a column the format needs."""
        missing = [c for c in wanted if c and c not in columns]
        if missing:
            raise RecipeError(f"data.{split}: column(s) {missing} not found; columns present: {columns} "
                              f"({self._rename_hint(missing, columns)})")

    def _rename_hint(self, missing: list[str], columns: list[str]) -> str:
        """The ``data.*_column`` setting that names each missing column, with a present column it may mean."""
        fields = {v: f for f, v in self.cfg.model_dump().items() if f.endswith("_column") and isinstance(v, str)}
        fixes = []
        for column in missing:
            if column in fields:
                close = closest(column, columns)
                fixes.append(f"data.{fields[column]}: {close}" if close
                             else f"data.{fields[column]} to the column that holds them")
        return f"set {', '.join(fixes)}" if fixes else "set data.*_column to rename"

    def columns(self, fmt: str) -> dict[str, str]:
        """The columns an example of format ``fmt`` is read from → the kind of cell each must hold (``text``,
        ``optional_text``, ``label``, ``conversation``: see ``data.cells``)."""
        return {}

    def check_rows(self, ds: datasets.Dataset, fmt: str, where: Where) -> None:
        """Every cell this objective will read, checked before tokenizing: one ``DataError`` naming the file, row and
        column of the first bad one."""
        check_columns(ds, self.columns(fmt), where)

    def fit_labels(self, raw: dict[str, datasets.Dataset], id2label: dict[int, str] | None) -> dict[int, str] | None:
        """Learn (or take) the label set from the splits, check every split against it; None when the objective
        has no labels."""
        return None

    def data_identity(self) -> dict[str, Any]:
        """What decides how this objective tokenizes an example besides the data config, the format and the
        tokenizer (part of the data cache's key, ``data.cache``): nothing here."""
        return {}

    @abstractmethod
    def encode(self, row: dict[str, Any], fmt: str) -> dict[str, Any]:
        """One example tokenized: its model inputs and labels, plus ``truncated`` (it was longer than
        ``max_length``) and ``usable`` (it still carries a training signal after truncation)."""

    def encode_batch(self, rows: list[dict[str, Any]], fmt: str) -> list[dict[str, Any]]:
        """``encode`` of each row (an objective may tokenize the batch at once: the same values, faster)."""
        return [self.encode(row, fmt) for row in rows]

    @abstractmethod
    def collate(self, rows: list[dict[str, Any]], augment: Callable[[dict], dict] | None = None) -> Batch:
        """Pad tokenized examples into one batch; ``augment`` (training only) transforms each example first."""

    @abstractmethod
    def length(self, row: dict[str, Any], fmt: str) -> int:
        """Tokens of one example before truncation (``lora-ft inspect``)."""

    @abstractmethod
    def example_text(self, row: dict[str, Any], fmt: str) -> str:
        """The text that identifies an example, for ``lora-ft inspect``'s duplicate and leakage checks."""

    @abstractmethod
    def describe(self, row: dict[str, Any], fmt: str) -> str:
        """One example as ``lora-ft inspect`` shows it, with what carries the training signal."""

    def generation_example(self, row: dict[str, Any], fmt: str) -> GenerationExample | None:
        """The example as a prompt and its reference answer, for the generation evaluation; None where the
        objective does not generate (classifiers, plain text)."""
        return None

    def label_column(self) -> str | None:
        """The column whose value counts ``lora-ft inspect`` reports (class balance); None for none."""
        return None

    def prepare(self, model: torch.nn.Module, accelerator, splits: dict[str, datasets.Dataset], batch_size: int,
                cache: Path | None = None) -> dict[str, datasets.Dataset]:
        """Once after the model is built and before any batch is drawn, while the model is still the one training
        starts from: what the objective computes from that model for whole splits (a preference objective's
        reference log-probs), as columns. ``cache``: a file in the run folder where it may keep them for a resumed
        run. Returns the splits."""
        return splits

    # ------------------------------------------------------------------------------------ augmentation
    def token_augmenter(self, cfg: AugmentConfig, seed: int) -> Callable[[dict], dict] | None:
        """The example transform ``data.augment`` asks for, if this objective supports token augmentation."""
        return None

    def neftune_alpha(self, cfg: AugmentConfig) -> float | None:
        """NEFTune's noise scale, if this objective trains with it."""
        return None

    # ----------------------------------------------------------------------------------------- packing
    def cannot_pack(self, model: torch.nn.Module) -> str | None:
        """Why ``model``'s batches cannot be packed exactly under this objective (None: they can)."""
        return "packing lays examples of a causal LM end to end; this objective trains on one example per row"

    def collate_packed(self, rows: list[dict[str, Any]], capacity: int) -> Batch:
        """Pack tokenized examples into rows of at most ``capacity`` tokens (``cannot_pack`` said it is exact)."""
        raise NotImplementedError

    def use_packing(self, requested: str | bool, model: torch.nn.Module) -> bool:
        """``data.packing`` resolved for this model: ``auto`` packs wherever it is exact; ``true`` insists."""
        if requested is False:
            return False
        why = self.cannot_pack(model)
        if why is not None and requested is True:
            raise RecipeError(f"data.packing true: {why}; set data.packing: auto (packs where it is exact) or false")
        return why is None

    # ------------------------------------------------------------------------------------ optimisation
    def rollout(self, model: torch.nn.Module, batch: Batch, step: int) -> Batch:
        """A training micro-batch as the loss takes it, called by the trainer before the step's ``items`` are
        counted: what an online objective generates from the current model first (GRPO's sampled completions and
        their rewards); ``step``: the optimizer steps done, for reproducible sampling. Others return ``batch``."""
        return batch

    def tokens(self, batch: Batch) -> torch.Tensor:
        """Real (non-padding) tokens of a batch, for the throughput log."""
        return batch["attention_mask"].sum()

    def head_positions(self, batch: Batch) -> torch.Tensor:
        """Positions the frozen output head computes logits for (the MFU count); none for a task head."""
        return torch.zeros((), dtype=torch.long)

    @abstractmethod
    def items(self, batch: Batch) -> torch.Tensor:
        """What the batch's summed loss is divided by (label tokens, examples); counted before the forward so the
        whole global batch's count is known when the first micro-batch backpropagates."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The batch's summed loss (divided by the global ``items`` by the trainer)."""

    # -------------------------------------------------------------------------------------- evaluation
    @abstractmethod
    def eval_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-example values of one batch (gathered across processes by the evaluation loop)."""

    @abstractmethod
    def summarize(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """The metrics of a whole split from its gathered per-example values (``loss`` always)."""

    def select_by(self, metric: str | None) -> None:
        """``eval.select_by``: the best adapter and early stopping go by this validation metric instead (loss
        breaks ties); None keeps the objective's own rule."""
        if metric is not None and metric != self.selected_by[0]:
            self.selected_by = ("loss",) if metric == "loss" else (metric, "loss")

    def selection_key(self, metrics: dict[str, float]) -> list[float]:
        """``selected_by`` of validation ``metrics`` as a key to minimise (a later item breaks a tie)."""
        return [metrics[m] if m == "loss" else -metrics[m] for m in self.selected_by]

    def selection_noise(self, metrics: dict[str, float]) -> list[float]:
        """For each item of ``selection_key``, the difference that counts as a tie (float noise here)."""
        return [1e-6] * len(self.selected_by)

    def describe_best(self, best) -> str:
        """The best adapter's score in words, for the log (``best``: a ``training.guards.BestAdapter``)."""
        key = best.score or [best.loss]
        return ", ".join(f"{m} {v if m == 'loss' else -v:.4f}" for m, v in zip(self.selected_by, key, strict=False))

    def compare_outputs(self, ref: list[tuple[torch.Tensor, torch.Tensor]],
                        new: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float] | None:
        """The merge's own comparison of ``label_logits`` before and after, with ``fidelity_measure`` among its
        figures; None: the merge compares them as distributions (KL divergence)."""
        return None

    def write_model_files(self, model: torch.nn.Module, folder: Path) -> None:
        """Files a merged model folder needs beside transformers' own so that its users' library rebuilds what was
        trained (an embedding model's sentence-transformers pipeline); nothing by default."""
        return None

    def begin_split(self, name: str) -> None:
        """Called by the evaluation before each split's batches are summarized: an objective that calibrates on
        validation (multi-label thresholds) learns there and applies what it learned to every other split."""
        return None

    def learned(self) -> dict[str, Any]:
        """What the objective learned from validation beyond the adapter (multi-label thresholds): kept in
        ``run_info.json`` under ``objective`` and given back to ``restore`` by every command that loads the run."""
        return {}

    def restore(self, learned: dict[str, Any]) -> None:
        """Take back what ``learned`` returned when the run trained."""
        return None

    def configure(self, config: Any) -> None:
        """Write into a model's config what a model saved alone needs to predict as this objective does (its
        ``problem_type``, thresholds): the merged folder's ``config.json``."""
        return None

    @abstractmethod
    def label_logits(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) of every position that carries a label: what a merged model must reproduce."""
