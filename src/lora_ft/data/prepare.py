"""Task data: the recipe's splits read, carved (``validation_split``), checked and tokenized by the objective.

What depends on the kind of task (formats, label sets, how an example is tokenized, which examples still carry
a training signal) is asked of the objective (``objectives/``); this module only orchestrates, so it never
branches on the task and never needs the model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import datasets

from ..errors import RecipeError
from ..recipe import DataConfig
from .cells import Where
from .reading import read_split

if TYPE_CHECKING:  # objectives import this package; the objective is only passed in
    from ..objectives import Objective

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    """Tokenized splits ready for batching, with what was learned from the training split."""

    splits: dict[str, datasets.Dataset]
    format: str
    id2label: dict[int, str] | None = None
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    raw: dict[str, datasets.Dataset] = field(default_factory=dict)
    """The evaluation splits as read (not tokenized), after ``max_eval_examples``: what the generation evaluation
    takes its prompts and reference answers from."""
    formats: dict[str, str] = field(default_factory=dict)
    """Each split's data format."""


def read_splits(cfg: DataConfig, need_train: bool = True,
                extra: dict[str, str] | None = None) -> dict[str, tuple[str, datasets.Dataset]]:
    """Every split the data config names, plus ``extra`` name → file: name → (file or Hub id, dataset), in file
    order (``validation_split`` is carved later, after the rows were checked against their file)."""
    raw: dict[str, tuple[str, datasets.Dataset]] = {}
    if need_train:
        if not cfg.train:
            raise RecipeError("data.train: no training data given (set data.train to a file or Hub dataset)")
        raw["train"] = cfg.train, read_split(cfg.train, "train")
    for name in ("validation", "test"):
        spec = getattr(cfg, name)
        if spec:
            raw[name] = spec, read_split(spec, name)
    for name, spec in (extra or {}).items():
        raw[name] = spec, read_split(spec, name, "--data")  # the file a command was given
    return raw


def carve_validation(raw: dict[str, datasets.Dataset], cfg: DataConfig, seed: int) -> dict[str, datasets.Dataset]:
    """``validation_split``: a fraction of train held out with ``seed`` when no validation file is given."""
    if cfg.validation or not cfg.validation_split or "train" not in raw:
        return raw
    n = len(raw["train"])
    n_val = math.ceil(cfg.validation_split * n)  # how datasets' train_test_split rounds a fraction
    if n - n_val < 1 or n_val < 1:
        raise RecipeError(f"data.validation_split {cfg.validation_split} of {n} training example(s) leaves "
                          f"{n - n_val} to train on; lower it or give data.validation")
    parts = raw["train"].train_test_split(test_size=cfg.validation_split, seed=seed)
    return {"train": parts["train"], "validation": parts["test"], **{k: v for k, v in raw.items() if k != "train"}}


def read_checked(cfg: DataConfig, objective: Objective, seed: int, need_train: bool = True,
                 extra: dict[str, str] | None = None) -> tuple[dict[str, datasets.Dataset], dict[str, str]]:
    """The splits read, their formats detected and every cell the objective reads checked (``cells.py``), then
    ``validation_split`` carved: (splits, formats), by split name."""
    files = read_splits(cfg, need_train, extra)
    formats = {name: objective.detect_format(ds.column_names, name) for name, (_, ds) in files.items()}
    for name, (spec, ds) in files.items():
        field = f"data.{name}" if name in ("train", "validation", "test") else "--data"
        objective.check_rows(ds, formats[name], Where(field, spec))
    raw = carve_validation({name: ds for name, (_, ds) in files.items()}, cfg, seed)
    if "validation" in raw and "validation" not in formats:
        formats["validation"] = formats["train"]
    return raw, formats


def prepare_data(cfg: DataConfig, objective: Objective, seed: int, need_train: bool = True,
                 extra: dict[str, str] | None = None, id2label: dict[int, str] | None = None) -> TaskData:
    """Read every split named in ``cfg`` (plus ``extra`` name→file), validate and tokenize them.

    Args:
        cfg: the recipe's data section.
        objective: tokenizes and labels the examples (``objectives.objective_for``).
        seed: carves ``validation_split`` from the training data.
        need_train: read the training split (evaluation of a saved run does not).
        extra: further splits by name, e.g. the file ``lora-ft eval --data`` scores.
        id2label: a trained classifier's label set; otherwise the objective reads it from ``train``.
    """
    raw, formats = read_checked(cfg, objective, seed, need_train, extra)
    fmt = formats.get("train") or next(iter(formats.values()))
    if cfg.max_eval_examples:
        raw = {n: ds.select(range(min(len(ds), cfg.max_eval_examples))) if n != "train" else ds
               for n, ds in raw.items()}
    data = TaskData({}, fmt, objective.fit_labels(raw, id2label),
                    raw={n: ds for n, ds in raw.items() if n != "train"}, formats=formats)
    for name, ds in raw.items():
        data.splits[name], data.stats[name] = _tokenize(ds, name, formats[name], objective, cfg.max_length)
    return data


def _tokenize(ds: datasets.Dataset, name: str, fmt: str, objective: Objective,
              max_length: int) -> tuple[datasets.Dataset, dict[str, int]]:
    enc = ds.map(lambda row: objective.encode(row, fmt), remove_columns=ds.column_names, desc=f"tokenizing {name}")
    total = len(enc)
    truncated = sum(enc["truncated"])
    if not all(enc["usable"]):
        enc = enc.filter(lambda r: r["usable"])
    dropped = total - len(enc)
    if len(enc) == 0:
        raise RecipeError(f"data.{name}: every example lost its answer to truncation at data.max_length="
                          f"{max_length}; raise max_length")
    enc = enc.remove_columns(["truncated", "usable"])
    lengths = [len(x) for x in enc["input_ids"]]
    stats = {"examples": len(enc), "truncated": truncated, "dropped": dropped, "tokens": sum(lengths),
             "max_tokens": max(lengths)}
    if truncated:
        log.warning("data.%s: %d of %d examples were longer than max_length=%d and were truncated%s",
                    name, truncated, total, max_length,
                    f"; {dropped} lost every answer token and were dropped" if dropped else "")
    if name == "train":  # a stable example id, so augmentation can be seeded per example
        enc = enc.add_column("idx", list(range(len(enc))))
    return enc.with_format(None), stats
