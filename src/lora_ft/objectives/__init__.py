"""Objectives: what a kind of training signal needs (tokenization, batches, loss, metrics, head).

A new task type is one new file here with an ``Objective`` subclass, and one line in ``OBJECTIVES``.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from ..recipe import Recipe
from .base import Batch, GenerationExample, Objective
from .causal_lm import CausalLM
from .classification import SequenceClassification
from .detect import sequence_format
from .multilabel import MultiLabel
from .preference import Preference
from .regression import Regression
from .token_classification import TokenClassification

OBJECTIVES: dict[str, type[Objective]] = {
    "causal_lm": CausalLM,
    "sequence_classification": SequenceClassification,
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
    if o.paired:
        return Preference(recipe.data, tokenizer, o, o.precomputes_reference(recipe.lora), bool(recipe.lora.init_from))
    return task_objective(recipe)(recipe.data, tokenizer)


__all__ = ["OBJECTIVES", "Batch", "CausalLM", "GenerationExample", "MultiLabel", "Objective", "Preference",
           "Regression", "SequenceClassification", "TokenClassification", "objective_for",
           "task_objective"]
