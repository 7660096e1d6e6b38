"""The ``objective`` section: what the model is trained to do, and the preference objectives' settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from ..errors import did_you_mean
from .section import Section

if TYPE_CHECKING:  # schema.py imports this module
    from .schema import LoraConfigSection

PREFERENCE_OBJECTIVES = ("dpo", "ipo", "simpo", "orpo")
"""``objective.type`` values that train on preference pairs (``{prompt, chosen, rejected}``)."""
REFERENCE_OBJECTIVES = ("dpo", "ipo")
"""Those that compare with a reference model (SimPO and ORPO are reference-free)."""
OBJECTIVE_TYPES = ("auto", "sft", "classification", *PREFERENCE_OBJECTIVES, "kto", "reward")
"""``kto``: unpaired ``{prompt, completion, label}`` rows (``objectives/kto.py``); ``reward``: a scalar head on a
decoder trained on pairs (``objectives/reward.py``, ``model.task: reward``)."""
_DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}


class ObjectiveConfig(Section):
    """The training signal. ``auto``: the model task's own (``sft`` for causal_lm, ``classification`` for
    sequence_classification, ``reward`` for reward); ``dpo``, ``ipo``, ``simpo`` or ``orpo``: preference tuning of a
    causal LM on ``{prompt, chosen, rejected}`` pairs (``objectives/preference.py``); ``kto`` on unpaired
    ``{prompt, completion, label}`` rows; ``reward``: a reward model on pairs."""

    type: str = "auto"
    beta: float | None = Field(None, gt=0)
    """The loss's temperature (ORPO: the weight λ of the odds-ratio term). Default: 0.1 for dpo, ipo, orpo and kto
    (TRL's), 2.0 for simpo (the SimPO paper's)."""
    desirable_weight: float = Field(1.0, gt=0)
    """kto: weight of the losses of desirable (``label: true``) rows (TRL's ``desirable_weight``)."""
    undesirable_weight: float = Field(1.0, gt=0)
    """kto: weight of the losses of undesirable (``label: false``) rows (TRL's ``undesirable_weight``)."""
    simpo_gamma: float = Field(0.5, ge=0)
    """SimPO's target reward margin γ (TRL's ``simpo_gamma``)."""
    cpo_alpha: float = Field(0.0, ge=0)
    """SimPO only: weight of an added NLL loss on the chosen completions (TRL's CPO-SimPO; 0 = SimPO)."""
    precompute_reference: Literal["auto"] | bool = "auto"
    """dpo/ipo: compute the reference log-probs once for every split before training (cached in the run folder,
    reused on resume) instead of once per batch. ``auto``: only when the reference is not the base model with
    the adapter switched off, i.e. with ``lora.init_from``, where the reference is the starting adapter."""

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        name = v.strip().lower()
        if name not in OBJECTIVE_TYPES:
            raise ValueError(f"unknown objective '{v}'{did_you_mean(name, list(OBJECTIVE_TYPES))}")
        return name

    @property
    def paired(self) -> bool:
        """Trains on preference pairs: two sequences per example."""
        return self.type in PREFERENCE_OBJECTIVES

    @property
    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else _DEFAULT_BETA.get(self.type, 0.1)

    def precomputes_reference(self, lora: LoraConfigSection) -> bool:
        """Whether the reference log-probs are computed once before training (``precompute_reference``)."""
        if self.type not in REFERENCE_OBJECTIVES:
            return False
        return lora.init_from is not None if self.precompute_reference == "auto" else self.precompute_reference
