"""Multi-label classification: several labels per example, one sigmoid per label, binary cross-entropy.

Data: ``model.task: sequence_classification`` with a ``label`` column holding a list of labels per example (``[]``:
none applies), or that list as JSON text in a CSV cell; detected under ``data.format: auto``, required with
``data.format: multilabel``. The label set is read from the training split (sorted as single-label classes are).

Decisions: each label has its own threshold, chosen on the validation split at every evaluation (the one that
maximises that label's F1 there; 0.5 where the validation split has no positive of the label, and for a run
without validation data). The test split, ``lora-ft eval`` and ``lora-ft predict`` apply the thresholds the best
adapter's validation chose: they are kept in ``run_info.json`` (``objective.thresholds``) and written into a
merged model's ``config.json`` (``label_thresholds``, with ``problem_type: multi_label_classification``).
Metrics (scikit-learn): ``micro_f1``, ``macro_f1`` (over the labels that occur or are predicted), and
``subset_accuracy`` (every label of the example right), plus ``micro_f1_at_half`` (all thresholds 0.5) so that what
the thresholds add is visible.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score

from ..data.cells import as_list
from ..errors import RecipeError
from .base import Batch
from .classification import SequenceClassification, _number
from .padding import bernoulli_logits, model_inputs, pad_inputs

log = logging.getLogger(__name__)

GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
"""Candidate thresholds, 0.05 to 0.95: finer steps chase the noise of a small validation split."""


def sorted_names(values: list[Any]) -> list[str]:
    """Label names sorted as single-label classes are: numerically when all are numbers, else alphabetically."""
    names = {str(v): v for v in values}
    numbers = {n: _number(v) for n, v in names.items()}
    if all(x is not None for x in numbers.values()):
        return sorted(names, key=lambda n: (numbers[n], n))
    return sorted(names)


def best_thresholds(probs: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per label (column), the threshold of ``GRID`` that maximises its F1 on these examples; ties go to the one
    nearest 0.5, and a label without positives here keeps 0.5 (its F1 is 0 or undefined at every threshold)."""
    out = np.full(probs.shape[1], 0.5)
    for j in range(probs.shape[1]):
        if not truth[:, j].any():
            continue
        scores = [(f1_score(truth[:, j], probs[:, j] >= t, zero_division=0), -abs(t - 0.5), t) for t in GRID]
        out[j] = max(scores)[2]
    return out


def multilabel_metrics(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """``micro_f1``, ``macro_f1`` (over the labels that occur in ``truth`` or ``predicted``, as the single-label
    macro F1) and ``subset_accuracy`` of 0/1 matrices (examples × labels), from scikit-learn."""
    present = [j for j in range(truth.shape[1]) if truth[:, j].any() or predicted[:, j].any()]
    macro = f1_score(truth, predicted, average="macro", labels=present, zero_division=0) if present else 0.0
    return {"micro_f1": float(f1_score(truth, predicted, average="micro", zero_division=0)),
            "macro_f1": float(macro), "subset_accuracy": float(accuracy_score(truth, predicted))}


class MultiLabel(SequenceClassification):
    """Several labels per example from ``data.label_column`` (a list); text pairs as single-label classification."""

    formats = ("multilabel",)
    compared = "per-label probabilities (each label a Bernoulli distribution)"
    selected_by: ClassVar[tuple[str, ...]] = ("micro_f1", "loss")
    """The best adapter has the highest validation micro-F1 (at its own thresholds) beyond sampling noise, then the
    lowest loss: as single-label classification, by its headline metric."""

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.thresholds: dict[str, float] = {}
        self._split = ""

    def detect_format(self, columns: list[str], split: str) -> str:
        cfg = self.cfg
        self.need_columns(columns, split, cfg.text_column, cfg.text_pair_column, cfg.label_column)
        return "multilabel"

    def columns(self, fmt: str) -> dict[str, str]:
        return {**super().columns(fmt), self.cfg.label_column: "labels"}

    def cannot_pack(self, model: torch.nn.Module) -> str | None:
        return "multi-label batches are padded, one example per row"

    def fit_labels(self, raw: dict[str, datasets.Dataset], id2label: dict[int, str] | None) -> dict[int, str]:
        column = self.cfg.label_column
        if id2label is None:
            name, source = ("train", raw["train"]) if "train" in raw else next(iter(raw.items()))
            names = sorted_names([x for v in source[column] for x in as_list(v) or []])
            if len(names) < 2:
                raise RecipeError(f"data.{name}: column '{column}' names {len(names)} label(s) {names}: multi-label "
                                  "classification needs at least 2 (for one label, train a yes/no classifier)")
            id2label = dict(enumerate(names))
        self.label2id = {n: i for i, n in id2label.items()}
        for name, ds in raw.items():
            unseen = sorted({str(x) for v in ds[column] for x in as_list(v) or []} - set(self.label2id))
            if unseen:
                raise RecipeError(f"data.{name}: label(s) {unseen[:10]} never occur in the training data "
                                  f"(known: {sorted(self.label2id)[:20]})")
        self.thresholds = self.thresholds or {n: 0.5 for n in self.label2id}
        return id2label

    def encode(self, row: dict[str, Any], fmt: str) -> dict[str, Any]:
        enc = super().encode({**row, self.cfg.label_column: next(iter(self.label2id))}, fmt)
        hot = [0.0] * len(self.label2id)
        for name in as_list(row[self.cfg.label_column]) or []:
            hot[self.label2id[str(name)]] = 1.0
        return {**enc, "labels": hot}

    def collate(self, rows: list[dict[str, Any]], augment: Callable[[dict], dict] | None = None) -> Batch:
        if augment:
            rows = [augment(r) for r in rows]
        return {**pad_inputs(self.tokenizer, rows),
                "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.float)}

    def items(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["labels"].shape[0], dtype=torch.long, device=batch["labels"].device)

    def describe(self, row: dict[str, Any], fmt: str) -> str:
        return f"{self.example_text(row, fmt)}  ->  labels {as_list(row[self.cfg.label_column])!r}"

    def _logits(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return model(**model_inputs(batch)).logits.float()

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Binary cross-entropy averaged over the labels of an example, summed over examples: per example it is
        what ``BCEWithLogitsLoss`` (the ``Trainer``'s multi-label loss) averages."""
        bce = F.binary_cross_entropy_with_logits(self._logits(model, batch), batch["labels"], reduction="sum")
        return bce / batch["labels"].shape[1]

    def eval_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits = self._logits(model, batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch["labels"], reduction="none").mean(-1)
        return {"loss": loss, "probability": logits.sigmoid(), "label": batch["labels"]}

    def begin_split(self, name: str) -> None:
        self._split = name

    def summarize(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean loss and the metrics at the thresholds; on the validation split the thresholds are chosen first
        (``best_thresholds``), so its F1 is the tuned one, and every other split gets them as they are."""
        probs, truth = values["probability"].double().numpy(), values["label"].numpy().astype(int)
        names = [n for n, _ in sorted(self.label2id.items(), key=lambda kv: kv[1])]
        if self._split == "validation":
            self.thresholds = dict(zip(names, best_thresholds(probs, truth).tolist(), strict=True))
        cut = np.array([self.thresholds.get(n, 0.5) for n in names])
        return {"loss": values["loss"].double().mean().item(), "examples": len(truth),
                **multilabel_metrics((probs >= cut).astype(int), truth),
                "micro_f1_at_half": multilabel_metrics((probs >= 0.5).astype(int), truth)["micro_f1"]}

    def selection_noise(self, metrics: dict[str, float]) -> list[float]:
        return [1e-6 if m == "loss" else 0.5 / max(metrics["examples"], 1) ** 0.5 for m in self.selected_by]

    def learned(self) -> dict[str, Any]:
        return {"thresholds": dict(self.thresholds)}

    def restore(self, learned: dict[str, Any]) -> None:
        if learned.get("thresholds"):
            self.thresholds = {str(k): float(v) for k, v in learned["thresholds"].items()}

    def configure(self, config: Any) -> None:
        config.problem_type = "multi_label_classification"
        config.label_thresholds = dict(self.thresholds)

    @torch.no_grad()
    def label_logits(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return bernoulli_logits(self._logits(model, batch)), batch["labels"].reshape(-1).long()
