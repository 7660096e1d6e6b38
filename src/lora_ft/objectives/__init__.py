"""Objectives: what a kind of training signal needs (tokenization, batches, loss, metrics, head).

A new task type is one new file here with an ``Objective`` subclass, and one line in ``OBJECTIVES``.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from ..modeling.loading import resolve_source
from ..modeling.pooling import read_pooling
from ..recipe import Recipe
from .base import Batch, GenerationExample, Objective
from .causal_lm import CausalLM
from .classification import SequenceClassification
from .detect import sequence_format
from .embedding import Embedding
from .grpo import GRPO
from .kto import KTO
from .multilabel import MultiLabel
from .preference import Preference
from .regression import Regression
from .reward import RewardModel
from .token_classification import TokenClassification

OBJECTIVES: dict[str, type[Objective]] = {
    "causal_lm": CausalLM,
    "sequence_classification": SequenceClassification,
    "embedding": Embedding,
    "reward": RewardModel,
    "token_classification": TokenClassification,
    "regression": Regression,
}
SEQUENCE_FORMATS: dict[str, type[Objective]] = {"multilabel": MultiLabel, "regression": Regression}
"""``model.task: sequence_classification`` data whose labels are lists or scores (``detect.sequence_format``)."""


def task_objective(recipe: Recipe) -> type[Objective]:
    """The model task's own objective (``OBJECTIVES``); for sequence classification, by the data's labels."""
    if recipe.model.task == "sequence_classification":
        return SEQUENCE_FORMATS.get(sequence_format(recipe.data), SequenceClassification)
    return OBJECTIVES[recipe.model.task]


def objective_for(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> Objective:
    """The recipe's objective, bound to its data config and the model's tokenizer: ``objective.type``'s, else the
    model task's own (``OBJECTIVES``; for sequence classification, by the data's labels)."""
    o = recipe.objective
    if o.type == "grpo":
        return GRPO(recipe.data, tokenizer, o, recipe.train.seed)
    if o.paired:
        return Preference(recipe.data, tokenizer, o, o.precomputes_reference(recipe.lora), bool(recipe.lora.init_from))
    if o.type == "kto":
        return KTO(recipe.data, tokenizer, o)
    if recipe.model.task == "embedding":
        m = recipe.model
        # No tokenizer (validate's data checks): nothing is pooled, so the model's files are not read.
        pooling = read_pooling(resolve_source(m.name), m.revision) if tokenizer is not None else None
        return Embedding(recipe.data, tokenizer, pooling)
    return task_objective(recipe)(recipe.data, tokenizer)


__all__ = ["GRPO", "KTO", "OBJECTIVES", "Batch", "CausalLM", "Embedding", "GenerationExample", "MultiLabel",
           "Objective", "Preference", "Regression", "RewardModel", "SequenceClassification", "TokenClassification",
           "objective_for", "task_objective"]
