"""Regression: detection of scores, scipy's correlations, selection by Spearman, a tiny run merged and predicting."""

import json
import random

import pytest
import torch
from conftest import TOPICS, build_bert_tokenizer, make_recipe, write_jsonl
from scipy.stats import pearsonr, spearmanr
from transformers import AutoModelForSequenceClassification

from lora_ft.cli import main
from lora_ft.errors import DataError
from lora_ft.objectives import Regression, SequenceClassification, objective_for
from lora_ft.recipe import DataConfig, Recipe
from lora_ft.shipping.merge import merge_run
from lora_ft.training.trainer import train


def score_rows(n: int, seed: int) -> list[dict]:
    """Texts of 4 words; the score is 0.5 per animal word (0 to 2)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(0, 4)
        words = rng.sample(TOPICS["animals"], k) + rng.sample(TOPICS["money"], 4 - k)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": 0.5 * k})
    return rows


def _objective(tmp_path, rows: list[dict], task: str = "sequence_classification", **data):
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = Recipe.model_validate({"model": {"task": task}, "data": {"train": str(path), **data}})
    return objective_for(recipe, build_bert_tokenizer())


def test_scores_with_fractions_are_detected_as_regression_and_integer_labels_stay_classes(tmp_path):
    assert type(_objective(tmp_path, [{"text": "a", "label": 0.5}, {"text": "b", "label": 2}])) is Regression
    assert type(_objective(tmp_path, [{"text": "a", "label": 1}, {"text": "b", "label": 2.0}])) \
        is SequenceClassification
    assert type(_objective(tmp_path, [{"text": "a", "label": 1}, {"text": "b", "label": 2}], task="regression")) \
        is Regression
    assert type(_objective(tmp_path, [{"text": "a", "label": 1}, {"text": "b", "label": 3}], format="regression")) \
        is Regression


def test_a_label_that_is_no_number_is_one_line_naming_its_row(tmp_path):
    from conftest import prepare

    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 0.5}, {"text": "b", "label": "high"}])
    with pytest.raises(DataError, match=r"t.jsonl row 2, column 'label' is 'high', not a finite number"):
        prepare(DataConfig(train=str(path)), "regression", build_bert_tokenizer())


def test_a_csv_label_that_is_no_number_is_one_line_naming_its_row(tmp_path):
    from conftest import prepare

    path = tmp_path / "t.csv"
    path.write_text("text,label\nhello,3.5\nbye,abc\n")  # CSV: the column is read as text
    with pytest.raises(DataError, match=r"t.csv row 2, column 'label' is 'abc', not a finite number"):
        prepare(DataConfig(train=str(path)), "regression", build_bert_tokenizer())


def test_summarize_reports_scipy_s_pearson_and_spearman_and_the_rmse():
    objective = Regression(DataConfig(), build_bert_tokenizer())
    preds, labels = [0.1, 0.4, 0.35, 0.8, 0.7], [0.0, 0.5, 0.5, 1.0, 0.6]
    got = objective.summarize({"loss": torch.tensor([(p - t) ** 2 for p, t in zip(preds, labels, strict=True)]),
                               "prediction": torch.tensor(preds), "label": torch.tensor(labels)})
    mse = sum((p - t) ** 2 for p, t in zip(preds, labels, strict=True)) / 5
    assert got == pytest.approx({"loss": mse, "examples": 5, "rmse": mse ** 0.5,
                                 "pearson": pearsonr(preds, labels)[0], "spearman": spearmanr(preds, labels)[0]})
    # constant predictions (an untrained head can give them) have no correlation: 0, not NaN
    flat = objective.summarize({"loss": torch.ones(3), "prediction": torch.zeros(3), "label": torch.arange(3.0)})
    assert flat["pearson"] == flat["spearman"] == 0.0


def test_the_best_adapter_is_the_one_of_highest_spearman_and_loss_breaks_ties():
    objective = Regression(DataConfig(), build_bert_tokenizer())
    better = objective.selection_key({"spearman": 0.8, "loss": 0.5})
    assert better < objective.selection_key({"spearman": 0.7, "loss": 0.1})
    assert objective.selection_key({"spearman": 0.8, "loss": 0.4}) < better


@pytest.fixture(scope="module")
def score_run(tiny_bert, tmp_path_factory):
    d = tmp_path_factory.mktemp("scores")
    splits = {"train": write_jsonl(d / "train.jsonl", score_rows(160, 1)),
              "validation": write_jsonl(d / "validation.jsonl", score_rows(40, 2))}
    out = tmp_path_factory.mktemp("runs") / "scores"
    # model.task regression is not named: the fractional scores are detected
    train(make_recipe(tiny_bert, splits, out, model={"task": "sequence_classification"},
                      train={"max_steps": 40, "lr": 1e-2, "micro_batch_size": 16}))
    return out


def test_a_tiny_regression_run_learns_the_score_and_its_merge_predicts_alike(score_run, tmp_path):
    results = json.loads((score_run / "eval_results.json").read_text())
    before, after = results["before"]["validation"], results["after"]["validation"]
    assert set(after) >= {"loss", "rmse", "pearson", "spearman"}
    assert after["spearman"] > before["spearman"] + 0.3 and after["loss"] < before["loss"]
    entry = merge_run(score_run, examples=16)
    assert entry["passed"] and entry["positions"] == 16 and entry["max_abs_logit_diff"] < 1e-4
    model = AutoModelForSequenceClassification.from_pretrained(score_run / "merged")
    assert model.config.problem_type == "regression" and model.config.num_labels == 1

    data = write_jsonl(tmp_path / "new.jsonl", score_rows(6, 3))
    predicted = []
    for merged in ([], ["--merged"]):
        out = tmp_path / f"p{len(merged)}.jsonl"
        assert main(["predict", str(score_run), "--data", str(data), "--out", str(out), *merged]) == 0
        predicted.append([json.loads(x)["prediction"] for x in out.read_text().splitlines()])
    assert predicted[0] == pytest.approx(predicted[1], abs=1e-4) and len(set(predicted[0])) > 1
