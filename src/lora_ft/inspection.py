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

from .config import Recipe
from .data import IGNORE, detect_format, encode_causal, read_split, to_messages
from .model import load_tokenizer, resolve_source

_WORDS = re.compile(r"\w+")


def example_text(row: dict, fmt: str, recipe: Recipe) -> str:
    """The text that identifies an example, for duplicate and leakage checks."""
    d = recipe.data
    if fmt == "classification":
        return " ".join(str(row[c]) for c in (d.text_column, d.text_pair_column) if c)
    if fmt == "text":
        return str(row[d.text_column])
    return "\n".join(f"{m['role']}: {m['content']}" for m in to_messages(row, fmt, d))


def normalise(text: str) -> str:
    """Lower-case words only: 'Hello,  World!' and 'hello world' are near-duplicates."""
    return " ".join(_WORDS.findall(text.lower()))


def _percentiles(values: list[int]) -> dict[str, int]:
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"min": s[0], "median": int(statistics.median(s)), "p90": pick(0.9), "p99": pick(0.99), "max": s[-1]}


def render_mask(tok, input_ids: list[int], labels: list[int]) -> str:
    """The example as text, with the tokens that carry loss wrapped in [[...]]."""
    out, inside = [], False
    for t, lab in zip(input_ids, labels, strict=True):
        on = lab != IGNORE
        if on != inside:
            out.append("[[" if on else "]]")
            inside = on
        out.append(tok.decode([t]))
    return "".join(out) + ("]]" if inside else "")


def inspect_recipe(recipe: Recipe) -> dict[str, Any]:
    """Everything ``lora-ft inspect`` reports, as a dict (``problems`` holds the findings in words)."""
    d, task = recipe.data, recipe.model.task
    tok = load_tokenizer(resolve_source(recipe.model.name), recipe.model)
    specs = {name: getattr(d, name) for name in ("train", "validation", "test") if getattr(d, name)}
    report: dict[str, Any] = {"splits": {}, "problems": []}
    keys: dict[str, list[str]] = {}
    sample = None
    unlimited = d.model_copy(update={"max_length": 10**9})
    for name, spec in specs.items():
        ds = read_split(spec, name)
        fmt = detect_format(ds.column_names, task, d, name)
        texts = [example_text(row, fmt, recipe) for row in ds]
        if fmt == "classification":
            lengths = [len(tok(t)["input_ids"]) for t in texts]
            if sample is None:
                sample = f"{texts[0]}  ->  label {ds[0][d.label_column]!r}"
        else:
            encoded = [encode_causal(row, fmt, tok, unlimited) for row in ds]
            lengths = [len(e["input_ids"]) for e in encoded]
            if sample is None:
                sample = render_mask(tok, encoded[0]["input_ids"], encoded[0]["labels"])
        too_long = sum(n > d.max_length for n in lengths)
        norm = [normalise(t) for t in texts]
        split = {"examples": len(ds), "format": fmt, "tokens": _percentiles(lengths),
                 "truncated_at_max_length": too_long,
                 "exact_duplicates": len(texts) - len(set(texts)),
                 "near_duplicates": (len(texts) - len(set(norm))) - (len(texts) - len(set(texts)))}
        if fmt == "classification":
            split["labels"] = dict(sorted(Counter(str(v) for v in ds[d.label_column]).items()))
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
