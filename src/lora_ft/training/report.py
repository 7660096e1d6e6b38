"""Run reports: the loss/metric curves drawn from ``metrics.jsonl``, and what experiment trackers get."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from accelerate.utils import is_tensorboard_available, is_wandb_available

log = logging.getLogger(__name__)


def available_trackers(names: list[str]) -> list[str]:
    """The enabled trackers whose package is installed; a warning for each one that is not (accelerate
    drops those with only a debug message, so a user would find an empty log folder and no reason)."""
    installed = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    kept = []
    for name in names:
        if bool(installed[name]()):
            kept.append(name)
        else:
            log.warning("train.trackers: %s is not installed, so nothing is logged to it; "
                        "pip install %s, or remove it from train.trackers", name, name)
    return kept


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


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(metrics_file: Path, png: Path) -> None:
    """Training loss, evaluation losses and the task metric (accuracy, or a preference objective's reward
    accuracy) over optimizer steps."""
    import matplotlib  # heavy (pyplot loads fonts and backends): imported only when a run draws its curves

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_file)
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
