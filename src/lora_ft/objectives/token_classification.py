"""Token classification (named entities and other tagging): one BIO/IOB2 tag per word, a new head per token.

Data, by ``data.format`` (``auto``: whichever columns are there):

- ``tokens``: the CoNLL layout as JSON, a list of words (``data.tokens_column``) and one tag per word
  (``data.tags_column``): ``{"tokens": ["Ada", "Lovelace", "wrote"], "tags": ["B-PER", "I-PER", "O"]}``;
- ``spans``: text (``data.text_column``) with character spans (``data.spans_column``) of ``{start, end, label}``;
  the text is split into words (``split_words``: runs of letters/digits, and each other non-space character) and
  a word inside a span is tagged ``B-label`` (the span's first word) or ``I-label``.

Words are tokenized into sub-words (a fast tokenizer's ``word_ids``); the first sub-word of a word carries the
word's tag and the rest are ignored, or, with ``data.label_all_tokens``, carry it too (the rest of a ``B-`` word
as ``I-``). Metrics are entity-level precision, recall and F1 from ``seqeval`` (what ``evaluate``'s seqeval module
wraps; default mode, micro-averaged) over the words' tags read at their first sub-words, plus ``token_accuracy``
over the same words. Words cut off by ``data.max_length`` are neither trained nor scored.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar

import datasets
import torch
import torch.nn.functional as F
from seqeval.metrics import f1_score, precision_score, recall_score

from ..data.cells import Where, as_list
from ..errors import DataError, RecipeError
from .base import Batch, Objective
from .padding import IGNORE, model_inputs, pad_inputs, pad_lists

WORD = re.compile(r"\w+|[^\w\s]")


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The words of ``text`` (runs of letters/digits, and each other non-space character) with their character
    offsets."""
    found = list(WORD.finditer(text))
    return [m.group() for m in found], [m.span() for m in found]


def tags_from_spans(offsets: list[tuple[int, int]], spans: list[dict[str, Any]]) -> list[str]:
    """IOB2 tags of words at ``offsets`` from character ``spans``: a word overlapping a span is inside it, the first
    such word is its ``B-``."""
    tags = ["O"] * len(offsets)
    for span in sorted(spans, key=lambda s: s["start"]):
        inside = [i for i, (a, b) in enumerate(offsets) if a < span["end"] and b > span["start"]]
        for k, i in enumerate(inside):
            tags[i] = ("B-" if k == 0 else "I-") + span["label"]
    return tags


def align_labels(word_ids: list[int | None], word_tags: list[int], all_tokens: bool,
                 inside: dict[int, int]) -> tuple[list[int], list[int]]:
    """Per sub-word token: its label id (``IGNORE`` for special tokens, and for the sub-words after a word's first
    unless ``all_tokens``) and whether it is a word's first sub-word. ``inside``: a ``B-`` tag's id → its ``I-``
    tag's id, for the later sub-words of a ``B-`` word under ``all_tokens``."""
    labels, first, previous = [], [], None
    for w in word_ids:
        if w is None:
            labels.append(IGNORE)
            first.append(0)
        elif w != previous:
            labels.append(word_tags[w])
            first.append(1)
        else:
            labels.append(inside.get(word_tags[w], word_tags[w]) if all_tokens else IGNORE)
            first.append(0)
        previous = w
    return labels, first


class TokenClassification(Objective):
    """One tag per word, from word/tag lists or from character spans."""

    model_task = "token_classification"
    length_window = 4
    """As single-label classification: narrow length-sorted windows, so batches still mix sentence kinds."""
    formats = ("tokens", "spans")
    compared = "per-token label distributions"
    selected_by: ClassVar[tuple[str, ...]] = ("f1", "loss")
    """The best adapter has the highest validation entity F1, then the lowest loss."""

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.label2id: dict[str, int] = {}
        self.format = cfg.format if cfg.format in self.formats else "tokens"  # set by detect_format

    # ------------------------------------------------------------------------------------------------ data
    def detect_format(self, columns: list[str], split: str) -> str:
        cfg = self.cfg
        fmt = cfg.format
        if fmt == "auto":
            if cfg.tokens_column in columns or cfg.tags_column in columns:
                fmt = "tokens"
            elif cfg.spans_column in columns:
                fmt = "spans"
            else:
                raise RecipeError(f"data.{split}: token classification reads columns '{cfg.tokens_column}' + "
                                  f"'{cfg.tags_column}' (words and their tags) or '{cfg.text_column}' + "
                                  f"'{cfg.spans_column}' (text and character spans); columns present: {columns} "
                                  "(set data.tokens_column / tags_column / spans_column to rename)")
        wanted = (cfg.tokens_column, cfg.tags_column) if fmt == "tokens" else (cfg.text_column, cfg.spans_column)
        self.need_columns(columns, split, *wanted)
        self.format = fmt
        return fmt

    def columns(self, fmt: str) -> dict[str, str]:
        cfg = self.cfg
        if fmt == "tokens":
            return {cfg.tokens_column: "words", cfg.tags_column: "words"}
        return {cfg.text_column: "text", cfg.spans_column: "spans"}

    def check_rows(self, ds: datasets.Dataset, fmt: str, where: Where) -> None:
        """The cells, then per row: as many tags as words; spans inside their text."""
        super().check_rows(ds, fmt, where)
        cfg = self.cfg
        if fmt == "tokens":
            for i, (words, tags) in enumerate(zip(ds[cfg.tokens_column], ds[cfg.tags_column], strict=True)):
                if len(as_list(words)) != len(as_list(tags)):
                    raise DataError(f"{where.cell(i, cfg.tags_column)} holds {len(as_list(tags))} tag(s) for "
                                    f"{len(as_list(words))} word(s) in '{cfg.tokens_column}': give one tag per word")
            return
        for i, (text, spans) in enumerate(zip(ds[cfg.text_column], ds[cfg.spans_column], strict=True)):
            beyond = [s for s in as_list(spans) if s["end"] > len(str(text))]
            if beyond:
                raise DataError(f"{where.cell(i, cfg.spans_column)} span {beyond[0]} ends after the text "
                                f"({len(str(text))} characters)")

    def words_and_tags(self, row: dict[str, Any], fmt: str) -> tuple[list[str], list[str]]:
        """An example as words and their tags, in either format."""
        cfg = self.cfg
        if fmt == "tokens":
            return [str(w) for w in as_list(row[cfg.tokens_column])], [str(t) for t in as_list(row[cfg.tags_column])]
        words, offsets = split_words(str(row[cfg.text_column]))
        return words, tags_from_spans(offsets, as_list(row[cfg.spans_column]))

    def fit_labels(self, raw: dict[str, datasets.Dataset], id2label: dict[int, str] | None) -> dict[int, str]:
        """The tags of the training split: ``O`` first, then the others sorted (``B-X`` before ``I-X``)."""
        tags = {name: {t for row in ds for t in self.words_and_tags(row, self.format)[1]} for name, ds in raw.items()}
        if id2label is None:
            name = "train" if "train" in raw else next(iter(raw))
            names = sorted(tags[name] - {"O"}, key=lambda t: (t[2:], t)) if tags[name] else []
            if not names:
                raise RecipeError(f"data.{name}: no tag other than 'O': token classification needs tagged words")
            id2label = dict(enumerate(["O", *names]))
        self.label2id = {n: i for i, n in id2label.items()}
        for name, seen in tags.items():
            unseen = sorted(seen - set(self.label2id))
            if unseen:
                raise RecipeError(f"data.{name}: tag(s) {unseen[:10]} never occur in the training data "
                                  f"(known: {sorted(self.label2id)[:20]})")
        return id2label

    def data_identity(self) -> dict[str, Any]:
        """The tag set: a tag's id is what ``encode`` writes (part of the data cache's key)."""
        return {"label2id": self.label2id}

    def _inside(self) -> dict[int, int]:
        return {i: self.label2id["I-" + n[2:]] for n, i in self.label2id.items()
                if n.startswith("B-") and "I-" + n[2:] in self.label2id}

    def encode(self, row: dict[str, Any], fmt: str) -> dict[str, Any]:
        if not self.tokenizer.is_fast:
            raise RecipeError("token classification needs a fast tokenizer (its word_ids map sub-words to words); "
                              "this model's tokenizer has none")
        words, tags = self.words_and_tags(row, fmt)
        full = self.tokenizer(words, is_split_into_words=True)["input_ids"]
        enc = self.tokenizer(words, is_split_into_words=True, truncation=True, max_length=self.cfg.max_length)
        labels, first = align_labels(enc.word_ids(), [self.label2id[t] for t in tags], self.cfg.label_all_tokens,
                                     self._inside())
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                **({"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {}),
                "labels": labels, "first": first, "truncated": len(full) > len(enc["input_ids"]),
                "usable": any(x != IGNORE for x in labels)}

    def collate(self, rows: list[dict[str, Any]], augment: Callable[[dict], dict] | None = None) -> Batch:
        """Padded inputs, labels padded with ``IGNORE`` and the first-sub-word mask with 0. Token augmentation is
        not offered (a deleted or swapped token would no longer match its tag)."""
        batch = pad_inputs(self.tokenizer, rows)
        width = batch["input_ids"].shape[1]
        return {**batch, "labels": pad_lists([r["labels"] for r in rows], width, IGNORE),
                "first": pad_lists([r["first"] for r in rows], width, 0)}

    def length(self, row: dict[str, Any], fmt: str) -> int:
        return len(self.tokenizer(self.words_and_tags(row, fmt)[0], is_split_into_words=True)["input_ids"])

    def example_text(self, row: dict[str, Any], fmt: str) -> str:
        return " ".join(self.words_and_tags(row, fmt)[0])

    def describe(self, row: dict[str, Any], fmt: str) -> str:
        words, tags = self.words_and_tags(row, fmt)
        return " ".join(w if t == "O" else f"{w}/{t}" for w, t in zip(words, tags, strict=True))

    def label_column(self) -> str | None:
        return None

    def cannot_pack(self, model: torch.nn.Module) -> str | None:
        return "token classification batches are padded, one example per row"

    # ------------------------------------------------------------------------------------ optimisation
    def items(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"] != IGNORE).sum()

    def _logits(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return model(**model_inputs(batch)).logits.float()

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        logits = self._logits(model, batch)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE,
                               reduction="sum")

    # -------------------------------------------------------------------------------------- evaluation
    def eval_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Per example: the summed loss and its labelled tokens, and the predicted and true tag ids of its words
        (at first sub-words; ``IGNORE`` elsewhere), padded to ``max_length`` so that batches concatenate."""
        logits, labels = self._logits(model, batch), batch["labels"]
        token_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        words = (batch["first"] == 1) & (labels != IGNORE)
        width = self.cfg.max_length

        def padded(x: torch.Tensor) -> torch.Tensor:
            return F.pad(torch.where(words, x, IGNORE), (0, width - x.shape[1]), value=IGNORE)

        return {"loss": token_loss.sum(-1), "tokens": (labels != IGNORE).sum(-1),
                "prediction": padded(logits.argmax(-1)), "label": padded(labels)}

    def tag_sequences(self, values: dict[str, torch.Tensor]) -> tuple[list[list[str]], list[list[str]]]:
        """(true, predicted) tag names per example, one per scored word."""
        names = {i: n for n, i in self.label2id.items()}
        truth, predicted = [], []
        for p, t in zip(values["prediction"].tolist(), values["label"].tolist(), strict=True):
            kept = [(names[a], names[b]) for a, b in zip(p, t, strict=True) if b != IGNORE]
            predicted.append([a for a, _ in kept])
            truth.append([b for _, b in kept])
        return truth, predicted

    def summarize(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean loss per labelled token, the example count, seqeval's entity-level ``precision``, ``recall`` and
        ``f1``, and ``token_accuracy`` (words whose tag is right)."""
        truth, predicted = self.tag_sequences(values)
        words = sum(map(len, truth))
        right = sum(a == b for t, p in zip(truth, predicted, strict=True) for a, b in zip(t, p, strict=True))
        return {"loss": values["loss"].double().sum().item() / max(values["tokens"].sum().item(), 1),
                "examples": len(truth),
                "precision": float(precision_score(truth, predicted, zero_division=0)),
                "recall": float(recall_score(truth, predicted, zero_division=0)),
                "f1": float(f1_score(truth, predicted, zero_division=0)),
                "token_accuracy": right / max(words, 1)}

    @torch.no_grad()
    def label_logits(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels = self._logits(model, batch), batch["labels"]
        keep = labels != IGNORE
        return logits[keep], labels[keep]
