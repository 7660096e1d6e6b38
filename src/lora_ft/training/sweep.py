"""``lora-ft sweep``: run a grid of recipe variations one after another and rank them on validation.

Each trial is an ordinary run (its own ``output_dir`` under ``<output_dir>/sweep/``), so any of them can be
evaluated, merged or resumed like a single run. A failing trial is recorded with its error, not fatal.
"""

from __future__ import annotations

import csv
import itertools
import logging
import random
import re
from pathlib import Path
from typing import Any

from ..errors import UsageError, first_line
from ..recipe import load_recipe, parse_overrides
from .trainer import train

log = logging.getLogger(__name__)


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


def run_sweep(recipe_path: str, grid: list[str], overrides: list[str] | None = None,
              trials: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Train every combination (or ``trials`` random ones); write sweep.csv/.md; return rows, best first."""
    base = load_recipe(recipe_path, overrides)
    axes = parse_grid(grid)
    combos = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    if trials and trials < len(combos):
        combos = random.Random(seed).sample(combos, trials)
    root = Path(base.output_dir) / "sweep"
    group = f"lora_ft-sweep-{Path(base.output_dir).resolve().name}"  # the trackers' experiment for every trial
    rows = []
    for i, combo in enumerate(combos, 1):
        out = root / f"trial-{i:02d}-{_slug(combo)}"
        row: dict[str, Any] = {"trial": i, **combo, "output_dir": str(out)}
        log.info("sweep trial %d/%d: %s", i, len(combos), combo)
        try:
            sets = [*(overrides or []), *(f"{k}={v}" for k, v in combo.items()), f"output_dir={out}"]
            results = train(load_recipe(recipe_path, sets), overwrite=True, group=group)
            split = "validation" if "validation" in results["after"] else next(iter(results["after"]), None)
            metrics = results["after"].get(split, {}) if split else {}
            row.update({f"{k}": round(v, 6) for k, v in metrics.items() if k in ("loss", "accuracy", "f1_macro",
                                                                                   "perplexity")})
            row["status"] = "ok"
        except Exception as e:  # a bad combination must not end the sweep: record it and go on
            log.warning("sweep trial %d failed: %s", i, first_line(e))
            row.update(status="failed", error=first_line(e))
        rows.append(row)
    rows.sort(key=lambda r: (r["status"] != "ok", r.get("loss", float("inf"))))
    _write(root, rows)
    return rows


def _write(root: Path, rows: list[dict[str, Any]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with (root / "sweep.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| rank | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    lines += [f"| {n} | " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for n, r in enumerate(rows, 1)]
    (root / "sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
