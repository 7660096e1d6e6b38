"""The ``eval`` section: judging a causal LM by what it generates, not only by its loss.

A lower loss can come with answers that never stop or ramble past the reference; the generation evaluation
(``scoring/suite.py``) generates answers for a few validation prompts and scores them against the references, before
and after training (or at every evaluation), with the run's samples written next to its metrics.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .section import Section

GENERATED_METRICS = ("stop_rate", "length_ratio", "answer_tokens")
"""What every generation evaluation reports besides ``eval.metrics``: the share of answers that ended with an
end-of-turn token before ``max_new_tokens``, answer tokens over reference tokens, and mean answer tokens."""


class EvalConfig(Section):
    """Generation evaluation of causal objectives (SFT and the preference objectives: the reference is the
    answer, or the chosen answer)."""

    generate: Literal["auto"] | bool = "auto"
    """``auto``: on for causal objectives whose data has prompts and answers (not plain ``text``) when the run has
    validation data; ``false`` turns it off; ``true`` insists (an error where it cannot run)."""
    examples: int = Field(32, gt=0)
    """Validation examples generated for (the first ones, so runs stay comparable). 32 × 64 new tokens on
    SmolLM2-135M costs a few seconds on 2 CPU cores (README: "Judging by outputs")."""
    max_new_tokens: Literal["auto"] | int = "auto"
    """``auto``: twice the longest reference answer among those examples plus 16, at most 256, so that a model
    that answers like the references has room to stop (a truncated answer counts as not stopped)."""
    every_eval: bool = False
    """Generate at every validation during training too (default: before and after training only)."""
    metrics: list[str] = ["rougeL", "chrf", "exact_match"]
    """Built-in metrics (``scoring.metrics.BUILTIN_TEXT_METRICS``), any ``evaluate`` metric by name that loads
    offline, or a function by dotted path (``my_pkg.metrics:score`` called with predictions and references).
    ``stop_rate``, ``length_ratio`` and ``answer_tokens`` are always reported."""
    regex: str | None = None
    """For the ``regex_match`` metric: the pattern a whole answer must match (structured outputs)."""
    select_by: str | None = None
    """The validation metric the best adapter and early stopping go by, e.g. ``rougeL`` (maximised) or ``loss``
    (minimised); a generation metric needs ``every_eval: true``. None: the objective's own rule (loss; accuracy
    for classifiers)."""
    temperature: float = Field(0.0, ge=0)
    """0: greedy decoding (reproducible; the default)."""
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(16, gt=0)
    """Prompts generated together (left-padded, with the KV cache)."""
    samples_in_card: int = Field(3, ge=0)
    """Sample answers (before and after) the model card shows."""

    @field_validator("metrics")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        repeated = sorted({m for m in v if v.count(m) > 1})
        if repeated:
            raise ValueError(f"names {repeated} more than once")
        return v

    @property
    def metric_names(self) -> list[str]:
        """Every metric a generation evaluation reports."""
        return [*self.metrics, *GENERATED_METRICS]
