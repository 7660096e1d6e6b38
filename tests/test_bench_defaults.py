"""scripts/bench_defaults.py: the pure helpers (what the minimal recipe holds, what the sweep tries and keeps)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from lora_ft.recipe import load_recipe

ROOT = Path(__file__).parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return importlib.import_module("bench_defaults")


def test_the_minimal_recipe_names_model_task_quantization_and_data_only_and_loads(bench, tmp_path):
    for task, model, pair in (("man-pair", "sequence_classification", "text_pair"), ("whatis", "causal_lm", None)):
        path = tmp_path / f"{task}.yaml"
        path.write_text(yaml.safe_dump(bench.minimal_recipe(task, tmp_path / task, tmp_path / "run")))
        written = yaml.safe_load(path.read_text())
        assert set(written) == {"model", "data", "output_dir"}  # no train:, lora:, freeze: section
        assert set(written["data"]) == {"train", "validation", "test"} | ({"text_pair_column"} if pair else set())
        recipe = load_recipe(path)
        assert (recipe.model.task, recipe.model.quant, recipe.data.text_pair_column) == (model, "nf4", pair)
        assert recipe.data.test == str(tmp_path / task / "test.jsonl")


def test_the_sweep_tries_half_and_double_the_resolved_learning_rate(bench):
    assert bench.sweep_lrs(5e-4) == [2.5e-4, 1e-3]
    assert bench.sweep_lrs(2e-4) == [1e-4, 4e-4]


def test_the_sweep_best_is_ranked_on_validation_not_on_test(bench):
    after = {"minimal": {"validation": {"accuracy": 0.80, "loss": 0.50}, "test": {"accuracy": 0.90, "loss": 0.3}},
             "lr=0.00025": {"validation": {"accuracy": 0.85, "loss": 0.60}, "test": {"accuracy": 0.70, "loss": 0.9}},
             "lr=0.001": {"validation": {"accuracy": 0.85, "loss": 0.55}, "test": {"accuracy": 0.60, "loss": 1.0}}}
    assert bench.pick_best(after, "classification") == "lr=0.001"  # accuracy ties: the lower validation loss
    assert bench.pick_best(after, "generation") == "minimal"  # the lowest validation loss, whatever test says
