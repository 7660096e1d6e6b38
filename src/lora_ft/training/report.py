"""Run reports: the loss/metric curves drawn from ``metrics.jsonl``, and what experiment trackers get."""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import (
    is_aim_available,
    is_clearml_available,
    is_comet_ml_available,
    is_dvclive_available,
    is_mlflow_available,
    is_swanlab_available,
    is_tensorboard_available,
    is_trackio_available,
    is_wandb_available,
)

from ..memory.estimate import estimate
from ..memory.launch import answer_tokens_of
from ..memory.shape import model_shape, setting_for
from ..recipe import Recipe
from ..storage import read_rows

log = logging.getLogger(__name__)


def available_trackers(names: list[str]) -> list[str]:
    """The enabled trackers whose package is installed; a warning for each one that is not (accelerate
    drops those with only a debug message, so a user would find an empty log folder and no reason)."""
    # Looked up at call time (and by module attribute): the tests replace them to simulate missing packages.
    installed = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available,
                 "trackio": is_trackio_available, "comet_ml": is_comet_ml_available, "aim": is_aim_available,
                 "clearml": is_clearml_available, "dvclive": is_dvclive_available, "swanlab": is_swanlab_available}
    kept = []
    for name in names:
        if bool(installed[name]()):
            kept.append(name)
        else:
            log.warning("train.trackers: %s is not installed, so nothing is logged to it; "
                        "pip install %s, or remove it from train.trackers", name, name)
    return kept


def tracker_run(output_dir: str | Path, group: str | None = None) -> tuple[str, dict[str, dict[str, Any]]]:
    """(project name, per-tracker init kwargs) for ``accelerator.init_trackers``: a run is named after its
    ``output_dir``; the trials of a sweep (``group``) share one project (MLflow: one experiment), and W&B and
    Trackio also group them. TensorBoard writes under ``output_dir/<project>``, so a sweep's trials sit side by
    side; W&B's local files (all of them in offline mode) go to ``output_dir/wandb``; Trackio keeps one SQLite
    database per project in ``TRACKIO_DIR`` (default ``~/.cache/huggingface/trackio``)."""
    name = Path(output_dir).resolve().name
    grouped = {"group": group} if group else {}
    return group or "lora_ft", {"wandb": {"name": name, "dir": str(output_dir), **grouped},
                                "mlflow": {"run_name": name}, "trackio": {"name": name, **grouped}}


def peak_memory(recipe: Recipe, device: torch.device, source: str, train_data, seq: int,
                attended: float | None = None) -> dict[str, float]:
    """The planner's predicted peak for the resolved recipe on ``device`` at sequences of ``seq`` tokens (the
    longest a step held, ``session.longest_sequence``) and the measured one, in bytes:
    ``torch.cuda.max_memory_allocated`` against the planner's tensor peak on a GPU; on the CPU the process's peak
    RSS against the planner's total (tensors + Python, torch and libraries). Empty if the planner cannot model
    this architecture (training does not depend on it)."""
    cuda = device.type == "cuda"
    if cuda:
        measured = torch.cuda.max_memory_allocated(device)
    else:
        measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    try:
        setting = setting_for(recipe, device.type, cuda and torch.cuda.is_bf16_supported())
        e = estimate(model_shape(recipe, source), setting, int(recipe.train.micro_batch_size),
                     seq, answer_tokens=answer_tokens_of(train_data), attended=attended)
    except Exception as err:  # noqa: BLE001 - optional report: an architecture the planner cannot build
        log.warning("no predicted peak memory for this model: %s", err)
        return {"memory/measured_peak_bytes": float(measured)}
    return {"memory/predicted_peak_bytes": float(e.peak if cuda else e.total),
            "memory/measured_peak_bytes": float(measured)}


def final_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``eval_results`` after training as tracker keys: ``final/<split>/<metric>`` (and ``final/forgetting/...``)."""
    final = {**results["after"], **({"forgetting": results["forgetting"]["after"]} if "forgetting" in results else {})}
    return {f"final/{split}/{k}": v for split, metrics in final.items() for k, v in metrics.items()}


def tracker_config(tree: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """A nested recipe dump as one flat mapping of scalars (``train.lr``, ``lora.target_modules`` …).

    TensorBoard's hparams accept only scalars: nested mappings become dotted keys, and lists, None and
    empty mappings become JSON strings.
    """
    flat: dict[str, int | float | str | bool] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(tracker_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def plot_curves(metrics_file: Path, png: Path) -> None:
    """Training loss, evaluation losses and the task metric (accuracy, or a preference objective's reward
    accuracy) over optimizer steps."""
    import matplotlib  # heavy (pyplot loads fonts and backends): imported only when a run draws its curves

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    rows = read_rows(metrics_file)
    train = [r for r in rows if "split" not in r and "loss" in r]  # (rows with "freeze" mark schedule changes)
    evals: dict[str, list[dict]] = {}
    for r in rows:
        if "split" in r:
            evals.setdefault(r["split"], []).append(r)
    forgetting = evals.pop("forgetting", [])
    metric = next((m for m in ("accuracy", "reward_accuracy") if any(m in r for rs in evals.values() for r in rs)),
                  None)
    panels = 1 + bool(metric) + bool(forgetting)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", alpha=0.7)
    for split, rs in evals.items():
        ax.plot([r["step"] for r in rs], [r["loss"] for r in rs], "o-", label=split)
    ax.set(xlabel="optimizer step", ylabel="loss", title="loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if metric:
        ax2 = axes[0][1]
        for split, rs in evals.items():
            ax2.plot([r["step"] for r in rs], [r.get(metric) for r in rs], "o-", label=split)
        ax2.set(xlabel="optimizer step", ylabel=metric.replace("_", " "), title=metric.replace("_", " "))
        ax2.legend()
        ax2.grid(alpha=0.3)
    if forgetting:
        ax3 = axes[0][-1]
        ax3.plot([r["step"] for r in forgetting], [r["kl"] for r in forgetting], "o-", color="tab:red")
        ax3.set(xlabel="optimizer step", ylabel="mean KL(adapted ‖ base)", title="forgetting (general text)")
        ax3.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
