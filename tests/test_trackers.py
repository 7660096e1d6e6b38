"""A tracker that cannot start: one line naming it and the fix, before the model loads, and the run folder left
as it was (no run_config.yaml, no lock). Real failures of the installed trackers (TensorBoard, MLflow, W&B,
Trackio); the others (not installed here) through accelerate's own start of each."""

import importlib.util
from pathlib import Path

import pytest
from accelerate import Accelerator
from conftest import make_recipe

from lora_ft.cli import main
from lora_ft.errors import RecipeError
from lora_ft.run import LOCK, RUN_CONFIG
from lora_ft.training import trainer as trainer_module
from lora_ft.training.trackers import FIXES, check_trackers, start_trackers
from lora_ft.training.trainer import train


def fix(name: str) -> str:
    return f"; {FIXES[name]}, or remove {name} from train.trackers"


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The model loads of this test, recorded (``session.setup`` loads the model and reads the data; it still runs)."""
    calls = []
    real = trainer_module.setup

    def recording(recipe, *args, **kwargs):
        calls.append(recipe.model.name)
        return real(recipe, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "setup", recording)
    return calls


@pytest.fixture
def fresh_wandb():
    """W&B reads its settings (mode, server, timeouts) once per process, at its first use: a test's environment
    counts only from a fresh start, as in a new ``lora-ft train``."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    yield
    wandb.teardown()


def refused(recipe, loads: list[str]) -> str:
    """Train ``recipe``, which must fail before the model loads and leave no run behind; the error line."""
    with pytest.raises(RecipeError) as e:
        train(recipe)
    out = Path(recipe.output_dir)
    assert loads == []
    assert not (out / RUN_CONFIG).exists() and not (out / LOCK).exists()
    return str(e.value)


def test_an_mlflow_file_uri_is_one_line_before_the_model_loads(tiny_llama, chat_data, tmp_path, monkeypatch, loads,
                                                                capsys):
    pytest.importorskip("mlflow")
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    recipe = make_recipe(tiny_llama, chat_data, tmp_path / "run", train={"trackers": ["mlflow"]})
    message = refused(recipe, loads)
    assert message.startswith("train.trackers: mlflow cannot start: The filesystem tracking backend")
    assert "maintenance mode" in message  # MLflow's own words, as of 3.x
    assert message.endswith(f" (tracking URI {uri!r})" + fix("mlflow"))
    assert not (tmp_path / "run").exists()  # the lock's folder went with the lock
    # `lora-ft train`: that line, exit status 2, no traceback.
    (tmp_path / "r.yaml").write_text(recipe.dump())
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"lora-ft: error: {message}" and "Traceback" not in err


def test_wandb_online_without_a_key_is_one_line_before_the_model_loads(tiny_llama, chat_data, tmp_path, monkeypatch,
                                                                        loads, fresh_wandb):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    message = refused(make_recipe(tiny_llama, chat_data, tmp_path / "run", train={"trackers": ["wandb"]}), loads)
    assert message == "train.trackers: wandb cannot start: No API key configured. Use `wandb login` to log in" + \
        fix("wandb")


def test_a_tensorboard_folder_that_is_a_file_is_one_line_and_the_folder_stays_as_it_was(tiny_llama, chat_data,
                                                                                         tmp_path, loads):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    out.mkdir()
    (out / "lora_ft").write_text("not a folder")
    message = refused(make_recipe(tiny_llama, chat_data, out, train={"trackers": ["tensorboard"]}), loads)
    assert message == f"train.trackers: tensorboard cannot start: {out / 'lora_ft'} is a file, not a folder" + \
        fix("tensorboard")
    assert sorted(p.name for p in out.iterdir()) == ["lora_ft"]


def test_a_trackio_folder_that_is_a_file_is_refused_rather_than_losing_every_metric(tiny_llama, chat_data, tmp_path,
                                                                                     monkeypatch, loads):
    """trackio.init itself accepts it, then warns at each flush and drops the metrics."""
    pytest.importorskip("trackio")
    import trackio.sqlite_storage

    blocked = tmp_path / "trackio"
    blocked.write_text("not a folder")
    monkeypatch.setattr(trackio.sqlite_storage, "TRACKIO_DIR", blocked)  # what TRACKIO_DIR=<a file> gives
    message = refused(make_recipe(tiny_llama, chat_data, tmp_path / "run", train={"trackers": ["trackio"]}), loads)
    assert message == f"train.trackers: trackio cannot start: {blocked} is a file, not a folder" + fix("trackio")


def test_a_tracker_failing_at_its_start_is_named_and_the_started_ones_leave_nothing(tiny_llama, chat_data, tmp_path,
                                                                                   monkeypatch, fresh_wandb):
    """W&B with a key but no server (a closed port): only its real start can tell. TensorBoard, started first, is
    finished and its files removed; the run folder holds no run_config.yaml, no lock, and is gone."""
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    with pytest.raises(RecipeError) as e:
        train(make_recipe(tiny_llama, chat_data, out, train={"trackers": ["tensorboard", "wandb"], "max_steps": 1}))
    assert str(e.value).startswith("train.trackers: wandb cannot start: ")
    assert str(e.value).endswith(fix("wandb"))
    assert not out.exists()


UNINSTALLED = [n for n in ("comet_ml", "aim", "clearml", "dvclive", "swanlab") if importlib.util.find_spec(n) is None]


@pytest.mark.parametrize("name", UNINSTALLED)
def test_every_other_tracker_failing_at_its_start_is_one_line_naming_it(name, tmp_path):
    """accelerate's own start of each (here failing at its import, the package being absent) goes through the same
    per-tracker start: one line with the tracker's fix, nothing left in the folder."""
    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    accelerator.log_with = [name]
    with pytest.raises(RecipeError) as e:
        start_trackers(accelerator, "lora_ft", {"train.lr": 0.01}, {}, tmp_path)
    assert str(e.value) == f"train.trackers: {name} cannot start: No module named '{name}'" + fix(name)
    assert accelerator.trackers == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, blocked", [("aim", ".aim"), ("dvclive", "dvclive"), ("tensorboard", "lora_ft")])
def test_the_folder_each_file_tracker_writes_is_checked(name, blocked, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # dvclive writes ./dvclive
    (tmp_path / blocked).write_text("not a folder")
    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    accelerator.log_with = [name]
    with pytest.raises(RecipeError) as e:
        check_trackers(accelerator, tmp_path, "lora_ft")
    where = Path(blocked) if name == "dvclive" else tmp_path / blocked
    assert str(e.value) == f"train.trackers: {name} cannot start: {where} is a file, not a folder" + fix(name)
