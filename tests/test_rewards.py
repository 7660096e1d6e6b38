"""Reward functions (scoring/rewards.py): the built-ins' values, a user's function called as TRL calls reward
functions, and the one-line problems of unusable ones."""

import math

import pytest

from lora_ft.errors import RecipeError
from lora_ft.recipe.objective import BUILTIN_REWARDS, RewardSpec
from lora_ft.scoring.rewards import build_rewards, check_rewards, last_number, score


def seen_by_trl_keywords(prompts, completions, completion_ids, answer, **columns):
    """A TRL-style reward function: keyword arguments, extra columns in ``columns``."""
    return [float(len(c) == len(ids)) + (0.5 if a in p else 0.0) + columns["bonus"][i]
            for i, (p, c, ids, a) in enumerate(zip(prompts, completions, completion_ids, answer, strict=True))]


def returns_none_for_empty(completions, **_):
    return [None if not c else 1.0 for c in completions]


def returns_one_value(completions, **_):
    return [1.0]


def raises(completions, **_):
    raise KeyError("answer")


def values(specs, completions, ids=None, max_new_tokens=10, **columns):
    rewards = build_rewards([RewardSpec.model_validate(s if isinstance(s, dict) else {"name": s}) for s in specs],
                            max_new_tokens)
    ids = ids or [[1] * len(c) for c in completions]
    return score(rewards, ["p"] * len(completions), completions, ids, columns)


def test_last_number_reads_signs_decimals_and_thousands_commas():
    assert last_number("3 + 4 = 7.") == 7.0
    assert last_number("owes -12.5 dollars") == -12.5
    assert last_number("about 1,234 people") == 1234.0
    assert last_number("no digits") is None


def test_numeric_match_compares_the_last_number_with_the_reference_whatever_surrounds_it():
    got = values(["numeric_match"], ["The answer is 12.", "12 or 13? 13", "twelve", "12.0"],
                 answer=[12, "12", "12", "#### 12"])
    assert got == [[1.0, 0.0, 0.0, 1.0]]


def test_exact_match_regex_match_and_length_penalty_values():
    assert values(["exact_match"], [" moo ", "Moo"], answer=["moo", "moo"]) == [[1.0, 0.0]]
    pattern = {"name": "regex_match", "pattern": r"<answer>\d+</answer>"}
    assert values([pattern], ["<answer>7</answer>", "<answer>7</answer> done"]) == [[1.0, 0.0]]
    penalty = {"name": "length_penalty", "target": 2}
    assert values([penalty], ["a", "b", "c"], ids=[[1], [1] * 6, [1] * 10], max_new_tokens=10) == [[-0.0, -0.5,
                                                                                                     -1.0]]


def test_a_user_function_is_called_with_trl_s_keywords_and_every_data_column():
    got = values(["test_rewards:seen_by_trl_keywords"], ["ab", "c"], ids=[[5, 6], [7, 8]],
                 answer=["p", "x"], bonus=[0.25, 0.0])
    assert got == [[1.75, 0.0]]


def test_none_from_a_reward_is_nan_and_a_wrong_shape_or_an_exception_is_one_line_naming_it():
    got = values(["test_rewards:returns_none_for_empty"], ["", "a"])
    assert math.isnan(got[0][0]) and got[0][1] == 1.0
    with pytest.raises(RecipeError, match="'returns_one_value' must return a list of 2 numbers"):
        values(["test_rewards:returns_one_value"], ["a", "b"])
    with pytest.raises(RecipeError, match="'raises' raised KeyError: 'answer'"):
        values(["test_rewards:raises"], ["a"])
    with pytest.raises(RecipeError, match="no column 'answer' to compare with .columns: \\['label'\\]"):
        values(["exact_match"], ["a"], label=["x"])


def test_check_rewards_names_each_unusable_reward():
    specs = [RewardSpec(name="regex_match", pattern="("), RewardSpec(name="nosuchpkg.mod:f"),
             RewardSpec(name="math.exp"), RewardSpec(name="cmath:exp")]
    problems = check_rewards(specs)
    assert len(problems) == 3, problems
    assert "pattern '(' does not compile" in problems[0]
    assert problems[1].startswith("objective.rewards 'nosuchpkg.mod:f': cannot import module 'nosuchpkg.mod'")
    assert problems[2] == "objective.rewards: two rewards are reported as 'exp'; list each once"
    assert check_rewards([RewardSpec(name=n, pattern="x") for n in BUILTIN_REWARDS]) == []
