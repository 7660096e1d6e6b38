"""What the experiment trackers get, read back from what TensorBoard, MLflow, W&B and Trackio wrote."""

import json
import logging
import sqlite3
from pathlib import Path
from typing import get_args

import pytest
from conftest import make_recipe, metrics_rows

from lora_ft.recipe import TrainConfig
from lora_ft.training import report
from lora_ft.training.report import available_trackers, tracker_run
from lora_ft.training.trainer import train

TRACKERS = get_args(TrainConfig.model_fields["trackers"].annotation.__args__[0])


@pytest.fixture(scope="module")
def tracked_run(tiny_llama, chat_data, tmp_path_factory):
    """A 4-step run with validation every 2 steps and the forgetting guard, logged to TensorBoard, MLflow (a SQLite
    database: MLflow 3 refuses its file: store, in maintenance mode) and, where they are installed, W&B in offline
    mode and Trackio (a local SQLite database in TRACKIO_DIR, set by conftest)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")  # MLflow's database stores (mlflow-skinny leaves it out)
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        splits = {k: v for k, v in chat_data.items() if k != "test"}
        recipe = make_recipe(tiny_llama, splits, root / "run", forgetting={"enabled": True, "max_examples": 4},
                             train={"max_steps": 4, "eval_every": 2,
                                    "trackers": ["tensorboard", "mlflow", "wandb", "trackio"]})
        train(recipe)
    return root


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in {e.parent for e in folder.rglob("events.out.tfevents*")}:
        acc = EventAccumulator(str(events))
        acc.Reload()
        scalars.update({t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]})
    return scalars


def logged(root) -> dict:
    """What metrics.jsonl and run_info.json say: the reference for every tracker."""
    rows = metrics_rows(root / "run")
    return {"loss": [(r["step"], r["loss"]) for r in rows if "split" not in r and "loss" in r],
            "validation/loss": [(r["step"], r["loss"]) for r in rows if r.get("split") == "validation"],
            "forgetting/kl": [(r["step"], r["kl"]) for r in rows if r.get("split") == "forgetting"
                              and not r.get("final")],
            "memory": json.loads((root / "run" / "run_info.json").read_text())["memory"]}


def assert_as_logged(history: dict[str, list[tuple[int, float]]], ref: dict) -> None:
    """A tracker's ``history`` (key → [(step, value)]) holds the per-step loss, the validation losses and the
    forgetting KL at the steps and values of ``metrics.jsonl``, and the peak memory once, at the last step."""
    for key in ("loss", "validation/loss", "forgetting/kl"):
        assert [s for s, _ in history[key]] == [s for s, _ in ref[key]], key
        assert [v for _, v in history[key]] == pytest.approx([v for _, v in ref[key]], rel=1e-6), key
    for key, value in ref["memory"].items():
        assert history[key] == [(4, pytest.approx(value, rel=1e-6))], key


def test_tensorboard_gets_losses_evaluations_forgetting_and_peak_memory(tracked_run):
    scalars, ref = tensorboard_scalars(tracked_run / "run" / "lora_ft"), logged(tracked_run)
    assert_as_logged(scalars, ref)
    assert [s for s, _ in ref["validation/loss"]] == [0, 2, 4] and ref["forgetting/kl"][0] == (0, 0.0)
    assert scalars["final/validation/loss"][0][0] == 4 and "final/forgetting/ppl_base" in scalars
    assert "step" not in scalars  # the step is each point's x, not a metric of its own
    memory = ref["memory"]
    assert set(memory) == {"memory/predicted_peak_bytes", "memory/measured_peak_bytes"}
    # The CPU's measure is the process's peak RSS; the planner's total is of the same order.
    assert 0.1 < memory["memory/predicted_peak_bytes"] / memory["memory/measured_peak_bytes"] < 10


def test_mlflow_gets_the_same_metrics_and_the_recipe_as_params(tracked_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked_run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lora_ft")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run"
    ref = logged(tracked_run)
    for key in ("loss", "validation/loss", "forgetting/kl"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in history] == [s for s, _ in ref[key]], key
        assert [v for _, v in history] == pytest.approx([v for _, v in ref[key]], rel=1e-6), key
    for key, value in ref["memory"].items():
        assert run.data.metrics[key] == pytest.approx(value, rel=1e-6)
    assert run.data.params["train.lr"] == "0.01" and run.data.params["forgetting.enabled"] == "True"


def wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B transaction log (``run-*.wandb``): a 7-byte ``:W&B`` header, then LevelDB's log format
    (32 KiB blocks of records, each with a 7-byte header: checksum, length, type FULL/FIRST/MIDDLE/LAST)."""
    data, pos, records, part = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # a block's zero-filled tail
            pos += left
            continue
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(part)
            part = b""
    return records


def test_wandb_offline_gets_the_same_metrics_grouped_by_run_name(tracked_run):
    pytest.importorskip("wandb")
    from wandb.proto.wandb_internal_pb2 import Record

    (log,) = (tracked_run / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    history, name, config = {}, None, {}
    for raw in wandb_records(log):
        record = Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            # W&B merges everything logged at one step into one row
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for key, value in row.items():
                if not key.startswith("_"):
                    history.setdefault(key, []).append((record.history.step.num, value))
        elif kind == "run":
            name = record.run.display_name
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    assert name == "run" and config["train.lr"] == 0.01
    assert_as_logged(history, logged(tracked_run))


def trackio_history(project: str) -> tuple[dict[str, list[tuple[int, float]]], dict[str, dict]]:
    """Metrics by key (run ``run``) and each run's config, read with sqlite3 from the database Trackio wrote."""
    from trackio.sqlite_storage import SQLiteStorage

    db = sqlite3.connect(SQLiteStorage.get_project_db_path(project))
    history: dict[str, list[tuple[int, float]]] = {}
    for step, metrics in db.execute("SELECT step, metrics FROM metrics WHERE run_name = 'run' ORDER BY id"):
        for key, value in json.loads(metrics).items():
            history.setdefault(key, []).append((step, value))
    configs = {name: json.loads(config) for name, config in db.execute("SELECT run_name, config FROM configs")}
    db.close()
    return history, configs


def test_trackio_gets_the_same_metrics_and_the_recipe_in_its_local_database(tracked_run):
    pytest.importorskip("trackio")
    history, configs = trackio_history("lora_ft")
    assert configs["run"]["train.lr"] == 0.01 and configs["run"]["_Group"] is None
    assert_as_logged(history, logged(tracked_run))
    assert history["final/validation/loss"][0][0] == 4 and "__step" not in history  # a "step" key is renamed so


@pytest.mark.parametrize("name", TRACKERS)
def test_every_tracker_accelerate_offers_is_accepted_and_warned_about_when_missing(name, monkeypatch, caplog):
    monkeypatch.setattr(report, f"is_{name}_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="lora_ft"):
        assert available_trackers([name]) == []
    assert f"{name} is not installed" in caplog.text and f"pip install {name}" in caplog.text


def test_trackers_cover_accelerates_list():
    from accelerate.utils import LoggerType

    assert set(TRACKERS) == {t.value for t in LoggerType} - {"all"}


def test_a_sweeps_trials_share_one_experiment_and_a_group():
    project, kwargs = tracker_run("/x/sweep/trial-01-r-8", "lora_ft-sweep-x")
    assert project == "lora_ft-sweep-x" and kwargs["mlflow"] == {"run_name": "trial-01-r-8"}
    assert kwargs["wandb"] == {"name": "trial-01-r-8", "group": "lora_ft-sweep-x", "dir": "/x/sweep/trial-01-r-8"}
    assert kwargs["trackio"] == {"name": "trial-01-r-8", "group": "lora_ft-sweep-x"}
    assert tracker_run("/x/run")[0] == "lora_ft"
