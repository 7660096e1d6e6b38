"""Sequence classification: a new classifier head on an encoder (or decoder), cross-entropy per example.

The label set is read from the training split (sorted, numerically when the labels are numbers) and saved with
the run as ``id2label``; a validation or test label never seen in training is an error. Batches are padded on
the right, or, for training under ``data.packing: auto`` where the architecture is proven exact, unpadded: the
micro-batch's examples laid end to end in rows (``encoder_packing``). Accuracy, F1, precision and recall come
from ``scoring.classification_metrics`` (scikit-learn, as ``evaluate``'s modules of those names, which fetch
their scripts from the Hub and so fail offline).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from ..data.augment import Augmenter
from ..errors import RecipeError
from ..recipe import AugmentConfig, DataConfig
from ..scoring import classification_metrics
from .base import Batch, Objective
from .chunked_loss import innermost
from .encoder_packing import cannot_pack_encoder, pack_examples, packed_logits, pair_cost


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


def label_names(ds: datasets.Dataset, column: str) -> list[str]:
    """Sorted label names: numerically when every label is a number or a number's text (CSV cells are text), so
    2 < 10; else alphabetically."""
    names = {str(v): v for v in ds[column]}
    numbers = {n: _number(v) for n, v in names.items()}
    if all(x is not None for x in numbers.values()):
        return sorted(names, key=lambda n: (numbers[n], n))
    return sorted(names)


def pad_right(rows: list[dict[str, Any]], pad_id: int) -> Batch:
    """Right-padded ``input_ids`` (and ``token_type_ids``), the attention mask, one label per example."""
    width = max(len(r["input_ids"]) for r in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    types = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k], mask[i, :k] = torch.tensor(r["input_ids"]), 1
        if "token_type_ids" in r:
            types[i, :k] = torch.tensor(r["token_type_ids"])
    batch = {"input_ids": ids, "attention_mask": mask,
             "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long)}
    if "token_type_ids" in rows[0]:
        batch["token_type_ids"] = types
    return batch


def classification_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """One row of float logits per example, of a padded or a packed (``pack_examples``) batch."""
    if "segments" in batch:
        return packed_logits(model, batch)
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


class SequenceClassification(Objective):
    """One label per example (or text pair) from ``data.label_column``."""

    model_task = "sequence_classification"
    length_window = 4
    """Batches per length-sorted window. On the fortunes data (MiniLM tokens, batch 16, 8 epochs) padding falls
    from 55% of the computed tokens (shuffled) to 27%, and every batch still holds at least 3 of the 4 labels (as
    when shuffled). Wider windows pad less but, where length correlates with the label, give batches of fewer
    labels (8: 17%, some batches of 2 labels), and single-class batches make training erratic."""
    packs_examples = True
    formats = ("classification",)
    compared = "class distributions"
    selected_by = ("accuracy", "loss")
    """The best adapter is the most accurate one on validation, where accuracy differs by more than its sampling
    noise (``selection_noise``); within that, the one of lower loss. Loss alone kept an earlier, less accurate
    adapter where validation loss turned up (over-confident mistakes) while accuracy still rose; accuracy alone
    chose by one example of 100 (man-pair: step 87 at 0.78 over the final step at 0.77 with a loss of 0.48 instead
    of 0.52; test 0.70 against the plain ``Trainer``'s 0.765)."""

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase):
        super().__init__(cfg, tokenizer)
        self.label2id: dict[str, int] = {}  # set by fit_labels
        self.pair = 0.0  # encoder_packing.pair_cost of the model packed for, set by use_packing

    def label_column(self) -> str:
        return self.cfg.label_column

    def detect_format(self, columns: list[str], split: str) -> str:
        cfg = self.cfg
        self.need_columns(columns, split, cfg.text_column, cfg.text_pair_column, cfg.label_column)
        return "classification"

    def columns(self, fmt: str) -> dict[str, str]:
        cfg = self.cfg
        return {cfg.text_column: "text", **({cfg.text_pair_column: "text"} if cfg.text_pair_column else {}),
                cfg.label_column: "label"}

    def fit_labels(self, raw: dict[str, datasets.Dataset], id2label: dict[int, str] | None) -> dict[int, str]:
        if id2label is None:
            name, source = ("train", raw["train"]) if "train" in raw else next(iter(raw.items()))
            names = label_names(source, self.cfg.label_column)
            if len(names) < 2:
                raise RecipeError(f"data.{name}: column '{self.cfg.label_column}' holds a single class {names}: a "
                                  "classifier needs examples of at least 2 classes to learn anything (its accuracy "
                                  "would be 1.0 by construction)")
            id2label = dict(enumerate(names))
        self.label2id = {n: i for i, n in id2label.items()}
        for name, ds in raw.items():
            unseen = sorted({str(v) for v in ds[self.cfg.label_column]} - set(self.label2id))
            if unseen:
                raise RecipeError(f"data.{name}: label(s) {unseen[:10]} never occur in the training data "
                                  f"(known: {sorted(self.label2id)[:20]})")
        return id2label

    def data_identity(self) -> dict[str, Any]:
        """The label set: a label's id is what ``encode`` writes."""
        return {"label2id": self.label2id}

    def _texts(self, row: dict[str, Any]) -> list[str]:
        return [str(row[c]) for c in (self.cfg.text_column, self.cfg.text_pair_column) if c]

    def encode(self, row: dict[str, Any], fmt: str) -> dict[str, Any]:
        tok, args = self.tokenizer, self._texts(row)
        full = tok(*args)["input_ids"]
        enc = tok(*args, truncation=True, max_length=self.cfg.max_length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                **({"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {}),
                "labels": self.label2id[str(row[self.cfg.label_column])],
                "truncated": len(full) > len(enc["input_ids"]), "usable": True}

    def collate(self, rows: list[dict[str, Any]], augment: Callable[[dict], dict] | None = None) -> Batch:
        if augment:
            rows = [augment(r) for r in rows]
        return pad_right(rows, self.tokenizer.pad_token_id)

    def cannot_pack(self, model: torch.nn.Module) -> str | None:
        return cannot_pack_encoder(model)

    def use_packing(self, requested: str | bool, model: torch.nn.Module) -> bool:
        packing = super().use_packing(requested, model)
        if packing:  # the rows' width weighs attention by this model's shape and device (row_width)
            self.pair = pair_cost(innermost(model).config, next(model.parameters()).device)
        return packing

    def collate_packed(self, rows: list[dict[str, Any]], capacity: int,
                       augment: Callable[[dict], dict] | None = None) -> Batch:
        if augment:
            rows = [augment(r) for r in rows]
        return pack_examples(rows, self.tokenizer.pad_token_id, capacity, self.pair)

    def tokens(self, batch: Batch) -> torch.Tensor:
        return batch["real_tokens"] if "real_tokens" in batch else batch["attention_mask"].sum()

    def example_text(self, row: dict[str, Any], fmt: str) -> str:
        return " ".join(self._texts(row))

    def length(self, row: dict[str, Any], fmt: str) -> int:
        return len(self.tokenizer(*self._texts(row))["input_ids"])

    def describe(self, row: dict[str, Any], fmt: str) -> str:
        return f"{self.example_text(row, fmt)}  ->  label {row[self.cfg.label_column]!r}"

    def token_augmenter(self, cfg: AugmentConfig, seed: int) -> Augmenter | None:
        tok = self.tokenizer
        unk = tok.mask_token_id if tok.mask_token_id is not None else tok.unk_token_id
        augmenter = Augmenter(cfg, seed, set(tok.all_special_ids), unk)
        return augmenter or None

    def items(self, batch: Batch) -> torch.Tensor:
        return batch["labels"].new_tensor(batch["labels"].shape[0])

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(classification_logits(model, batch), batch["labels"], reduction="sum")

    def eval_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits = classification_logits(model, batch)
        return {"loss": F.cross_entropy(logits, batch["labels"], reduction="none").float(),
                "prediction": logits.argmax(-1), "label": batch["labels"]}

    def selection_noise(self, metrics: dict[str, float]) -> list[float]:
        """Accuracy's standard error at 50% on this many examples (0.05 for 100), then float noise for the loss."""
        return [1e-6 if m == "loss" else 0.5 / max(metrics["examples"], 1) ** 0.5 for m in self.selected_by]

    def summarize(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean loss, the example count, and ``classification_metrics`` (accuracy, f1_macro, f1_micro,
        precision_macro, recall_macro)."""
        preds, refs = values["prediction"].tolist(), values["label"].tolist()
        return {"loss": values["loss"].double().sum().item() / max(len(refs), 1), "examples": len(refs),
                **classification_metrics(preds, refs, len(self.label2id))}

    @torch.no_grad()
    def label_logits(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return classification_logits(model, batch), batch["labels"]
