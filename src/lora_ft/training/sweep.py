"""``lora-ft sweep``: run a grid of recipe variations one after another and rank them on validation.

Each trial is an ordinary run (its own ``output_dir`` under ``<output_dir>/sweep/``), so any of them can be
evaluated, merged or resumed like a single run. A failing trial is recorded with its error, not fatal; a signal
stops the whole sweep (after the running trial has saved what it can) and says how to continue it.

Running a sweep again never destroys a trial silently: a trial whose folder holds a finished run of the same
recipe is reused, an unfinished one is resumed, and one whose folder holds a run of another recipe is refused
(``--overwrite`` retrains it) before anything trains. One sweep at a time runs in a folder (the run lock).
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import random
import re
from pathlib import Path
from typing import Any

from ..errors import RunError, TrainingInterrupted, UsageError, first_line
from ..lock import RunLock
from ..recipe import Recipe, changes, describe_changes, load_recipe, parse_overrides
from ..run import LOCK, RESULTS, RUN_CONFIG, RunFolder, read_run_config
from ..storage import write_text
from .signals import Interrupted, Signals
from .trainer import train

log = logging.getLogger(__name__)

def _resolved_at_launch(key: str, recipe: Recipe) -> bool:
    """Whether a trial's saved value of ``key`` was decided by the launch, not by the recipe: ``auto`` values of the
    ``train`` section (``recipe.defaults``, the memory planner), and the batch arithmetic they (or
    ``global_batch_size``) derive, and an ``auto`` compute dtype (this machine's choice, ``modeling.precision``)."""
    tc = recipe.train
    if key == "model.compute_dtype":
        return recipe.model.compute_dtype == "auto"
    section, _, name = key.partition(".")
    if section == "train" and getattr(tc, name, None) == "auto":
        return True
    if key == "train.global_batch_size":
        return tc.micro_batch_size == "auto"
    return key == "train.grad_accum" and (tc.micro_batch_size == "auto" or tc.global_batch_size is not None)


def parse_grid(grid: list[str]) -> dict[str, list[Any]]:
    """``["lora.r=8,16"]`` → ``{"lora.r": [8, 16]}`` (each value parsed like ``--set``)."""
    axes: dict[str, list[Any]] = {}
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise UsageError(f"--grid '{item}': write it as section.key=value1,value2")
        axes[key.strip()] = [v for _, v in parse_overrides([f"{key}={x}" for x in values.split(",")])]
    return axes


def _slug(combo: dict[str, Any]) -> str:
    return "_".join(f"{k.rsplit('.', 1)[-1]}-{re.sub(r'[^A-Za-z0-9.]+', '', str(v))}" for k, v in combo.items())


def _plan(recipe: Recipe, overwrite: bool) -> tuple[str, str | None]:
    """What to do with a trial's folder: ``train``, ``resume``, ``reuse`` or ``overwrite``, and for a folder that
    holds a run of another recipe (without ``overwrite``) the keys that changed."""
    folder = RunFolder(recipe.output_dir)
    if not folder.holds_run():
        return "train", None
    diff = changes(read_run_config(folder / RUN_CONFIG), recipe)
    changed = [k for k in diff if not _resolved_at_launch(k, recipe)]
    if changed:
        return ("overwrite", None) if overwrite else ("refuse", describe_changes(diff, changed))
    if (folder / RESULTS).is_file() and (folder.adapter / "adapter_config.json").is_file():
        return "reuse", None
    return "resume", None


def run_sweep(recipe_path: str, grid: list[str], overrides: list[str] | None = None, trials: int | None = None,
              seed: int = 0, overwrite: bool = False) -> list[dict[str, Any]]:
    """Train every combination (or ``trials`` random ones); write sweep.csv/.md; return rows, best first."""
    base = load_recipe(recipe_path, overrides)
    axes = parse_grid(grid)
    combos = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    if trials and trials < len(combos):
        combos = random.Random(seed).sample(combos, trials)
    root = Path(base.output_dir) / "sweep"
    with RunLock(root / LOCK, f"sweep {root}"):
        recipes, plans = [], []
        for i, combo in enumerate(combos, 1):
            out = root / f"trial-{i:02d}-{_slug(combo)}"
            sets = [*(overrides or []), *(f"{k}={v}" for k, v in combo.items()), f"output_dir={out}"]
            try:
                recipes.append(load_recipe(recipe_path, sets))
                plans.append(_plan(recipes[-1], overwrite))
            except Exception as e:  # a bad combination is a failed trial, reported below
                recipes.append(e)
                plans.append(("failed", None))
        refused = [f"trial {i} ({r.output_dir}): {why}"
                   for i, (r, (what, why)) in enumerate(zip(recipes, plans, strict=True), 1) if what == "refuse"]
        if refused:
            raise RunError(f"the sweep folder {root} holds trials of another recipe; " + "; ".join(refused)
                           + "; pass --overwrite to retrain them, or choose another output_dir")
        rows = _run_trials(root, combos, recipes, plans)
    return sorted(rows, key=_rank)


def _run_trials(root: Path, combos: list[dict], recipes: list, plans: list[tuple[str, str | None]]) -> list[dict]:
    """Each trial as planned; a signal (in a trial or between trials) ends the sweep after the table is written."""
    rows: list[dict[str, Any]] = []
    with Signals("the sweep") as signals:
        for i, (combo, recipe, (what, _)) in enumerate(zip(combos, recipes, plans, strict=True), 1):
            out = root / f"trial-{i:02d}-{_slug(combo)}"
            row: dict[str, Any] = {"trial": i, **combo, "output_dir": str(out)}
            rows.append(row)
            log.info("sweep trial %d/%d: %s (%s)", i, len(combos), combo, what)
            try:
                with signals.phase(f"sweep trial {i}/{len(combos)}"):
                    if what == "failed":
                        raise recipe
                    results = _trial(recipe, what, f"lora_ft-sweep-{root.parent.resolve().name}")
                row.update(_metrics(results), status="ok", **({"reused": True} if what == "reuse" else {}))
            except (TrainingInterrupted, Interrupted) as e:
                row["status"] = "interrupted"
                _write(root, rows)
                kept = str(e).split("; continue with:")[0] if isinstance(e, TrainingInterrupted) else e.phase
                raise TrainingInterrupted(
                    f"sweep interrupted in trial {i}/{len(combos)} ({kept}); the trials before it are done and kept; "
                    "continue the sweep with: lora-ft sweep RECIPE (finished trials are reused, this one resumes)",
                    e.signum) from None
            except Exception as e:  # a bad combination must not end the sweep: record it and go on
                log.warning("sweep trial %d failed: %s", i, first_line(e))
                row.update(status="failed", error=first_line(e))
    _write(root, sorted(rows, key=_rank))
    return rows


def _rank(row: dict[str, Any]) -> tuple[bool, float, float]:
    # As the trainer keeps its best adapter (Objective.selected_by): a classifier's trials by validation accuracy,
    # then loss; the others' (no "accuracy" metric) by loss.
    return row["status"] != "ok", -row.get("accuracy", 0.0), row.get("loss", float("inf"))


def _trial(recipe: Recipe, what: str, group: str) -> dict[str, Any]:
    """One trial; ``group``: the trackers' experiment every trial of the sweep is a run of."""
    if what == "reuse":
        log.info("trial %s is finished with this recipe: its results are reused", recipe.output_dir)
        return RunFolder(recipe.output_dir).read_json(RESULTS)
    return train(recipe, resume="latest" if what == "resume" else None, overwrite=what == "overwrite", group=group)


def _metrics(results: dict[str, Any]) -> dict[str, float]:
    split = "validation" if "validation" in results["after"] else next(iter(results["after"]), None)
    metrics = results["after"].get(split, {}) if split else {}
    return {k: round(v, 6) for k, v in metrics.items() if k in ("loss", "accuracy", "f1_macro", "perplexity",
                                                                   "reward_accuracy", "reward_margin")}


def _write(root: Path, rows: list[dict[str, Any]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(root / "sweep.csv", table.getvalue())
    lines = ["| rank | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    lines += [f"| {n} | " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for n, r in enumerate(rows, 1)]
    write_text(root / "sweep.md", "\n".join(lines) + "\n")
