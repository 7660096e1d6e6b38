"""scoring.metrics: values equal the reference implementations' (evaluate's documented examples, rouge-score,
sacrebleu and scikit-learn called directly) on fixed strings; names are checked with one line per problem."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import evaluate
import numpy as np
import pytest
from rouge_score import rouge_scorer, scoring
from sacrebleu.metrics import BLEU, CHRF
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from lora_ft.errors import RecipeError
from lora_ft.scoring import (
    BUILTIN_TEXT_METRICS,
    bleu_score,
    check_metric_names,
    classification_metrics,
    score_texts,
)

PREDICTIONS = ["the cat sat on the mat", "a quick brown fox", "hello world", "lorem ipsum dolor sit amet",
               "The answer is 42.", "completely different words here", "It's 3.14, roughly - said Bob."]
REFERENCES = ["the cat is on the mat", "the quick brown fox jumps", "hello there world", "lorem ipsum dolor",
              "the answer is forty-two", "nothing in common", "It is 3.14, roughly, said Bob!"]


@pytest.fixture(autouse=True)
def evaluate_module_cache(tmp_path, monkeypatch):
    """evaluate.load copies scripts into a module cache it imports from: a fresh one per test, not the home's."""
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "hf_modules")
    # A module cache an earlier evaluate.load put on sys.path (another test's, the default one) would shadow this
    # one's evaluate_modules package.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p) / "evaluate_modules").is_dir()])
    for name in [n for n in sys.modules if n.split(".")[0] == "evaluate_modules"]:
        monkeypatch.delitem(sys.modules, name)


def test_the_issue_s_metric_names_are_built_in():
    assert {"rougeL", "rouge1", "rouge2", "bleu", "sacrebleu", "chrf", "exact_match", "json_valid",
            "regex_match"} <= set(BUILTIN_TEXT_METRICS)


def test_rouge_of_evaluate_s_documented_example_is_one_for_every_type():
    # evaluate's rouge docstring: identical texts -> {'rouge1': 1.0, 'rouge2': 1.0, 'rougeL': 1.0, 'rougeLsum': 1.0}
    texts = ["hello there", "general kenobi"]
    assert score_texts(["rouge"], texts, texts) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0}


def test_rouge_is_the_mean_of_rouge_score_f_measures_and_inside_evaluate_s_bootstrap_interval():
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=False)
    per_pair = [scorer.score(r, p) for p, r in zip(PREDICTIONS, REFERENCES, strict=True)]
    got = score_texts(["rougeL", "rouge1", "rouge2", "rougeLsum"], PREDICTIONS, REFERENCES)
    assert list(got) == ["rougeL", "rouge1", "rouge2", "rougeLsum"]
    for t in types:
        assert got[t] == pytest.approx(np.mean([s[t].fmeasure for s in per_pair]), rel=1e-12)
        assert 0.2 < got[t] < 0.9  # not a degenerate value that any implementation would hit
    # evaluate reports BootstrapAggregator's mid (a resampled estimate of this mean): ours lies in its interval
    np.random.seed(0)
    aggregator = scoring.BootstrapAggregator()
    for s in per_pair:
        aggregator.add_scores(s)
    for t, agg in aggregator.aggregate().items():
        assert agg.low.fmeasure <= got[t] <= agg.high.fmeasure
        assert abs(agg.mid.fmeasure - got[t]) < 0.03


def test_rouge_keeps_rouge_score_s_tokenizer_and_no_stemmer():
    # rouge-score lowercases and drops non-alphanumerics; without the stemmer "cats" and "cat" differ
    got = score_texts(["rouge1"], ["Cats, RUNNING!"], ["cat running"])
    assert got["rouge1"] == pytest.approx(0.5)


def test_bleu_equals_evaluate_s_documented_examples():
    # evaluate's bleu README, one reference per prediction: bleu 1.0
    predictions = ["hello there general kenobi", "foo bar foobar"]
    assert score_texts(["bleu"], predictions, predictions) == {"bleu": 1.0}


def test_bleu_hand_checked_precisions_and_brevity_penalty():
    # 1..4-gram precisions 4/5, 3/4, 2/3, 1/2, same length: (4/5 * 3/4 * 2/3 * 1/2) ** (1/4)
    assert bleu_score(["a b c d e"], ["a b c d f"]) == pytest.approx(0.2 ** 0.25, rel=1e-12)
    # every n-gram matches, 4 tokens for 5: brevity penalty exp(1 - 5/4)
    assert bleu_score(["a b c d"], ["a b c d e"]) == pytest.approx(math.exp(-0.25), rel=1e-12)
    # no 4-gram match anywhere: 0, not a smoothed value
    assert bleu_score(["the cat sat on the mat"], ["the cat is on the mat"]) == 0.0
    assert bleu_score([""], ["something"]) == 0.0


@pytest.mark.parametrize("n", [3, 5, 7])
def test_bleu_equals_sacrebleu_unsmoothed_with_one_reference_each(n):
    # With one reference per prediction and no smoothing, sacrebleu's BLEU is the same algorithm (13a tokens,
    # corpus-summed clipped counts, brevity penalty): an independent check of our implementation.
    preds, refs = PREDICTIONS[:n], REFERENCES[:n]
    preds = [*preds, "a b c d e f g h"]  # gives the corpus a match of every order, so the score is not 0
    refs = [*refs, "a b c d e f g i"]
    expected = BLEU(smooth_method="none").corpus_score(preds, [refs]).score / 100
    assert expected > 0.1
    assert bleu_score(preds, refs) == pytest.approx(expected, rel=1e-12)


def test_sacrebleu_and_chrf_equal_evaluate_s_documented_values():
    # evaluate's sacrebleu docstring example 1 (each prediction equals its first reference): 100.0
    preds = ["hello there general kenobi", "foo bar foobar"]
    assert round(score_texts(["sacrebleu"], preds, preds)["sacrebleu"], 1) == 100.0
    # evaluate's chrf docstring example 1: 84.64214891738334
    preds = ["The relationship between cats and dogs is not exactly friendly.",
             "a good bookshop is just a genteel black hole that knows how to read."]
    refs = ["The relationship between dogs and cats is not exactly friendly.",
            "A good bookshop is just a genteel Black Hole that knows how to read."]
    assert score_texts(["chrf"], preds, refs)["chrf"] == pytest.approx(84.64214891738334, rel=1e-12)


def test_sacrebleu_and_chrf_equal_the_library_s_defaults_called_directly():
    got = score_texts(["sacrebleu", "chrf"], PREDICTIONS, REFERENCES)
    assert got["sacrebleu"] == pytest.approx(BLEU(smooth_method="exp", tokenize="13a").corpus_score(
        PREDICTIONS, [REFERENCES]).score, rel=1e-12)
    assert got["chrf"] == pytest.approx(CHRF(char_order=6, word_order=0, beta=2).corpus_score(
        PREDICTIONS, [REFERENCES]).score, rel=1e-12)
    assert 5 < got["sacrebleu"] < 60 and 20 < got["chrf"] < 90


def test_exact_match_equals_evaluate_s_documented_examples_and_is_strict():
    # evaluate's exact_match docstring, default arguments: 0.25 and 0.33
    refs = ["the cat", "theater", "YELLING", "agent007"]
    preds = ["cat?", "theater", "yelling", "agent"]
    assert score_texts(["exact_match"], preds, refs) == {"exact_match": 0.25}
    refs = ["The cat sat on the mat.", "Theaters are great.", "It's like comparing oranges and apples."]
    preds = ["The cat sat on the mat?", "Theaters are great.", "It's like comparing apples and oranges."]
    assert round(score_texts(["exact_match"], preds, refs)["exact_match"], 2) == 0.33
    # no folding of case or whitespace; two empty strings match; numpy's dropped trailing NULs as in evaluate
    pairs = {("a ", "a"): 0.0, ("A", "a"): 0.0, ("", ""): 1.0, ("b\0", "b"): 1.0, ("x", "x"): 1.0}
    for (pred, ref), expected in pairs.items():
        assert score_texts(["exact_match"], [pred], [ref]) == {"exact_match": expected}, (pred, ref)


def test_json_valid_counts_objects_and_arrays_only():
    preds = ['{"a": 1}', ' [1, 2]\n', '{"nested": {"b": [true, null]}}',  # valid
             "42", '"text"', "null", "{a: 1}", '```json\n{"a": 1}\n```', "", '{"a": 1} trailing', "\ud800"]
    assert score_texts(["json_valid"], preds, [""] * len(preds)) == {"json_valid": 3 / 11}


def test_regex_match_is_a_full_match_after_stripping():
    regex = r"\d{3}-\d{4}"
    preds = ["555-1234", "  555-1234\n", "call 555-1234", "555-12345", "5551234"]
    assert score_texts(["regex_match"], preds, [""] * 5, regex=regex) == {"regex_match": 2 / 5}
    with pytest.raises(RecipeError, match="needs a regex"):
        score_texts(["regex_match"], preds, [""] * 5)


def test_unusable_names_are_one_problem_each_with_did_you_mean():
    problems = check_metric_names(["rougel", "bleu", "no_such_metric_xyz", "regex_match", "bleu"], "([a-z")
    assert len(problems) == 4, problems
    regex_problem, twice, rougel, unknown = problems
    assert regex_problem == "regex '([a-z' does not compile: unterminated character set at position 1"
    assert twice == "metric 'bleu' is listed 2 times"
    assert rougel.startswith("metric 'rougel' is not built in (did you mean 'rougeL'?), and evaluate.load")
    assert "neither in its module cache nor on the Hugging Face Hub" in rougel
    assert "rougeL, rougeLsum, bleu" in rougel and "package.module:function" in rougel
    assert unknown.startswith("metric 'no_such_metric_xyz' is not built in, and evaluate.load")
    assert check_metric_names(["regex_match"], None) == [
        "metric 'regex_match' needs a regex to match; give one or drop the metric"]
    assert check_metric_names(list(BUILTIN_TEXT_METRICS), r"\d+") == []


def test_bad_function_paths_are_named_with_the_fix():
    missing_module, missing_function = check_metric_names(["nowhere_pkg.mod:score", "json:loadz"], None)
    assert missing_module == ("metric 'nowhere_pkg.mod:score': cannot import module 'nowhere_pkg.mod' (No module "
                              "named 'nowhere_pkg'); install it or put its folder on PYTHONPATH")
    assert missing_function == "metric 'json:loadz': module 'json' has no function 'loadz' (did you mean 'load'?)"
    with pytest.raises(RecipeError, match="cannot import module 'nowhere_pkg.mod'"):
        score_texts(["nowhere_pkg.mod:score"], ["a"], ["a"])


@pytest.fixture
def user_metrics(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(textwrap.dedent("""
        def keyword_hit(predictions, references):
            return sum(r.split()[0] in p for p, r in zip(predictions, references)) / len(predictions)

        def lengths(predictions, references):
            return {"chars": sum(map(len, predictions)) / len(predictions), "per_example": [1, 2], "n": 2}

        def words(predictions, references):
            return "not a number"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_user_function_by_dotted_path_is_scored_under_its_name(user_metrics):
    names = ["my_metrics:keyword_hit", "my_metrics.keyword_hit", "my_metrics:lengths", "exact_match"]
    assert check_metric_names(names, None) == []
    got = score_texts(names, ["the cat", "a dog", "cow"], ["cat x", "cow y", "cow z"])
    assert got == {"my_metrics:keyword_hit": 2 / 3, "my_metrics.keyword_hit": 2 / 3,
                   "my_metrics:lengths/chars": 5.0, "my_metrics:lengths/n": 2.0, "exact_match": 0.0}
    with pytest.raises(RecipeError, match="'my_metrics:words' returned str without a number"):
        score_texts(["my_metrics:words"], ["a"], ["a"])


def test_an_evaluate_module_that_loads_offline_is_accepted_and_computed(tmp_path):
    # a local evaluate script: what evaluate.load finds without the Hub, like a cached module
    folder = tmp_path / "char_overlap"
    folder.mkdir()
    (folder / "char_overlap.py").write_text(textwrap.dedent("""
        import datasets
        import evaluate

        class CharOverlap(evaluate.Metric):
            def _info(self):
                return evaluate.MetricInfo(description="", citation="", inputs_description="",
                    features=datasets.Features({"predictions": datasets.Value("string"),
                                                "references": datasets.Value("string")}))

            def _compute(self, predictions, references):
                same = [len(set(p) & set(r)) / len(set(r)) for p, r in zip(predictions, references)]
                return {"char_overlap": sum(same) / len(same), "pairs": len(same), "detail": same}
    """))
    name = str(folder / "char_overlap.py")
    assert check_metric_names([name], None) == []
    got = score_texts([name], ["ab", "xyz"], ["abcd", "x"])
    assert got == {f"{name}/char_overlap": pytest.approx(0.75), f"{name}/pairs": 2.0}


def test_score_texts_refuses_unequal_or_empty_inputs():
    with pytest.raises(ValueError, match="one reference per prediction"):
        score_texts(["bleu"], ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one prediction"):
        score_texts(["bleu"], [], [])


def test_classification_metrics_equal_scikit_learn_on_a_fixed_confusion():
    labels = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    preds = [0, 0, 1, 2, 1, 1, 0, 2, 2, 2, 1, 2]
    got = classification_metrics(preds, labels, 3)
    assert got == pytest.approx({
        "accuracy": accuracy_score(labels, preds),
        "f1_macro": f1_score(labels, preds, average="macro"),
        "f1_micro": f1_score(labels, preds, average="micro"),
        "precision_macro": precision_score(labels, preds, average="macro"),
        "recall_macro": recall_score(labels, preds, average="macro")}, rel=1e-12)
    # by hand: class 0 P 2/3 R 2/4, class 1 P 2/4 R 2/3, class 2 P 4/5 R 4/5
    assert got["accuracy"] == pytest.approx(8 / 12)
    assert got["precision_macro"] == pytest.approx((2 / 3 + 2 / 4 + 4 / 5) / 3)
    assert got["recall_macro"] == pytest.approx((2 / 4 + 2 / 3 + 4 / 5) / 3)
    assert got["f1_macro"] == pytest.approx((4 / 7 + 4 / 7 + 4 / 5) / 3)


def test_a_class_absent_from_the_split_and_never_predicted_does_not_lower_the_macro_scores():
    got = classification_metrics([0, 1, 2, 2], [0, 1, 2, 2], 4)
    assert got == {"accuracy": 1.0, "f1_macro": 1.0, "f1_micro": 1.0, "precision_macro": 1.0, "recall_macro": 1.0}
    # a predicted class that never occurs does count: its F1 (and precision) is 0
    assert classification_metrics([3, 1], [0, 1], 4)["f1_macro"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"class ids \[4\] outside 0..3"):
        classification_metrics([4], [0], 4)
