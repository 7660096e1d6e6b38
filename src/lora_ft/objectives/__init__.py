"""Objectives: what a kind of training signal needs (tokenization, batches, loss, metrics, head).

A new task type is one new file here with an ``Objective`` subclass, and one line in ``OBJECTIVES``.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from ..recipe import Recipe
from .base import Batch, GenerationExample, Objective
from .causal_lm import CausalLM
from .classification import SequenceClassification
from .grpo import GRPO
from .preference import Preference

OBJECTIVES: dict[str, type[Objective]] = {
    "causal_lm": CausalLM,
    "sequence_classification": SequenceClassification,
}


def objective_for(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> Objective:
    """The recipe's objective, bound to its data config and the model's tokenizer: ``objective.type``'s, else the
    model task's own (``OBJECTIVES``)."""
    o = recipe.objective
    if o.type == "grpo":
        return GRPO(recipe.data, tokenizer, o, recipe.train.seed)
    if o.paired:
        return Preference(recipe.data, tokenizer, o, o.precomputes_reference(recipe.lora), bool(recipe.lora.init_from))
    return OBJECTIVES[recipe.model.task](recipe.data, tokenizer)


__all__ = ["GRPO", "OBJECTIVES", "Batch", "CausalLM", "GenerationExample", "Objective", "Preference",
           "SequenceClassification", "objective_for"]
