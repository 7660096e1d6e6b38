"""scoring/suite.py: prompts and references from the data as training renders it, the metrics of a set of answers,
and the samples table."""

import json

import datasets
import pytest
from conftest import chat_rows, make_recipe

from lora_ft.data.chat import IGNORE
from lora_ft.errors import RecipeError
from lora_ft.objectives import objective_for
from lora_ft.scoring.generation import Answer
from lora_ft.scoring.suite import GenerationSuite, best_samples, samples_jsonl, samples_markdown


def _suite(tok, rows, tmp_path, fmt="messages", **eval_cfg):
    recipe = make_recipe(tmp_path, {}, tmp_path / "out", eval={"generate": "auto", **eval_cfg})
    objective = objective_for(recipe, tok)
    return GenerationSuite.build(recipe, objective, tok, datasets.Dataset.from_list(rows), fmt), objective


def test_a_prompt_is_exactly_what_training_puts_before_the_answer(tok, tmp_path):
    rows = chat_rows(5, 7)
    rows[1]["messages"] = [{"role": "system", "content": "Be brief."}, *rows[1]["messages"],
                           {"role": "user", "content": "And the owl?"}, {"role": "assistant", "content": "Hoot."}]
    suite, objective = _suite(tok, rows, tmp_path)
    assert len(suite.examples) == 5
    for row, example in zip(rows, suite.examples, strict=True):
        enc = objective.encode(row, "messages")
        labelled = {i for i, lab in enumerate(enc["labels"]) if lab != IGNORE}
        start = max(labelled)
        while start - 1 in labelled:  # back to the first token of the last answer
            start -= 1
        assert enc["input_ids"][:start] == example.prompt_ids
        assert example.reference == row["messages"][-1]["content"]
    assert suite.examples[1].prompt == "system: Be brief.\nuser: {}\nassistant: {}\nuser: And the owl?".format(
        rows[1]["messages"][1]["content"], rows[1]["messages"][2]["content"])


def test_max_new_tokens_auto_is_twice_the_longest_reference_plus_16_and_a_number_is_kept(tok, tmp_path):
    rows = chat_rows(4, 1)
    longest = max(len(tok(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    assert _suite(tok, rows, tmp_path)[0].max_new_tokens == 2 * longest + 16
    assert _suite(tok, rows, tmp_path, max_new_tokens=5)[0].max_new_tokens == 5
    assert len(_suite(tok, rows, tmp_path, examples=3)[0].examples) == 3


def test_plain_text_has_nothing_to_answer_so_auto_is_off_and_true_is_an_error(tok, tmp_path):
    rows = [{"text": "the cow says moo"}, {"text": "the dog says woof"}]
    assert _suite(tok, rows, tmp_path, fmt="text")[0] is None
    with pytest.raises(RecipeError, match="eval.generate true: data.format text has no prompts"):
        _suite(tok, rows, tmp_path, fmt="text", generate=True)


def test_no_validation_data_is_an_error_only_when_generation_is_insisted_on(tok, tmp_path):
    recipe = make_recipe(tmp_path, {}, tmp_path / "out", eval={"generate": True})
    objective = objective_for(recipe, tok)
    with pytest.raises(RecipeError, match="no validation data to generate for"):
        GenerationSuite.build(recipe, objective, tok, None, None)
    auto = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"generate": "auto"})})
    assert GenerationSuite.build(auto, objective, tok, None, None) is None


def test_stop_rate_and_lengths_are_counted_from_the_answers(tok, tmp_path):
    rows = chat_rows(4, 2)
    suite, _ = _suite(tok, rows, tmp_path, metrics=["exact_match"])
    refs = [r["messages"][-1]["content"] for r in rows]
    ref_tokens = sum(len(tok(r, add_special_tokens=False)["input_ids"]) + 1 for r in refs)
    answers = [Answer(refs[0], 9, True), Answer("no", 40, False), Answer(refs[2], 7, True), Answer("", 40, False)]
    m = suite.score(answers)
    assert m["exact_match"] == 0.5
    assert m["stop_rate"] == 0.5  # the two that ran out of tokens did not stop
    assert m["answer_tokens"] == (9 + 40 + 7 + 40) / 4
    assert m["length_ratio"] == pytest.approx((9 + 40 + 7 + 40) / ref_tokens)


def test_the_samples_table_holds_each_answer_before_and_after_and_escapes_markdown(tok, tmp_path):
    rows = chat_rows(3, 3)
    suite, _ = _suite(tok, rows, tmp_path, metrics=["rougeL"])
    before = [Answer("a | b", 40, False), Answer("x\ny", 3, True), Answer("", 40, False)]
    after = [Answer(r["messages"][-1]["content"], 8, True) for r in rows]
    after[2] = Answer("nothing alike", 40, False)
    table = suite.samples(before, after)
    assert [r["before"] for r in table] == ["a | b", "x\ny", ""]
    assert [r["after"] for r in table] == [a.text for a in after]
    assert [r["stopped_after"] for r in table] == [True, True, False]
    assert table[0]["rougeL_after"] == 1.0 and table[2]["rougeL_after"] < 0.5
    assert [json.loads(line) for line in samples_jsonl(table).splitlines()] == table
    md = samples_markdown(table, {"before": {"rougeL": 0.1}, "after": {"rougeL": 0.9}})
    assert "| rougeL | 0.1 | 0.9 |" in md
    assert "| 1 | " in md and "a \\| b ⟨no stop⟩" in md and "x<br>y |" in md
    assert md.count("\n| 3 | ") == 1  # one line per example: the line break became <br>
    assert best_samples(table, 2) == [table[0], table[1]]  # ranked by the first metric; ties in data order
    resumed = suite.samples(None, after)  # a run resumed from a checkpoint older than the samples
    assert resumed[0]["before"] is None and "| – |" in samples_markdown(resumed)
