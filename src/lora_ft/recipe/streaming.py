"""What ``data.streaming: true`` cannot combine with: the settings that need the whole training split at hand.

A stream (``data.streaming``: the training file read as a ``datasets.IterableDataset``, ``data/streaming.py``) has no
known length and is read once per epoch, front to back, so everything that needs all of its examples before the
first step (a count of epochs, a carved validation part, a sort by length, label sets, a reference pass over the
split) is refused here, with every clash named in one line.
"""

from __future__ import annotations

from typing import Any


def streaming_problems(recipe: Any) -> list[str]:
    """The clauses of the one-line error for a streaming recipe (empty: none, or not streaming).

    Args:
        recipe: the ``Recipe`` being validated (its sections already valid).
    """
    d, o, t = recipe.data, recipe.objective, recipe.train
    if not d.streaming:
        return []
    out = []
    if t.max_steps is None:
        out.append("train.max_steps is needed (a stream has no known length, so train.epochs cannot be counted): "
                   "set train.max_steps")
    if recipe.model.task != "causal_lm" or o.type not in ("auto", "sft") or d.format == "preference":
        out.append(f"objective.type {o.type} on model.task {recipe.model.task} needs its whole training split (label "
                   "sets, pairs, reference passes): streaming trains objective sft on model.task causal_lm only; "
                   "set data.streaming: false")
    if d.validation_split:
        out.append("data.validation_split carves the training split, which a stream does not hold: give "
                   "data.validation instead")
    if d.group_by_length is True:
        out.append("data.group_by_length true sorts the whole split by length: set it to auto or false (under "
                   "streaming examples are batched in the stream's order)")
    return out
