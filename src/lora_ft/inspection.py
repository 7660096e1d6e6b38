"""``lora-ft inspect``: know the data before spending compute.

Split sizes, token lengths and truncation at ``max_length``, label balance, exact and near duplicates,
train/validation/test overlap (leakage), and one rendered example with its loss mask. Needs only the
tokenizer, never the model weights.

At scale: each example's full length and the hashes of its text and normalised text are columns written by one
batched map on every core and kept in the data cache (``data.cache``), beside the training preparation's entries, so
a second ``inspect`` of the same file reads them back; the counts are numpy over those columns. The cells are
checked once per file (the same marker ``train`` and ``validate`` use).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from typing import Any

import numpy as np

from .data import cache
from .data.cells import Where
from .data.prepare import ENCODE_BATCH, NOT_TOKENIZING, Origin, check_split, column, workers
from .data.reading import read_split
from .data.streaming import read_prefix
from .modeling.loading import load_tokenizer, resolve_source
from .objectives import objective_for
from .recipe import Recipe

_WORDS = re.compile(r"\w+")
log = logging.getLogger(__name__)


def normalise(text: str) -> str:
    """Lower-case words only: 'Hello,  World!' and 'hello world' are near-duplicates."""
    return " ".join(_WORDS.findall(text.lower()))


def _percentiles(values: np.ndarray) -> dict[str, int]:
    s = np.sort(values)
    pick = lambda q: int(s[min(len(s) - 1, int(q * len(s)))])  # noqa: E731
    return {"min": int(s[0]), "median": int(np.median(s)), "p90": pick(0.9), "p99": pick(0.99), "max": int(s[-1])}


def _hash(text: str) -> int:
    """A stable 63-bit hash (Python's ``hash`` of a string differs between processes)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _measured(objective, fmt: str):
    def measure(batch: dict[str, list]) -> dict[str, list]:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        texts = [objective.example_text(r, fmt) for r in rows]
        return {"full_length": [objective.length(r, fmt) for r in rows], "text": [_hash(t) for t in texts],
                "words": [_hash(normalise(t)) for t in texts]}
    return measure


def _measure(ds, name: str, fmt: str, objective, origin: Origin):
    """Each example's untruncated length and its text's and normalised text's hashes, from the data cache when it
    holds them for this file, tokenizer and settings (else computed on every core into it)."""
    facts = {"inspect": 1, "file": origin.identity(ds), "format": fmt, "objective": type(objective).__qualname__,
             "data": objective.cfg.model_dump(mode="json", exclude=NOT_TOKENIZING | {"max_length"}),
             "tokenizer": cache.tokenizer_identity(objective.tokenizer), "code": cache.code_identity(objective)}
    key = cache.digest(facts)
    hit = cache.load_entry(key)
    if hit is not None:
        return hit[0]

    def build(folder):
        procs = workers(len(ds))
        out = ds.map(_measured(objective, fmt), batched=True, batch_size=ENCODE_BATCH, remove_columns=ds.column_names,
                     num_proc=procs if procs > 1 else None, cache_file_name=str(folder / "inspected.arrow"),
                     load_from_cache_file=False, new_fingerprint=folder.name, desc=f"measuring {name}")
        return out, {}
    return cache.write_entry(key, build, {**facts, "source": origin.spec})[0]


def inspect_recipe(recipe: Recipe) -> dict[str, Any]:
    """Everything ``lora-ft inspect`` reports, as a dict (``problems`` holds the findings in words)."""
    d = recipe.data
    objective = objective_for(recipe, load_tokenizer(resolve_source(recipe.model.name), recipe.model))
    specs = {name: getattr(d, name) for name in ("train", "validation", "test") if getattr(d, name)}
    report: dict[str, Any] = {"splits": {}, "problems": []}
    keys: dict[str, np.ndarray] = {}
    sample = None
    for name, spec in specs.items():
        prefix = name == "train" and d.streaming  # a stream: its first rows only (bounded), not cached
        ds = read_prefix(spec, "data.train") if prefix else read_split(spec, name)
        fmt = objective.detect_format(ds.column_names, name)
        origin = Origin(spec, f"data.{name}")
        if prefix:
            objective.check_rows(ds, fmt, Where("data.train", spec))
            measured = ds.map(_measured(objective, fmt), batched=True, remove_columns=ds.column_names)
        else:
            check_split(objective, ds, fmt, Where(f"data.{name}", spec), origin)
            measured = _measure(ds, name, fmt, objective, origin)
        lengths, texts, norm = (column(measured, c) for c in ("full_length", "text", "words"))
        if sample is None:
            sample = objective.describe(ds[0], fmt)
        too_long = int((lengths > d.max_length).sum())
        exact, words = len(texts) - len(np.unique(texts)), len(norm) - len(np.unique(norm))
        split = {"examples": len(ds), "format": fmt, "tokens": _percentiles(lengths),
                 "truncated_at_max_length": too_long, "exact_duplicates": exact, "near_duplicates": words - exact,
                 **({"streaming_prefix": True} if prefix else {})}
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
    for name in ("validation", "test"):
        if name in keys and "train" in keys:
            leaked = int(np.isin(keys[name], keys["train"]).sum())
            report["splits"][name]["in_train"] = leaked
            if leaked:
                report["problems"].append(f"{leaked} {name} examples also occur in train")
    report["sample"] = sample
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = []
    for name, s in report["splits"].items():
        t = s["tokens"]
        read = " (the first ones only: data.streaming reads a bounded prefix)" if s.get("streaming_prefix") else ""
        lines.append(f"{name}: {s['examples']} examples{read} ({s['format']}); tokens min {t['min']} / median "
                     f"{t['median']} / p90 {t['p90']} / p99 {t['p99']} / max {t['max']}; "
                     f"{s['truncated_at_max_length']} over max_length")
        if "labels" in s:
            lines.append(f"  labels: {s['labels']}")
    if report["sample"]:
        lines += ["", "first training example ([[...]] carries loss):", report["sample"]]
    lines += ["", "problems:" if report["problems"] else "no problems found"]
    lines += [f"  - {p}" for p in report["problems"]]
    return "\n".join(lines)
