"""Sentence embeddings: an encoder trained so that related texts embed close together (``model.task: embedding``).

Data is sentence-transformers' own layout: an ``anchor`` and a ``positive`` column (a query and the passage it
finds, a docstring and its function), optionally a ``negative`` column of hard negatives, or a ``score`` column
for scored pairs (``data.anchor_column`` and the others rename them). The embedding is the model's own: the
pooling (and normalisation) of its sentence-transformers configuration (``modeling.pooling``).

Losses, as sentence-transformers defines them (``tests/test_embedding.py`` proves equality to 1e-5):

- pairs (``pairs``): ``MultipleNegativesRankingLoss`` at its defaults: for each anchor, cross-entropy over
  ``scale`` × the cosine similarity to every positive of the micro-batch (in-batch negatives) and every hard
  negative appended after them, the own positive being the target; scale 20.
- scored pairs (``scored_pairs``): ``CosineSimilarityLoss``: squared error between the cosine similarity of the
  pair and its score.

The losses are summed here and divided by the examples of the global batch by the trainer, i.e. the mean of
sentence-transformers. In-batch negatives are those of one micro-batch on one process: under DDP (and with
``grad_accum``) each process ranks its anchors against its own micro-batch only, as sentence-transformers does
with its default ``gather_across_devices=False``; the effective number of negatives is ``micro_batch_size``.

Evaluation ranks each anchor of a split against all the split's positives (queries = anchors, corpus = the
positives): ``recall@1``, ``recall@5``, ``recall@10`` and ``mrr`` (mean reciprocal rank of the own positive in the
whole corpus), and ``loss``, the ranking loss against that whole corpus (so it does not depend on the evaluation
batch or the number of processes). Scored pairs give ``spearman`` and ``pearson`` of cosine vs score and the
squared error as ``loss``. The best adapter is chosen by ``mrr`` (scored data: ``spearman``), loss breaking ties.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from transformers import PreTrainedTokenizerBase

from ..data.cells import Where, check_columns
from ..errors import DataError
from ..modeling.pooling import Pooling, pool, write_sentence_transformers_files
from ..recipe import DataConfig
from .base import Batch, Objective

SCALE = 20.0
"""``MultipleNegativesRankingLoss``'s default scale (1 / temperature 0.05)."""
RECALL_AT = (1, 5, 10)
SIDES = ("anchor", "positive", "negative")
"""The texts of an example; the anchor's tokens are ``input_ids`` (what the batch samplers measure), the others
carry their side as a prefix (``positive_input_ids``)."""


def _prefix(side: str) -> str:
    return "" if side == "anchor" else f"{side}_"


def pad_side(rows: list[dict[str, Any]], side: str, pad_id: int) -> Batch:
    """Right-padded ``input_ids``, ``attention_mask`` (and ``token_type_ids``) of one side of the examples, under
    that side's prefix."""
    p = _prefix(side)
    width = max(len(r[p + "input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r[p + "input_ids"])
        ids[i, :k], mask[i, :k] = torch.tensor(r[p + "input_ids"]), 1
    out = {p + "input_ids": ids, p + "attention_mask": mask}
    if p + "token_type_ids" in rows[0]:
        out[p + "token_type_ids"] = torch.zeros_like(ids)  # one text per sequence: all segment 0
    return out


def similarities(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every query with every doc (sentence-transformers' ``cos_sim``)."""
    return F.normalize(queries, p=2, dim=1) @ F.normalize(docs, p=2, dim=1).T


def ranking_loss(anchors: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """Per-anchor multiple-negatives ranking loss: anchor ``i``'s positive is ``docs[i]``, every other doc (the
    other positives, then any hard negatives) a negative."""
    scores = similarities(anchors, docs) * SCALE
    return F.cross_entropy(scores, torch.arange(len(anchors), device=scores.device), reduction="none")


def _score_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return f"is {type(value).__name__}, not a number" if value is not None else "is empty; every pair needs a score"
    try:
        number = float(value)
    except ValueError:
        return f"is {value!r}, not a number"
    return None if math.isfinite(number) else "is not a finite number"


class Embedding(Objective):
    """Pairs (with optional hard negatives) or scored pairs; see the module docstring.

    Args:
        cfg: the recipe's ``data`` section.
        tokenizer: the model's tokenizer.
        pooling: how token states become the embedding (``modeling.pooling.read_pooling`` of the model).
    """

    model_task = "embedding"
    length_window = 0
    """Shuffled batches only: sorting by the anchor's length would make the in-batch negatives of a batch alike in
    length, a cue unrelated to meaning."""
    formats = ("pairs", "scored_pairs")
    compared = "sentence embeddings"
    sequences_per_example = 2
    """Anchor and positive (hard negatives add a third, which the planner does not count)."""
    selected_by = ("mrr", "loss")
    fidelity_measure = "cosine_distance_mean"

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, pooling: Pooling | None = None):
        super().__init__(cfg, tokenizer)
        self.pooling = pooling or Pooling()

    # ------------------------------------------------------------------------------------------- data
    def _columns(self) -> dict[str, str]:
        c = self.cfg
        return {"anchor": c.anchor_column, "positive": c.positive_column, "negative": c.negative_column}

    def detect_format(self, columns: list[str], split: str) -> str:
        cols = self._columns()
        self.need_columns(columns, split, cols["anchor"], cols["positive"])
        if self.cfg.format in self.formats:
            fmt = self.cfg.format
        else:
            fmt = "scored_pairs" if self.cfg.score_column in columns else "pairs"
        if fmt == "scored_pairs":
            self.need_columns(columns, split, self.cfg.score_column)
        return fmt

    def columns(self, fmt: str) -> dict[str, str]:
        cols = self._columns()
        kinds = {cols["anchor"]: "text", cols["positive"]: "text"}
        return kinds if fmt == "scored_pairs" else kinds | {cols["negative"]: "text"}

    def check_rows(self, ds: datasets.Dataset, fmt: str, where: Where) -> None:
        check_columns(ds, self.columns(fmt), where)
        if fmt != "scored_pairs":
            return
        problems = [(i, p) for i, v in enumerate(ds[self.cfg.score_column]) if (p := _score_problem(v))]
        if problems:
            i, problem = problems[0]
            more = f" ({len(problems) - 1} more row(s) like it)" if len(problems) > 1 else ""
            raise DataError(f"{where.cell(i, self.cfg.score_column)} {problem}{more}")

    def fit_labels(self, raw: dict[str, datasets.Dataset], id2label: dict[int, str] | None) -> None:
        """No labels; the selection rule follows the training data: scored pairs are chosen by Spearman."""
        first = raw.get("train") or next(iter(raw.values()))
        if self.cfg.score_column in first.column_names and self.cfg.format != "pairs":
            self.selected_by = ("spearman", "loss")
        return None

    def _sides(self, row: dict[str, Any], fmt: str) -> dict[str, str]:
        cols = self._columns()
        return {s: str(row[c]) for s, c in cols.items()
                if c in row and row[c] is not None and (s != "negative" or fmt == "pairs")}

    def encode(self, row: dict[str, Any], fmt: str) -> dict[str, Any]:
        out: dict[str, Any] = {"truncated": False, "usable": True}
        for side, text in self._sides(row, fmt).items():
            full = self.tokenizer(text)["input_ids"]
            enc = self.tokenizer(text, truncation=True, max_length=self.cfg.max_length)
            p = _prefix(side)
            out[p + "input_ids"], out[p + "attention_mask"] = enc["input_ids"], enc["attention_mask"]
            if "token_type_ids" in enc:
                out[p + "token_type_ids"] = enc["token_type_ids"]
            out["truncated"] |= len(full) > len(enc["input_ids"])
        if fmt == "scored_pairs":
            out["score"] = float(row[self.cfg.score_column])
        return out

    def collate(self, rows: list[dict[str, Any]], augment: Callable[[dict], dict] | None = None) -> Batch:
        batch: Batch = {}
        for side in SIDES:
            if _prefix(side) + "input_ids" in rows[0]:
                batch |= pad_side(rows, side, self.tokenizer.pad_token_id)
        if "score" in rows[0]:
            batch["score"] = torch.tensor([r["score"] for r in rows], dtype=torch.float32)
        return batch

    def example_text(self, row: dict[str, Any], fmt: str) -> str:
        sides = self._sides(row, fmt)
        return f"{sides['anchor']} {sides['positive']}"

    def length(self, row: dict[str, Any], fmt: str) -> int:
        return max(len(self.tokenizer(t)["input_ids"]) for t in self._sides(row, fmt).values())

    def describe(self, row: dict[str, Any], fmt: str) -> str:
        sides = self._sides(row, fmt)
        text = f"{sides['anchor']!r}  ~  {sides['positive']!r}"
        if "negative" in sides:
            text += f"  (not {sides['negative']!r})"
        return text + (f"  score {row[self.cfg.score_column]}" if fmt == "scored_pairs" else "")

    # ------------------------------------------------------------------------------------ optimisation
    def embed(self, model: torch.nn.Module, batch: Batch, side: str) -> torch.Tensor:
        """The pooled (fp32) embeddings of one side of the batch."""
        p = _prefix(side)
        inputs = {k: batch[p + k] for k in ("input_ids", "attention_mask", "token_type_ids") if p + k in batch}
        hidden = model(**inputs).last_hidden_state
        return pool(hidden.float(), inputs["attention_mask"], self.pooling)

    def _embeddings(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return {s: self.embed(model, batch, s) for s in SIDES if _prefix(s) + "input_ids" in batch}

    def tokens(self, batch: Batch) -> torch.Tensor:
        return sum(batch[_prefix(s) + "attention_mask"].sum() for s in SIDES if _prefix(s) + "attention_mask" in batch)

    def items(self, batch: Batch) -> torch.Tensor:
        return batch["input_ids"].new_tensor(batch["input_ids"].shape[0])

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        e = self._embeddings(model, batch)
        if "score" in batch:
            return ((F.cosine_similarity(e["anchor"], e["positive"]) - batch["score"]) ** 2).sum()
        docs = torch.cat([e["positive"], e["negative"]]) if "negative" in e else e["positive"]
        return ranking_loss(e["anchor"], docs).sum()

    # -------------------------------------------------------------------------------------- evaluation
    def eval_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        values = self._embeddings(model, batch)
        if "score" in batch:
            values["score"] = batch["score"]
        return values

    def summarize(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Retrieval metrics of a split (pairs) or correlations (scored pairs); see the module docstring."""
        anchors, positives = values["anchor"].double(), values["positive"].double()
        n = len(anchors)
        if "score" in values:
            cos = F.cosine_similarity(anchors, positives).float()
            score = values["score"].float()
            corr = {"spearman": float(spearmanr(cos, score).statistic),
                    "pearson": float(pearsonr(cos, score).statistic)} if n > 1 else {"spearman": 0.0, "pearson": 0.0}
            return {"loss": ((cos - score) ** 2).mean().item(), "examples": n,
                    **{k: 0.0 if math.isnan(v) else v for k, v in corr.items()}}
        sims = similarities(anchors, positives)
        own = sims.diagonal().unsqueeze(1)
        # Rank 1 + the docs strictly more similar: a duplicate of the own positive (same text) does not count.
        ranks = (sims > own).sum(1) + 1
        docs = torch.cat([positives, values["negative"].double()]) if "negative" in values else positives
        metrics = {"loss": ranking_loss(anchors, docs).mean().item(), "examples": n,
                   "mrr": (1.0 / ranks.double()).mean().item()}
        return metrics | {f"recall@{k}": (ranks <= k).double().mean().item() for k in RECALL_AT}

    def write_model_files(self, model: torch.nn.Module, folder: Path) -> None:
        """The sentence-transformers pipeline (``modeling.pooling.write_sentence_transformers_files``)."""
        write_sentence_transformers_files(folder, self.pooling, model.config.hidden_size, self.cfg.max_length)

    @torch.no_grad()
    def label_logits(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every text's embedding (anchors, then positives, then negatives) and its row number."""
        e = torch.cat(list(self._embeddings(model, batch).values()))
        return e, torch.arange(len(e))

    def compare_outputs(self, ref: list[tuple[torch.Tensor, torch.Tensor]],
                        new: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """The merge's fidelity: cosine similarity of each text's embedding before and after (1 - its mean is the
        ``fidelity_measure``), and the largest absolute difference of a component."""
        a, b = torch.cat([r for r, _ in ref]).double(), torch.cat([m for m, _ in new]).double()
        cos = F.cosine_similarity(a, b)
        return {"cosine_distance_mean": (1 - cos.mean()).clamp(min=0).item(), "cosine_min": cos.min().item(),
                "max_abs_diff": (a - b).abs().max().item(), "positions": len(a)}
