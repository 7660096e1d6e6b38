"""Regression: one score per example (or text pair), one output, mean squared error.

Data: a numeric label column, with ``model.task: regression``, or detected under ``model.task:
sequence_classification`` (``data.format: auto``) where every label is a number and some have a fraction (integers
alone stay classes); ``data.format: regression`` insists. Scores are learned as given (not standardised), as the
``Trainer``'s ``problem_type="regression"`` head learns them.

Metrics: ``loss`` (MSE), ``rmse``, ``pearson`` and ``spearman`` (scipy), computed over the whole split. The best
adapter is the one of highest validation Spearman correlation (the rank agreement similarity benchmarks report);
loss breaks ties. The merged model's ``config.json`` says ``problem_type: regression``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import datasets
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr

from .base import Batch
from .classification import SequenceClassification
from .padding import bernoulli_logits, model_inputs, pad_inputs


def regression_metrics(predictions: list[float], labels: list[float]) -> dict[str, float]:
    """``rmse``, ``pearson`` and ``spearman`` (scipy); a correlation that is undefined (constant predictions or
    labels, as an untrained head can give) counts as 0 so that it can still be compared."""
    rmse = math.sqrt(sum((p - t) ** 2 for p, t in zip(predictions, labels, strict=True)) / max(len(labels), 1))
    out = {"rmse": rmse}
    for name, fn in (("pearson", pearsonr), ("spearman", spearmanr)):
        value = float(fn(predictions, labels)[0]) if len(set(predictions)) > 1 and len(set(labels)) > 1 else 0.0
        out[name] = value if math.isfinite(value) else 0.0
    return out


class Regression(SequenceClassification):
    """One number per example from ``data.label_column``."""

    model_task = "regression"
    formats = ("regression",)
    compared = "scores (each as the two-way logits [0, score])"
    selected_by: ClassVar[tuple[str, ...]] = ("spearman", "loss")

    def detect_format(self, columns: list[str], split: str) -> str:
        cfg = self.cfg
        self.need_columns(columns, split, cfg.text_column, cfg.text_pair_column, cfg.label_column)
        return "regression"

    def columns(self, fmt: str) -> dict[str, str]:
        return {**super().columns(fmt), self.cfg.label_column: "number"}

    def cannot_pack(self, model: torch.nn.Module) -> str | None:
        return "regression batches are padded, one example per row"

    def fit_labels(self, raw: dict[str, datasets.Dataset], id2label: dict[int, str] | None) -> dict[int, str]:
        """One output, named by the label column (the merged model's ``id2label``)."""
        id2label = id2label or {0: self.cfg.label_column}
        self.label2id = {n: i for i, n in id2label.items()}
        return id2label

    def encode(self, row: dict[str, Any], fmt: str) -> dict[str, Any]:
        enc = super().encode({**row, self.cfg.label_column: next(iter(self.label2id))}, fmt)
        return {**enc, "labels": float(row[self.cfg.label_column])}

    def collate(self, rows: list[dict[str, Any]], augment: Callable[[dict], dict] | None = None) -> Batch:
        if augment:
            rows = [augment(r) for r in rows]
        return {**pad_inputs(self.tokenizer, rows),
                "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.float)}

    def describe(self, row: dict[str, Any], fmt: str) -> str:
        return f"{self.example_text(row, fmt)}  ->  score {row[self.cfg.label_column]!r}"

    def items(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["labels"].shape[0], dtype=torch.long, device=batch["labels"].device)

    def _scores(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return model(**model_inputs(batch)).logits.float().squeeze(-1)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return F.mse_loss(self._scores(model, batch), batch["labels"], reduction="sum")

    def eval_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        scores = self._scores(model, batch)
        return {"loss": F.mse_loss(scores, batch["labels"], reduction="none"), "prediction": scores,
                "label": batch["labels"]}

    def summarize(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean squared error as ``loss``, the example count, and ``regression_metrics``."""
        preds, labels = values["prediction"].double().tolist(), values["label"].double().tolist()
        return {"loss": values["loss"].double().mean().item(), "examples": len(labels),
                **regression_metrics(preds, labels)}

    def selection_noise(self, metrics: dict[str, float]) -> list[float]:
        return [1e-6] * len(self.selected_by)

    def configure(self, config: Any) -> None:
        config.problem_type = "regression"

    @torch.no_grad()
    def label_logits(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The scores as two-way logits (``bernoulli_logits``): the report's ``max_abs_logit_diff`` is then the
        largest score difference itself. The targets are 0 (a score has no class to compare)."""
        scores = self._scores(model, batch)
        return bernoulli_logits(scores), torch.zeros(scores.numel(), dtype=torch.long, device=scores.device)
