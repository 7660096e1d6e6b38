"""What a cell of each documented column may hold, checked row by row before anything is tokenized.

A data file is user input in every shape JSON allows: any cell can be null, a number, a list, an object, or a
string holding JSON; CSV has empty cells; parquet carries nulls and nested lists. The objective that reads a
column says which kind of cell it expects (``Objective.columns``); the first cell that does not fit is one
``DataError`` line naming the file, the row (1-based: the N-th example of the file) and the column.

Accepted on purpose:

- ``text`` cells: strings that are not blank, and numbers, used as their text (``42`` → "42"; JSON writes 3.10 as
  3.1, so quote numbers whose digits matter). A string holding a JSON list of objects is refused: it is a
  serialized conversation or record, not text (the ``messages`` format reads conversations);
- ``optional_text`` (alpaca's ``input``): also null or empty, meaning no input;
- ``label`` cells: strings, integers, booleans (classes "True"/"False") and finite numbers;
- ``labels`` (multi-label): a list of labels, ``[]`` for none, or that list as JSON text (CSV); ``number``
  (regression): a finite number or its text; ``words`` (token classification's words and tags): a non-empty list
  of non-blank strings; ``spans``: a list of ``{start, end, label}`` with ``0 <= start < end``;
- ``conversation`` cells: a list of messages, or that list as a JSON string (how CSV files hold it); a message's
  content may be a list of text parts (the OpenAI/transformers layout), read as their joined text, while an image
  or audio part is refused by its type; see ``chat.parse_conversation``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .chat import parse_conversation


@dataclass(frozen=True)
class Where:
    """The recipe field (or flag) that named a file, and the file (or Hub dataset), for messages."""

    field: str
    source: str

    def cell(self, row: int, column: str) -> str:
        return f"{self.field}: {self.source} row {row + 1}, column '{column}'"


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _json_list(value: str) -> list | None:
    text = value.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    return parsed if isinstance(parsed, list) else None


def text_problem(value: Any, optional: bool = False) -> str | None:
    """Why ``value`` cannot be used as text (None when it can)."""
    if isinstance(value, str):
        if not value.strip():
            return None if optional else "is empty; every example needs this text"
        parsed = _json_list(value)
        if parsed and all(isinstance(x, dict) for x in parsed):
            return ("holds a JSON list of objects, not text (a conversation belongs in the messages column, with "
                    "data.format messages)")
        return None
    if value is None:
        return None if optional else "is null (empty); every example needs this text"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return None if math.isfinite(value) else f"is {value}, not text"
    return f"is {_kind_of(value)}, not text"


def label_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a class label (None when it can)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "is empty; every example needs a label"
    if isinstance(value, float) and not math.isfinite(value):
        return "is empty (NaN); every example needs a label"
    if isinstance(value, str) and _json_list(value) is not None:
        return ("holds a JSON list: several labels per example are multi-label data (set data.format multilabel, "
                "or auto)")
    if isinstance(value, list | tuple):
        return "is a list: several labels per example are multi-label data (set data.format multilabel, or auto)"
    if isinstance(value, dict):
        return "is an object, not a label"
    return None


def as_list(value: Any) -> list | None:
    """A list cell, or a string holding a JSON list (how CSV files hold one); None for anything else."""
    if isinstance(value, list | tuple):
        return list(value)
    return _json_list(value) if isinstance(value, str) else None


def labels_problem(value: Any) -> str | None:
    """Why ``value`` cannot be the label set of a multi-label example (an empty list is: no label applies)."""
    items = as_list(value)
    if items is None:
        return f"is {_kind_of(value)}, not a list of labels (multi-label data: a JSON list per example, [] for none)"
    bad = next((x for x in items if label_problem(x) is not None), None)
    return None if bad is None else f"holds {_kind_of(bad)} {bad!r} among its labels: {label_problem(bad)}"


def number_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a regression target (numbers, and numbers' text as CSV cells hold them)."""
    try:
        number = float(value) if isinstance(value, int | float | str) and not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not math.isfinite(number):
        return f"is {_kind_of(value) if not isinstance(value, str) else repr(value)}, not a finite number"
    return None


def words_problem(value: Any) -> str | None:
    """Why ``value`` cannot be an example's words or tags (a non-empty list of non-blank strings)."""
    items = as_list(value)
    if not items:
        return "is empty" if items == [] else f"is {_kind_of(value)}, not a list of words"
    bad = next((x for x in items if not isinstance(x, str) or not x.strip()), None)
    return None if bad is None else f"holds {_kind_of(bad) if not isinstance(bad, str) else 'a blank string'}, " \
                                    "not a word"


def spans_problem(value: Any) -> str | None:
    """Why ``value`` cannot be an example's entity spans (a list of ``{start, end, label}``; [] for none)."""
    items = as_list(value)
    if items is None:
        return f"is {_kind_of(value)}, not a list of {{start, end, label}} spans"
    for x in items:
        if not (isinstance(x, dict) and isinstance(x.get("start"), int) and isinstance(x.get("end"), int)
                and isinstance(x.get("label"), str) and x["label"].strip() and 0 <= x["start"] < x["end"]):
            return f"holds {x!r}, not a span {{start, end, label}} with 0 <= start < end"
    return None


def conversation_problem(value: Any) -> str | None:
    try:
        parse_conversation(value)
    except ValueError as e:
        return str(e)
    return None


CHECKS: dict[str, Callable[[Any], str | None]] = {
    "text": text_problem,
    "optional_text": lambda v: text_problem(v, optional=True),
    "label": label_problem,
    "conversation": conversation_problem,
    "labels": labels_problem,
    "number": number_problem,
    "words": words_problem,
    "spans": spans_problem,
}
"""Kind of cell → the check of one value."""


def check_column(values: Iterable[Any], kind: str, where: Where, column: str) -> None:
    """Raise one DataError for the first cell of ``values`` that is not a ``kind`` cell (and count the others)."""
    check = CHECKS[kind]
    first: tuple[int, str] | None = None
    bad = 0
    for i, value in enumerate(values):
        problem = check(value)
        if problem is not None:
            bad += 1
            first = first or (i, problem)
    if first is not None:
        more = f" ({bad - 1} more row(s) like it)" if bad > 1 else ""
        raise DataError(f"{where.cell(first[0], column)} {first[1]}{more}")


def check_columns(ds, columns: dict[str, str], where: Where) -> None:
    """``check_column`` for every column → kind of ``columns`` that ``ds`` holds."""
    for column, kind in columns.items():
        if column in ds.column_names:
            check_column(ds[column], kind, where, column)
