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
from .embedding import Embedding
from .kto import KTO
from .preference import Preference
from .reward import RewardModel

OBJECTIVES: dict[str, type[Objective]] = {
    "causal_lm": CausalLM,
    "sequence_classification": SequenceClassification,
    "embedding": Embedding,
    "reward": RewardModel,
}


def objective_for(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> Objective:
    """The recipe's objective, bound to its data config and the model's tokenizer: ``objective.type``'s, else the
    model task's own (``OBJECTIVES``)."""
    o = recipe.objective
    if o.paired:
        return Preference(recipe.data, tokenizer, o, o.precomputes_reference(recipe.lora), bool(recipe.lora.init_from))
    if o.type == "kto":
        return KTO(recipe.data, tokenizer, o)
    if recipe.model.task == "embedding":
        m = recipe.model
        return Embedding(recipe.data, tokenizer, read_pooling(resolve_source(m.name), m.revision))
    return OBJECTIVES[recipe.model.task](recipe.data, tokenizer)


__all__ = ["KTO", "OBJECTIVES", "Batch", "CausalLM", "Embedding", "GenerationExample", "Objective", "Preference",
           "RewardModel",
           "SequenceClassification", "objective_for"]
