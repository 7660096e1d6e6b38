"""What the experiment trackers get, read back from the files TensorBoard and MLflow wrote."""

import json
import logging
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
    """A 4-step run with validation every 2 steps and the forgetting guard, logged to TensorBoard and MLflow
    (a local file store, as MLflow's default database needs SQLAlchemy)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"file:{root / 'mlruns'}")
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        splits = {k: v for k, v in chat_data.items() if k != "test"}
        recipe = make_recipe(tiny_llama, splits, root / "run", forgetting={"enabled": True, "max_examples": 4},
                             train={"max_steps": 4, "eval_every": 2, "trackers": ["tensorboard", "mlflow"]})
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
    """What metrics.jsonl and run_info.json say: the reference for both trackers."""
    rows = metrics_rows(root / "run")
    return {"loss": [(r["step"], r["loss"]) for r in rows if "split" not in r and "loss" in r],
            "validation/loss": [(r["step"], r["loss"]) for r in rows if r.get("split") == "validation"],
            "forgetting/kl": [(r["step"], r["kl"]) for r in rows if r.get("split") == "forgetting"
                              and not r.get("final")],
            "memory": json.loads((root / "run" / "run_info.json").read_text())["memory"]}


def test_tensorboard_gets_losses_evaluations_forgetting_and_peak_memory(tracked_run):
    scalars, ref = tensorboard_scalars(tracked_run / "run" / "lora_ft"), logged(tracked_run)
    for key in ("loss", "validation/loss", "forgetting/kl"):
        assert [s for s, _ in scalars[key]] == [s for s, _ in ref[key]], key
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in ref[key]], rel=1e-6), key
    assert [s for s, _ in ref["validation/loss"]] == [0, 2, 4] and ref["forgetting/kl"][0] == (0, 0.0)
    assert scalars["final/validation/loss"][0][0] == 4 and "final/forgetting/ppl_base" in scalars
    memory = ref["memory"]
    assert set(memory) == {"memory/predicted_peak_bytes", "memory/measured_peak_bytes"}
    for key, value in memory.items():
        assert scalars[key] == [(4, pytest.approx(value, rel=1e-6))]
    # The CPU's measure is the process's peak RSS; the planner's total is of the same order.
    assert 0.1 < memory["memory/predicted_peak_bytes"] / memory["memory/measured_peak_bytes"] < 10


def test_mlflow_gets_the_same_metrics_and_the_recipe_as_params(tracked_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{tracked_run / 'mlruns'}")
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
    assert kwargs["wandb"] == {"name": "trial-01-r-8", "group": "lora_ft-sweep-x"}
    assert tracker_run("/x/run")[0] == "lora_ft"
