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
OBJECTIVE_TYPES = ("auto", "sft", "classification", *PREFERENCE_OBJECTIVES, "kto", "reward", "grpo")
"""``kto``: unpaired ``{prompt, completion, label}`` rows (``objectives/kto.py``); ``reward``: a scalar head on a
decoder trained on pairs (``objectives/reward.py``, ``model.task: reward``); ``grpo``: online RL from rewards
(``objectives/grpo.py``)."""
_DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1, "grpo": 0.0}
BUILTIN_REWARDS = ("exact_match", "numeric_match", "regex_match", "length_penalty")
"""GRPO's reward functions that need no model (``scoring/rewards.py``); any other name is a function path."""
GRPO_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
"""How GRPO's per-token losses are normalised, named as TRL 1.16 names them (``objectives/grpo.py``)."""


class RewardSpec(Section):
    """One reward function of ``objective.rewards`` (a bare name is this with its defaults)."""

    name: str
    """A built-in (``BUILTIN_REWARDS``) or a function path ``package.module:function`` called as TRL calls its
    reward functions: ``f(prompts=..., completions=..., completion_ids=..., **columns)`` → one float (or None) per
    completion."""
    weight: float = 1.0
    column: str = "answer"
    """The reference column exact_match and numeric_match compare with."""
    pattern: str | None = None
    """regex_match: the pattern the whole stripped completion must match."""
    target: int = Field(0, ge=0)
    """length_penalty: completion tokens allowed before the penalty starts (then linear to −1 at max_new_tokens)."""

    @field_validator("name")
    @classmethod
    def _known_reward(cls, v: str) -> str:
        if v in BUILTIN_REWARDS or ":" in v or "." in v:
            return v
        raise ValueError(f"unknown reward '{v}'{did_you_mean(v, list(BUILTIN_REWARDS))}; or a function path "
                         "'package.module:function'")

    @property
    def label(self) -> str:
        """The name its metric is reported under: the built-in's, or the function's."""
        return self.name.replace(":", ".").rsplit(".", 1)[-1]


class ObjectiveConfig(Section):
    """The training signal. ``auto``: the model task's own (``sft`` for causal_lm, ``classification`` for
    sequence_classification, ``reward`` for reward); ``dpo``, ``ipo``, ``simpo`` or ``orpo``: preference tuning of a
    causal LM on ``{prompt, chosen, rejected}`` pairs (``objectives/preference.py``); ``kto`` on unpaired
    ``{prompt, completion, label}`` rows; ``reward``: a reward model on pairs; ``grpo``: online RL from the rewards
    of completions it samples for ``prompt`` rows (``objectives/grpo.py``)."""

    type: str = "auto"
    beta: float | None = Field(None, gt=0)
    """The loss's temperature (ORPO: the weight λ of the odds-ratio term; GRPO: the weight of the KL term against
    the base model). Default: 0.1 for dpo, ipo, orpo and kto (TRL's), 2.0 for simpo (the SimPO paper's), 0.0 for
    grpo (TRL's: no reference pass)."""
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
    # --- grpo (objectives/grpo.py); defaults are TRL 1.16's GRPOConfig's unless said otherwise
    rewards: list[RewardSpec] = Field(default_factory=list)
    """grpo: the reward functions, summed with their weights; the first is the task's correctness check (the pass
    rate counts completions it gives full credit, ≥ 1)."""
    num_generations: int = Field(8, ge=2)
    """grpo: completions sampled per prompt (the group its advantages are normalised in)."""
    max_new_tokens: int = Field(64, ge=1)
    """grpo: the longest completion (TRL: max_completion_length, 256; 64 here: CPU-sized)."""
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    epsilon: float = Field(0.2, ge=0)
    """grpo: the clipping range of the probability ratio (TRL's epsilon; epsilon_high = epsilon)."""
    loss_type: str = "dapo"
    """grpo: ``dapo`` (TRL's default: per-token losses over the completion tokens of the whole global batch, no
    length bias, the same for any split over processes and accumulation steps), ``grpo`` (each completion's mean,
    then the mean over completions), ``bnpo`` (over the tokens of each micro-batch) or ``dr_grpo`` (over
    completions × max_new_tokens)."""

    @field_validator("rewards", mode="before")
    @classmethod
    def _reward_names(cls, v: object) -> object:
        return [{"name": r} if isinstance(r, str) else r for r in v] if isinstance(v, list) else v

    @field_validator("loss_type")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        if v not in GRPO_LOSS_TYPES:
            raise ValueError(f"unknown loss_type '{v}'{did_you_mean(v, list(GRPO_LOSS_TYPES))}")
        return v

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
    def grpo_settings(self) -> set[str]:
        """The GRPO-only settings that differ from their defaults (a dumped recipe repeats every default)."""
        fields = type(self).model_fields
        return {k for k in ("rewards", "num_generations", "max_new_tokens", "temperature", "top_p", "epsilon",
                            "loss_type") if getattr(self, k) != fields[k].get_default(call_default_factory=True)}

    @property
    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else _DEFAULT_BETA.get(self.type, 0.1)

    def precomputes_reference(self, lora: LoraConfigSection) -> bool:
        """Whether the reference log-probs are computed once before training (``precompute_reference``)."""
        if self.type not in REFERENCE_OBJECTIVES:
            return False
        return lora.init_from is not None if self.precompute_reference == "auto" else self.precompute_reference
