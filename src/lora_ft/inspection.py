"""``lora-ft inspect``: know the data before spending compute.

Split sizes, token lengths and truncation at ``max_length``, label balance, exact and near duplicates,
train/validation/test overlap (leakage), and one rendered example with its loss mask. Needs only the
tokenizer, never the model weights.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from typing import Any

from .data.cells import Where
from .data.reading import read_split
from .modeling.loading import load_tokenizer, resolve_source
from .objectives import objective_for
from .recipe import Recipe

_WORDS = re.compile(r"\w+")


def normalise(text: str) -> str:
    """Lower-case words only: 'Hello,  World!' and 'hello world' are near-duplicates."""
    return " ".join(_WORDS.findall(text.lower()))


def _percentiles(values: list[int]) -> dict[str, int]:
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"min": s[0], "median": int(statistics.median(s)), "p90": pick(0.9), "p99": pick(0.99), "max": s[-1]}


def inspect_recipe(recipe: Recipe) -> dict[str, Any]:
    """Everything ``lora-ft inspect`` reports, as a dict (``problems`` holds the findings in words)."""
    d = recipe.data
    objective = objective_for(recipe, load_tokenizer(resolve_source(recipe.model.name), recipe.model))
    specs = {name: getattr(d, name) for name in ("train", "validation", "test") if getattr(d, name)}
    report: dict[str, Any] = {"splits": {}, "problems": []}
    keys: dict[str, list[str]] = {}
    sample = None
    for name, spec in specs.items():
        ds = read_split(spec, name)
        fmt = objective.detect_format(ds.column_names, name)
        objective.check_rows(ds, fmt, Where(f"data.{name}", spec))
        texts = [objective.example_text(row, fmt) for row in ds]
        lengths = [objective.length(row, fmt) for row in ds]
        if sample is None:
            sample = objective.describe(ds[0], fmt)
        too_long = sum(n > d.max_length for n in lengths)
        norm = [normalise(t) for t in texts]
        split = {"examples": len(ds), "format": fmt, "tokens": _percentiles(lengths),
                 "truncated_at_max_length": too_long,
                 "exact_duplicates": len(texts) - len(set(texts)),
                 "near_duplicates": (len(texts) - len(set(norm))) - (len(texts) - len(set(texts)))}
        if objective.label_column():
            split["labels"] = dict(sorted(Counter(str(v) for v in ds[objective.label_column()]).items()))
            counts = list(split["labels"].values())
            if len(counts) > 1 and max(counts) > 3 * min(counts):
                report["problems"].append(f"{name}: labels are imbalanced ({split['labels']})")
        if too_long:
            report["problems"].append(f"{too_long} {name} examples are longer than max_length={d.max_length} "
                                      "and will be truncated")
        if split["exact_duplicates"]:
            report["problems"].append(f"{split['exact_duplicates']} {name} examples are exact duplicates")
        if split["near_duplicates"]:
            report["problems"].append(f"{split['near_duplicates']} {name} examples are near-duplicates "
                                      "(same words ignoring case and punctuation)")
        report["splits"][name] = split
        keys[name] = norm
    train_keys = set(keys.get("train", []))
    for name in ("validation", "test"):
        if name in keys and train_keys:
            leaked = sum(k in train_keys for k in keys[name])
            report["splits"][name]["in_train"] = leaked
            if leaked:
                report["problems"].append(f"{leaked} {name} examples also occur in train")
    report["sample"] = sample
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = []
    for name, s in report["splits"].items():
        t = s["tokens"]
        lines.append(f"{name}: {s['examples']} examples ({s['format']}); tokens min {t['min']} / median "
                     f"{t['median']} / p90 {t['p90']} / p99 {t['p99']} / max {t['max']}; "
                     f"{s['truncated_at_max_length']} over max_length")
        if "labels" in s:
            lines.append(f"  labels: {s['labels']}")
    if report["sample"]:
        lines += ["", "first training example ([[...]] carries loss):", report["sample"]]
    lines += ["", "problems:" if report["problems"] else "no problems found"]
    lines += [f"  - {p}" for p in report["problems"]]
    return "\n".join(lines)
