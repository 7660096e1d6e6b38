"""``lora-ft sweep``: every combination runs, results are ranked, failures are reported, not fatal."""

import csv
from pathlib import Path

import pytest
import yaml

from lora_ft.cli import main
from lora_ft.errors import UsageError
from lora_ft.training.sweep import parse_grid, run_sweep


def test_parse_grid():
    assert parse_grid(["lora.r=4,8", "train.lr=1e-3,3e-3"]) == {"lora.r": [4, 8], "train.lr": [1e-3, 3e-3]}
    with pytest.raises(UsageError, match="section.key=value1,value2"):
        parse_grid(["lora.r"])


def test_two_by_two_sweep_ranks_four_trials(tiny_llama, chat_data, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama)},
        "data": {"train": str(chat_data["train"]), "validation": str(chat_data["validation"])},
        "lora": {"dropout": 0.0}, "train": {"max_steps": 6, "micro_batch_size": 8, "warmup": 0},
        "output_dir": str(tmp_path / "sw")}))
    rows = run_sweep(str(recipe), ["lora.r=2,8", "train.lr=1e-4,1e-2"])
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    losses = [r["loss"] for r in rows]
    assert losses == sorted(losses)  # ranked, best first
    assert rows[0]["train.lr"] == 1e-2  # 6 steps at 1e-4 barely move; the high rate must win
    table = list(csv.DictReader(open(tmp_path / "sw" / "sweep" / "sweep.csv")))
    assert len(table) == 4 and float(table[0]["loss"]) == losses[0]
    assert (tmp_path / "sw" / "sweep" / "sweep.md").read_text().count("\n") == 6


def test_failed_trial_is_reported_not_fatal(tiny_llama, chat_data, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama)}, "data": {"train": str(chat_data["train"])},
        "train": {"max_steps": 2}, "output_dir": str(tmp_path / "sw")}))
    code = main(["sweep", str(recipe), "--grid", "lora.target_modules=[q_proj],[nope]"])
    out = capsys.readouterr().out
    assert code == 0 and "status=ok" in out and "status=failed" in out and "match no linear layer" in out


def test_sweep_trials_are_runs_of_one_tracker_experiment(tiny_llama, chat_data, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama)}, "data": {"train": str(chat_data["train"])},
        "train": {"max_steps": 2, "trackers": ["mlflow"]}, "output_dir": str(tmp_path / "exp")}))
    rows = run_sweep(str(recipe), ["lora.r=2,4"])
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    experiment = client.get_experiment_by_name("lora_ft-sweep-exp")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(Path(r["output_dir"]).name for r in rows)
    assert sorted(r.data.params["lora.r"] for r in runs) == ["2", "4"]
    assert all(len(client.get_metric_history(r.info.run_id, "loss")) == 2 for r in runs)
