"""``lora-ft sweep``: every combination runs, results are ranked, failures are reported, not fatal."""

import csv
import importlib.util
import json
import sqlite3
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


def test_a_trial_row_keeps_the_validation_metrics_a_reader_compares_preference_runs_by():
    from lora_ft.training.sweep import _metrics

    after = {"validation": {"loss": 0.41234567, "examples": 32, "reward_accuracy": 0.90625, "reward_margin": 1.5,
                            "logp_chosen": -30.0}, "test": {"loss": 9.0}}
    assert _metrics({"after": after}) == {"loss": 0.412346, "reward_accuracy": 0.90625, "reward_margin": 1.5}


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
    pytest.importorskip("sqlalchemy")  # MLflow's database stores (MLflow 3 refuses its file: store)
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    trackers = ["mlflow"] + (["trackio"] if importlib.util.find_spec("trackio") else [])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama)}, "data": {"train": str(chat_data["train"])},
        "train": {"max_steps": 2, "trackers": trackers}, "output_dir": str(tmp_path / "exp")}))
    rows = run_sweep(str(recipe), ["lora.r=2,4"])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lora_ft-sweep-exp")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(Path(r["output_dir"]).name for r in rows)
    assert sorted(r.data.params["lora.r"] for r in runs) == ["2", "4"]
    assert all(len(client.get_metric_history(r.info.run_id, "loss")) == 2 for r in runs)
    if "trackio" in trackers:  # one Trackio project, its runs in one group (read from Trackio's SQLite database)
        from trackio.sqlite_storage import SQLiteStorage

        db = sqlite3.connect(SQLiteStorage.get_project_db_path("lora_ft-sweep-exp"))
        groups = {name: json.loads(config)["_Group"] for name, config in
                  db.execute("SELECT run_name, config FROM configs")}
        db.close()
        assert groups == {Path(r["output_dir"]).name: "lora_ft-sweep-exp" for r in rows}


def _sweep_recipe(tmp_path, tiny_llama, chat_data):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama)}, "lora": {"dropout": 0.0},
        "data": {"train": str(chat_data["train"]), "validation": str(chat_data["validation"]), "max_length": 128,
                 "max_eval_examples": 8},
        "train": {"max_steps": 2, "micro_batch_size": 8, "warmup": 0}, "output_dir": str(tmp_path / "sw")}))
    return recipe


def _adapters(root):
    return {p.parent.parent.name: p.read_bytes()
            for p in sorted(root.glob("trial-*/adapter/adapter_model.safetensors"))}


def test_sigterm_stops_the_whole_sweep_and_running_it_again_continues(tiny_llama, chat_data, tmp_path, capsys,
                                                                       monkeypatch):
    """A signal in trial 1 (landed inside its first training step by a hook) ends the sweep: trial 2 never starts,
    the table says which trial was interrupted, and the same command continues (trial 1 resumes, 2 trains)."""
    import os
    import signal

    from lora_ft.training.trainer import Trainer

    recipe = _sweep_recipe(tmp_path, tiny_llama, chat_data)
    real = Trainer.train_step

    def signalled(self, batches):
        if self.state.step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batches)

    monkeypatch.setattr(Trainer, "train_step", signalled)
    argv = ["sweep", str(recipe), "--grid", "lora.r=2,4"]
    assert main(argv) == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]
    root = tmp_path / "sw" / "sweep"
    assert err == (f"lora-ft: sweep interrupted in trial 1/2 (interrupted at step 1/2; checkpoint saved to "
                   f"{root}/trial-01-r-2/checkpoints/step-00000001); the trials before it are done and kept; continue "
                   f"the sweep with: lora-ft sweep {recipe} --grid lora.r=2,4 (finished trials are reused, this one "
                   "resumes)")
    assert sorted(p.name for p in root.iterdir()) == ["sweep.csv", "sweep.md", "trial-01-r-2"]
    assert list(csv.DictReader(open(root / "sweep.csv")))[0]["status"] == "interrupted"
    monkeypatch.undo()
    assert main(argv) == 0
    table = list(csv.DictReader(open(root / "sweep.csv")))
    assert [r["status"] for r in table] == ["ok", "ok"]
    steps = [json.loads(x)["step"] for x in (root / "trial-01-r-2" / "metrics.jsonl").read_text().splitlines()
             if "split" not in json.loads(x)]
    assert steps == [1, 2]  # resumed after step 1, not retrained


def test_running_a_sweep_again_never_destroys_its_trials_silently(tiny_llama, chat_data, tmp_path, capsys):
    recipe = _sweep_recipe(tmp_path, tiny_llama, chat_data)
    argv = ["sweep", str(recipe), "--grid", "lora.r=2,4"]
    assert main(argv) == 0
    root = tmp_path / "sw" / "sweep"
    trained = _adapters(root)
    assert len(trained) == 2
    # The same sweep again: finished trials are reused, not retrained.
    capsys.readouterr()
    assert main(argv) == 0
    assert _adapters(root) == trained
    assert [r["reused"] for r in csv.DictReader(open(root / "sweep.csv"))] == ["True", "True"]
    # Another base recipe: refused before anything trains, naming the trials and what changed ...
    assert main([*argv, "--set", "train.lr=1e-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    resolved = yaml.safe_load((root / "trial-01-r-2" / "run_config.yaml").read_text())["train"]["lr"]  # lr: auto
    assert err.startswith(f"lora-ft: error: the sweep folder {root} holds trials of another recipe; trial 1 ("
                          f"{root}/trial-01-r-2): train.lr {resolved!r} → 0.001; trial 2") and \
        err.endswith("pass --overwrite to retrain them, or choose another output_dir")
    assert _adapters(root) == trained
    # ... and retrained with --overwrite.
    assert main([*argv, "--set", "train.lr=1e-3", "--overwrite"]) == 0
    assert all(trained[k] != v for k, v in _adapters(root).items())
