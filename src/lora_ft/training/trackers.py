"""Experiment trackers that cannot start: one line naming the tracker and the fix, before any compute is spent.

Accelerate starts the trackers inside ``init_trackers``, all in one loop, and lets each library's own exception out
(MLflow's "the filesystem tracking backend is in maintenance mode" for a ``file:`` tracking URI, W&B's "No API key
configured", a ``FileExistsError`` from TensorBoard). Two steps keep that from costing a model load or a half-written
run folder:

- ``check_trackers``, early in ``Trainer.setup`` (before the model loads): what each tracker's backend needs, asked
  of the library where it has a cheap public call (MLflow: its tracking store, built from the URI exactly as a run
  builds it; W&B: ``wandb.login(verify=False)``, no network), else the folder it writes to;
- ``start_trackers``, in place of ``init_trackers`` and before the run folder is written: each tracker started on
  its own, so a failure (a server that cannot be reached, credentials the check cannot see) names its tracker; the
  trackers already started are finished and every file they wrote in the run folder is removed.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS

from ..errors import RecipeError, first_line

log = logging.getLogger(__name__)

FIXES = {
    "tensorboard": "make output_dir a writable folder (TensorBoard writes to output_dir/<project>)",
    "wandb": "run `wandb login` or set WANDB_API_KEY, or set WANDB_MODE=offline to log to output_dir/wandb and "
             "`wandb sync` it later",
    "mlflow": "set MLFLOW_TRACKING_URI to a database (sqlite:///mlflow.db; needs `pip install sqlalchemy alembic`, "
              "which the full `mlflow` package has) or to a tracking server (http://host:5000); MLflow 3 refuses the "
              "file: backend unless MLFLOW_ALLOW_FILE_STORE=true",
    "trackio": "set TRACKIO_DIR to a writable folder",
    "comet_ml": "set COMET_API_KEY (or configure ~/.comet.config)",
    "aim": "make output_dir a writable folder (Aim keeps its repository in output_dir/.aim)",
    "clearml": "run `clearml-init` or set CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY",
    "dvclive": "make ./dvclive (in the current directory) a writable folder",
    "swanlab": "run `swanlab login` or set SWANLAB_API_KEY",
}
"""Tracker → what usually fixes a start-up failure; every message also offers dropping it from train.trackers."""


def tracker_error(name: str, problem: str) -> RecipeError:
    """The one line for a tracker that cannot start."""
    return RecipeError(f"train.trackers: {name} cannot start: {problem.rstrip('.')}; {FIXES[name]}, or remove "
                       f"{name} from train.trackers")


def _gist(err: BaseException) -> str:
    """A library's message in brief: its first line, or that line's first sentence when it runs on (MLflow's
    file-store refusal is one 600-character line; the fix we give replaces the rest)."""
    text = first_line(err, 2000)
    return text if len(text) <= 200 else text.split(". ")[0]


def _folder_problem(path: Path) -> str | None:
    """Why a tracker could not create and write ``path`` (None: it can), without creating anything: the nearest
    part of it that exists must be a folder this process may write to."""
    for part in [path, *path.parents]:
        if part.exists():
            if not part.is_dir():
                return f"{part} is a file, not a folder"
            if not os.access(part, os.W_OK | os.X_OK):
                return f"{part} is not writable"
            return None
    return None


def _mlflow(output_dir: Path, project: str) -> str | None:
    import mlflow  # optional tracker package: imported only when the run tracks with it

    try:  # the store the run's tracker would use, from MLFLOW_TRACKING_URI (or MLflow's default) as it resolves it
        mlflow.MlflowClient().search_experiments(max_results=1)
    except (mlflow.exceptions.MlflowException, OSError) as e:
        return f"{_gist(e)} (tracking URI {mlflow.get_tracking_uri()!r})"
    return None


def _wandb(output_dir: Path, project: str) -> str | None:
    problem = _folder_problem(output_dir / "wandb")
    offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled")
    if problem or offline or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return problem  # offline and disabled runs need no login (wandb.login would only warn)
    import wandb  # optional tracker package: imported only when the run tracks with it

    try:  # finds the key as wandb.init does (WANDB_API_KEY, ~/.netrc); verify=False: no network
        wandb.login(verify=False)
    except wandb.errors.Error as e:
        return _gist(e)
    return None


def _trackio(output_dir: Path, project: str) -> str | None:
    from trackio.sqlite_storage import SQLiteStorage  # optional tracker package, imported only when used

    # trackio.init does not fail on a folder it cannot write: it warns at each flush and drops the metrics.
    db = SQLiteStorage.get_project_db_path(project)
    return f"{db} is a folder, not its database file" if db.is_dir() else _folder_problem(db.parent)


PROBES: dict[str, Callable[[Path, str], str | None]] = {
    "tensorboard": lambda out, project: _folder_problem(out / project),
    "wandb": _wandb,
    "mlflow": _mlflow,
    "trackio": _trackio,
    "aim": lambda out, project: _folder_problem(out / ".aim"),
    "dvclive": lambda out, project: _folder_problem(Path("dvclive")),
}
"""Tracker → why it cannot start (None: it can). comet_ml, clearml and swanlab are checked by starting them
(``start_trackers``): their credentials live in their own configuration files, which only they read reliably."""


def _agree(accelerator: Accelerator, error: RecipeError | None) -> None:
    """Raise ``error`` on the main process, and a pointer to it on the others, so that all of them stop."""
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(torch.tensor(int(error is not None), device=accelerator.device), "max").item()
        error = error or (RecipeError("train.trackers: a tracker cannot start (see the main process's message)")
                          if failed else None)
    if error is not None:
        raise error


def check_trackers(accelerator: Accelerator, output_dir: str | Path, project: str) -> None:
    """Raise one ``RecipeError`` for the first of the accelerator's trackers whose backend would refuse to start.

    Args:
        accelerator: its ``log_with`` holds the trackers the run will start (installed ones only).
        output_dir: the run folder, where TensorBoard, W&B and Aim write.
        project: the trackers' project name (``report.tracker_run``).
    """
    error = None
    if accelerator.is_main_process:
        for name in (str(t) for t in accelerator.log_with):
            problem = PROBES[name](Path(output_dir), project) if name in PROBES else None
            if problem is not None:
                error = tracker_error(name, problem)
                break
    _agree(accelerator, error)


def _snapshot(folder: Path) -> set[Path]:
    return set(folder.rglob("*")) if folder.is_dir() else set()


def _remove_new(folder: Path, before: set[Path]) -> None:
    """Delete what appeared in ``folder`` since ``before`` (deepest first), leaving everything else as it was."""
    for path in sorted(_snapshot(folder) - before, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def start_trackers(accelerator: Accelerator, project: str, config: dict[str, Any],
                   init_kwargs: dict[str, dict[str, Any]], folder: Path) -> None:
    """``accelerator.init_trackers``, one tracker at a time, so that a failure names its tracker.

    Written out (accelerate's own loop is ten lines) because ``init_trackers`` starts every tracker in one loop and
    a second call would start the first ones again. On a failure the trackers already started are finished and the
    files they (and the failing one) wrote in ``folder`` are removed, then one ``RecipeError`` names the tracker.
    The ``except Exception`` is on purpose: each of nine libraries (and the network below them) raises its own
    types; the original is chained for debugging.

    Args:
        accelerator: its ``log_with`` holds the trackers to start.
        project: the project name; config: the run's flat hyperparameters; init_kwargs: tracker → its kwargs.
        folder: the run folder (TensorBoard's and W&B's files land in it).
    """
    before, error = _snapshot(folder), None
    for tracker in accelerator.log_with:
        name = str(tracker)
        cls = LOGGER_TYPE_TO_CLASS[name]
        args = (project, accelerator.logging_dir) if cls.requires_logging_directory else (project,)
        started = cls(*args, **init_kwargs.get(name, {}))
        try:
            started.start()
            started.store_init_configuration(config)
        except Exception as e:  # noqa: BLE001 - see the docstring: reported as one line naming the tracker
            error = tracker_error(name, _gist(e))
            error.__cause__ = e
            break
        accelerator.trackers.append(started)
    if error is not None:
        for started in accelerator.trackers:
            started.finish()
        accelerator.trackers.clear()
        _remove_new(folder, before)
    _agree(accelerator, error)
