"""Multi-label classification: detection, thresholds chosen on validation, scikit-learn's metrics, a tiny run."""

import json
import random

import numpy as np
import pytest
import torch
import yaml
from conftest import FILLER, TOPICS, build_bert_tokenizer, make_recipe, write_jsonl
from sklearn.metrics import accuracy_score, f1_score
from transformers import AutoModelForSequenceClassification

from lora_ft.cli import main
from lora_ft.errors import DataError
from lora_ft.objectives import MultiLabel, SequenceClassification, objective_for
from lora_ft.objectives.multilabel import best_thresholds, multilabel_metrics
from lora_ft.recipe import DataConfig, Recipe
from lora_ft.shipping.merge import merge_run
from lora_ft.training.trainer import train


def topic_rows(n: int, seed: int) -> list[dict]:
    """Texts mixing the words of 0 to 3 topics, labelled with those topics."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topics = sorted(rng.sample(sorted(TOPICS), rng.randint(0, 3)))
        words = [w for t in topics for w in rng.sample(TOPICS[t], 2)] + rng.sample(FILLER, 3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": topics})
    return rows


def _objective(tmp_path, rows: list[dict], **data) -> MultiLabel:
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = Recipe.model_validate({"model": {"task": "sequence_classification"}, "data": {"train": str(path), **data}})
    return objective_for(recipe, build_bert_tokenizer())


def test_a_label_column_of_lists_is_detected_as_multi_label_and_single_labels_are_not(tmp_path):
    assert type(_objective(tmp_path, topic_rows(4, 0))) is MultiLabel
    assert type(_objective(tmp_path, [{"text": "a b", "label": "x"}, {"text": "c", "label": "y"}])) \
        is SequenceClassification
    # CSV cells hold the list as JSON text
    (tmp_path / "t.csv").write_text('text,label\nrain cat,"[""weather"", ""animals""]"\n', encoding="utf-8")
    recipe = Recipe.model_validate({"model": {"task": "sequence_classification"},
                                    "data": {"train": str(tmp_path / "t.csv")}})
    assert type(objective_for(recipe, build_bert_tokenizer())) is MultiLabel
    # data.format classification insists on one label: the list is one line naming the row
    objective = _objective(tmp_path, topic_rows(4, 0), format="classification")
    assert type(objective) is SequenceClassification
    from conftest import prepare
    with pytest.raises(DataError, match=r"row 1, column 'label' is a list: several labels per example are multi-la"):
        prepare(DataConfig(train=str(tmp_path / "train.jsonl")), "sequence_classification", build_bert_tokenizer())


def test_thresholds_chosen_on_validation_change_the_test_predictions(tmp_path):
    objective = _objective(tmp_path, topic_rows(4, 0))
    objective.label2id = {"a": 0, "b": 1}
    # Label a's positives score 0.3, its negatives 0.1: at 0.5 nothing is predicted; label b is well calibrated.
    probs = torch.tensor([[0.3, 0.9], [0.3, 0.2], [0.1, 0.8], [0.1, 0.1]], dtype=torch.float64)
    truth = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0]], dtype=torch.float)
    values = {"loss": torch.ones(4), "probability": probs, "label": truth}
    objective.begin_split("test")
    untuned = objective.summarize(values)
    assert untuned["micro_f1"] == pytest.approx(f1_score(truth, probs >= 0.5, average="micro"))
    objective.begin_split("validation")
    objective.summarize(values)
    # Every threshold in (0.1, 0.3] separates label a; the one nearest 0.5 is kept. Label b: (0.2, 0.8].
    assert objective.thresholds == {"a": pytest.approx(0.3), "b": pytest.approx(0.5)}
    objective.begin_split("test")
    tuned = objective.summarize(values)
    assert tuned["micro_f1"] == 1.0 and tuned["subset_accuracy"] == 1.0 and untuned["subset_accuracy"] == 0.5
    assert tuned["micro_f1_at_half"] == untuned["micro_f1"]


def test_summarize_equals_scikit_learn_called_directly():
    rng = np.random.default_rng(0)
    truth = (rng.random((50, 4)) < 0.4).astype(int)
    truth[:, 3] = 0  # label d never occurs (and is never predicted below): it has no F1, it is not a 0
    probs = np.clip(truth * 0.5 + rng.random((50, 4)) * 0.6, 0, 1)
    probs[:, 3] *= 0.5  # below the 0.5 that a label without positives keeps
    cut = best_thresholds(probs, truth)
    objective = MultiLabel(DataConfig(), build_bert_tokenizer())
    objective.label2id = {n: i for i, n in enumerate("abcd")}
    objective.thresholds = dict(zip("abcd", cut.tolist(), strict=True))
    objective.begin_split("test")
    got = objective.summarize({"loss": torch.full((50,), 0.25), "probability": torch.tensor(probs),
                               "label": torch.tensor(truth)})
    predicted = probs >= cut
    assert not predicted[:, 3].any()
    assert got == pytest.approx({"loss": 0.25, "examples": 50, "micro_f1": f1_score(truth, predicted, average="micro"),
                                 "macro_f1": f1_score(truth[:, :3], predicted[:, :3], average="macro"),
                                 "subset_accuracy": accuracy_score(truth, predicted),
                                 "micro_f1_at_half": f1_score(truth, probs >= 0.5, average="micro")})
    assert not np.allclose(cut, 0.5)  # the thresholds in use are not the default


@pytest.fixture(scope="module")
def topics_run(tiny_bert, tmp_path_factory):
    d = tmp_path_factory.mktemp("topics")
    splits = {"train": write_jsonl(d / "train.jsonl", topic_rows(160, 1)),
              "validation": write_jsonl(d / "validation.jsonl", topic_rows(40, 2)),
              "test": write_jsonl(d / "test.jsonl", topic_rows(40, 3))}
    out = tmp_path_factory.mktemp("runs") / "topics"
    # The minimal recipe: no format, no thresholds named.
    train(make_recipe(tiny_bert, splits, out, model={"task": "sequence_classification"},
                      # the tiny model's rate is already 20× the default: its head is not given 50× more
                      train={"max_steps": 40, "lr": 1e-2, "head_lr": 1e-2, "micro_batch_size": 16}))
    return out


def test_a_tiny_multi_label_run_saves_its_thresholds_and_predict_applies_them(topics_run, tmp_path):
    results = json.loads((topics_run / "eval_results.json").read_text())
    assert set(results["after"]["test"]) >= {"micro_f1", "macro_f1", "subset_accuracy", "loss"}
    before, after = results["before"]["test"], results["after"]["test"]
    # Thresholds tuned on validation already give the untrained head "every label" (micro-F1 about 0.67 here).
    assert after["loss"] < before["loss"] and after["micro_f1"] > before["micro_f1"] + 0.05
    info = json.loads((topics_run / "run_info.json").read_text())
    assert info["format"] == "multilabel" and info["id2label"] == {"0": "animals", "1": "money", "2": "weather"}
    thresholds = info["objective"]["thresholds"]
    assert sorted(thresholds) == ["animals", "money", "weather"]
    # They are the ones the saved adapter's validation probabilities call for (chosen in the training loop's own
    # evaluation, not left at their defaults): recomputed here from predict's probabilities.
    validation = yaml.safe_load((topics_run / "run_config.yaml").read_text())["data"]["validation"]
    val_out = tmp_path / "val.jsonl"
    assert main(["predict", str(topics_run), "--data", validation, "--out", str(val_out)]) == 0
    names = ["animals", "money", "weather"]
    probs = np.array([[json.loads(x)["probabilities"][n] for n in names] for x in val_out.read_text().splitlines()])
    truth = np.array([[n in json.loads(x)["label"] for n in names] for x in open(validation, encoding="utf-8")])
    tuned = best_thresholds(probs, truth)
    assert [thresholds[n] for n in names] == pytest.approx(tuned.tolist(), abs=1e-9)
    assert results["after"]["validation"]["micro_f1"] == pytest.approx(
        multilabel_metrics((probs >= tuned).astype(int), truth.astype(int))["micro_f1"], abs=1e-6)

    data = write_jsonl(tmp_path / "new.jsonl", topic_rows(12, 4))
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(topics_run), "--data", str(data), "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(r["labels"] == [n for n, p in r["probabilities"].items() if p >= thresholds[n]] for r in rows)
    # predict reads the saved thresholds: rewritten to 0 and 1, every label is on (animals) or off (the others).
    (topics_run / "run_info.json").write_text(json.dumps(
        {**info, "objective": {"thresholds": {"animals": 0.0, "money": 1.0001, "weather": 1.0001}}}))
    try:
        assert main(["predict", str(topics_run), "--data", str(data), "--out", str(out)]) == 0
        assert {tuple(json.loads(x)["labels"]) for x in out.read_text().splitlines()} == {("animals",)}
    finally:
        (topics_run / "run_info.json").write_text(json.dumps(info))

    entry = merge_run(topics_run, examples=16)
    assert entry["passed"] and entry["positions"] == 16 * 3 and entry["kl_mean"] < 1e-6
    model = AutoModelForSequenceClassification.from_pretrained(topics_run / "merged")
    assert model.config.problem_type == "multi_label_classification"
    assert model.config.label_thresholds == pytest.approx(thresholds)
    merged_out = tmp_path / "m.jsonl"
    assert main(["predict", str(topics_run), "--merged", "--data", str(data), "--out", str(merged_out)]) == 0
    merged_rows = [json.loads(x) for x in merged_out.read_text().splitlines()]
    assert [r["labels"] for r in merged_rows] == [r["labels"] for r in rows]
