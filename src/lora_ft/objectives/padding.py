"""Batches of the encoder tasks (tags, several labels, scores): the tokenizer pads the inputs, labels are added.

The inputs are padded by the tokenizer's own ``pad`` (right side, its pad id, the attention mask and segment ids
as the model expects them); label lists are padded here, with the loss's ignore index, because their dtype and
padding value depend on the task.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

IGNORE = -100
"""The label of a position that carries no loss (``torch.nn.functional.cross_entropy``'s ``ignore_index``)."""

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def pad_inputs(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the rows have them), right-padded."""
    features = [{k: r[k] for k in INPUTS if k in r} for r in rows]
    batch = tokenizer.pad(features, padding=True, return_tensors="pt")
    return {k: v.long() for k, v in batch.items()}


def pad_lists(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    """Integer lists right-padded with ``value`` to ``width`` (longer ones cut)."""
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        k = min(len(r), width)
        out[i, :k] = torch.tensor(r[:k], dtype=torch.long)
    return out


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """What the model's forward takes from a batch (labels and bookkeeping columns left out)."""
    return {k: v for k, v in batch.items() if k in INPUTS}


def bernoulli_logits(scores: torch.Tensor) -> torch.Tensor:
    """Each score ``z`` as the two-way logits ``[0, z]``: their softmax is ``[1 - sigmoid(z), sigmoid(z)]``, so the
    merge check's per-position KL divergence compares the two models' probabilities of every (example, label) as
    Bernoulli distributions (multi-label), or their scores through the same map (regression)."""
    z = scores.float().reshape(-1)
    return torch.stack([torch.zeros_like(z), z], dim=-1)
