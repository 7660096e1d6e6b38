"""Which kind of sequence-level labels a data set holds: single classes, several labels, or scores.

``model.task: sequence_classification`` trains all three; ``data.format`` says which, and under ``auto`` the label
column decides: a list (or a JSON list in a CSV cell) in every row means multi-label data; numbers, at least one of
them with a fraction (0.5, 3.7), mean scores. Integer labels stay classes (0/1/2 are class ids far more often
than scores): give ``data.format: regression`` or ``model.task: regression`` to learn them as numbers.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ..data.cells import as_list
from ..data.reading import read_split
from ..errors import DataError, RecipeError
from ..recipe import DataConfig

log = logging.getLogger(__name__)


def _fraction(value: Any) -> bool | None:
    """Whether a label is a number with a fraction; None when it is no number at all."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value) if isinstance(value, int | float | str) else None
    except ValueError:
        return None
    return None if number is None or not math.isfinite(number) else not number.is_integer()


def labels_kind(values: list[Any]) -> str:
    """``multilabel``, ``regression`` or ``classification`` for the values of a label column."""
    lists = [isinstance(v, list | tuple) or (isinstance(v, str) and as_list(v) is not None) for v in values]
    if lists and all(lists):  # some lists among single labels: the cell check names the first odd row
        return "multilabel"
    fractions = [_fraction(v) for v in values]
    if fractions and all(f is not None for f in fractions) and any(fractions):
        return "regression"
    return "classification"


def sequence_format(cfg: DataConfig) -> str:
    """``data.format`` for sequence classification: as given, else read from the first split named (train,
    validation, test) that can be read; a split that cannot is left to the data preparation's own message."""
    if cfg.format in ("classification", "multilabel", "regression"):
        return cfg.format
    for spec in (cfg.train, cfg.validation, cfg.test):
        if not spec:
            continue
        try:
            ds = read_split(spec, "train")
        except (RecipeError, DataError):
            continue
        if cfg.label_column not in ds.column_names:
            return "classification"
        kind = labels_kind(ds[cfg.label_column])
        if kind != "classification":
            log.info("data: column '%s' of %s holds %s: training %s (set data.format: classification to refuse)",
                     cfg.label_column, spec, "lists of labels" if kind == "multilabel" else "scores with fractions",
                     "a multi-label classifier" if kind == "multilabel" else "a regression head")
        return kind
    return "classification"
