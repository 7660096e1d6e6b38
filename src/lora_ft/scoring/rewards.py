"""Reward functions for online RL (GRPO): the built-ins that need no model, and a user's function by its path.

Every reward function is called as TRL 1.16's ``GRPOTrainer`` calls its reward functions, with keyword arguments:
``prompts`` (the prompts in words), ``completions`` (the sampled texts), ``completion_ids`` (their token ids) and
one list per data column (``answer=[...]``, every column of the rows but the prompt), and returns one float per
completion, or None where it does not apply. So a TRL reward function is used here unchanged, by its path
(``package.module:function``, imported as ``metrics.load_function`` imports a metric).

The built-ins (``recipe.objective.BUILTIN_REWARDS``):

- ``exact_match``: 1.0 where the stripped completion equals the stripped reference column, else 0.0.
- ``numeric_match``: 1.0 where the completion's last number equals the reference column's number (to 1e-6;
  ``1,000`` reads as 1000), else 0.0: the usual check of a math answer whatever words surround it.
- ``regex_match``: 1.0 where ``re.fullmatch(pattern, completion.strip())`` matches (a format check).
- ``length_penalty``: 0 up to ``target`` completion tokens, then linearly down to −1 at ``max_new_tokens``.

This module imports nothing of ours but ``errors``, ``recipe`` and ``scoring.metrics``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import RecipeError
from ..recipe.objective import BUILTIN_REWARDS, RewardSpec
from .metrics import load_function

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
"""A number as answers write it: an optional sign, digits with thousands commas, an optional decimal part."""


def last_number(text: str) -> float | None:
    """The last number in ``text`` (None if there is none)."""
    found = NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:  # "1,,": commas only after a digit; nothing left to read
        return None


def exact_match(completions: list[str], reference: Sequence[Any]) -> list[float]:
    return [float(c.strip() == str(r).strip()) for c, r in zip(completions, reference, strict=True)]


def numeric_match(completions: list[str], reference: Sequence[Any]) -> list[float]:
    out = []
    for c, r in zip(completions, reference, strict=True):
        got, want = last_number(c), r if isinstance(r, int | float) else last_number(str(r))
        out.append(float(got is not None and want is not None and math.isclose(got, float(want), abs_tol=1e-6)))
    return out


def regex_match(completions: list[str], pattern: str) -> list[float]:
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]


def length_penalty(completion_ids: list[list[int]], target: int, max_new_tokens: int) -> list[float]:
    span = max(1, max_new_tokens - target)
    return [-min(1.0, max(0, len(ids) - target) / span) for ids in completion_ids]


@dataclass(frozen=True)
class Reward:
    """One reward function of the recipe, ready to call on a batch of completions."""

    label: str
    """What its metric is reported as (``reward_<label>``)."""
    weight: float
    score: Callable[..., list[float | None]]
    user: bool = False
    """A user's function: what it raises is reported in one line naming it."""


def _builtin(spec: RewardSpec, max_new_tokens: int) -> Callable[..., list[float | None]]:
    """The built-in reward ``spec`` names, taking the keyword arguments every reward function gets."""
    def column(kwargs: dict[str, Any]) -> Sequence[Any]:
        if spec.column not in kwargs:
            raise RecipeError(f"objective.rewards {spec.name}: the data has no column '{spec.column}' to compare "
                              f"with (columns: {sorted(k for k in kwargs if k not in _CALL_KEYS)}); set its column")
        return kwargs[spec.column]

    if spec.name == "exact_match":
        return lambda completions, **kw: exact_match(completions, column(kw))
    if spec.name == "numeric_match":
        return lambda completions, **kw: numeric_match(completions, column(kw))
    if spec.name == "regex_match":
        return lambda completions, **kw: regex_match(completions, spec.pattern or "")
    return lambda completion_ids, **kw: length_penalty(completion_ids, spec.target, max_new_tokens)


_CALL_KEYS = ("prompts", "completions", "completion_ids")


def check_rewards(specs: Sequence[RewardSpec]) -> list[str]:
    """One problem per reward that cannot be used: a regex_match without a pattern (or one that does not compile),
    a function path that does not import, a label given twice. Imports the user's functions: before any model
    loads."""
    problems = []
    for spec in specs:
        if spec.name == "regex_match":
            try:
                re.compile(spec.pattern or "")
            except re.error as e:
                problems.append(f"objective.rewards regex_match: pattern {spec.pattern!r} does not compile: {e}")
            if not spec.pattern:
                problems.append("objective.rewards regex_match needs a pattern: {name: regex_match, pattern: ...}")
        elif spec.name not in BUILTIN_REWARDS:
            try:
                load_function(spec.name)
            except RecipeError as e:
                problems.append(str(e).replace("metric '", "objective.rewards '", 1))
    labels = [s.label for s in specs]
    problems += [f"objective.rewards: two rewards are reported as '{x}'; list each once"
                 for x in sorted({x for x in labels if labels.count(x) > 1})]
    return problems


def build_rewards(specs: Sequence[RewardSpec], max_new_tokens: int) -> list[Reward]:
    """The recipe's reward functions (``check_rewards`` found no problem)."""
    return [Reward(s.label, s.weight, _builtin(s, max_new_tokens)) if s.name in BUILTIN_REWARDS
            else Reward(s.label, s.weight, load_function(s.name), user=True) for s in specs]


def score(rewards: Sequence[Reward], prompts: list[str], completions: list[str], completion_ids: list[list[int]],
          columns: dict[str, list[Any]]) -> list[list[float]]:
    """Each reward's values for each completion, [reward][completion]; None (does not apply) becomes NaN.

    Args:
        rewards: from ``build_rewards``.
        prompts: each completion's prompt in words.
        completions: the completions' texts.
        completion_ids: their token ids.
        columns: data column → one value per completion.

    Raises:
        RecipeError: a user's function raised, or returned something other than one number per completion.
    """
    out = []
    for r in rewards:
        call = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
        if not r.user:
            values = r.score(**call)
        else:
            try:
                values = r.score(**call)
            except Exception as e:  # noqa: BLE001 - the user's code: one line naming it, not a traceback from it
                raise RecipeError(f"objective.rewards '{r.label}' raised {type(e).__name__}: {e}") from None
        if not isinstance(values, list | tuple) or len(values) != len(completions) or not all(
                v is None or isinstance(v, int | float) for v in values):
            raise RecipeError(f"objective.rewards '{r.label}' must return a list of {len(completions)} numbers (or "
                              f"None), one per completion; it returned {str(values)[:80]}")
        out.append([math.nan if v is None else float(v) for v in values])
    return out
