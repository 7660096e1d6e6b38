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

At scale (a million rows) the rules run on the Arrow columns first (``candidates``: pyarrow compute over whole
columns): they pick every row that *may* be bad, a superset, and the Python check of one value above decides and
words the message for those rows only. A column of a type the vectorised rules do not cover is checked row by row,
a slice of Arrow at a time, never as one Python list of the whole column.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DataError
from .chat import ROLES, parse_conversation


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


PYTHON_WHITESPACE = (r"\t\n\x{b}\x{c}\r\x{1c}-\x{1f} \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}"
                     r"\x{202f}\x{205f}\x{3000}")
"""Every character ``str.isspace`` (hence ``str.strip``) treats as white space, as an RE2 class body: pyarrow's own
trim knows fewer, and a blank cell it missed would slip past the vectorised rules (``tests/test_cells.py`` compares
the class with Python's)."""
BLANK = f"^[{PYTHON_WHITESPACE}]*$"
LIST_TEXT = f"^[{PYTHON_WHITESPACE}]*\\["
"""A string that may hold a JSON list (``_json_list`` strips, then looks for ``[``)."""
# A decimal number as text (CSV holds regression targets so). Python's float() also takes "1_000", "inf" and
# Unicode digits; those are candidates too, and the row-by-row check decides (a candidate may be good, never missed).
NUMBER_TEXT = r"^[ \t]*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?[ \t]*$"
SLICE = 20_000
"""Rows turned into Python values at a time where a column is checked row by row."""


def check_column(values: Iterable[Any], kind: str, where: Where, column: str, rows: Iterable[int] | None = None
                 ) -> None:
    """Raise one DataError for the first cell of ``values`` that is not a ``kind`` cell (and count the others).

    Args:
        rows: the row number of each value (default 0, 1, ...): the candidates the vectorised rules picked.
    """
    _raise_first(_scan(values, rows, CHECKS[kind]), where, column)


Found = tuple[int, tuple[int, str] | None]
"""Bad rows counted so far, and the first bad row with its problem (None: none yet)."""


def _scan(values: Iterable[Any], rows: Iterable[int] | None, check, found: Found = (0, None)) -> Found:
    """``found`` updated with ``values`` (row numbers ``rows``, default 0, 1, ...)."""
    bad, first = found
    for i, value in zip(rows if rows is not None else itertools.count(), values, strict=False):
        problem = check(value)
        if problem is not None:
            bad += 1
            first = first or (i, problem)
    return bad, first


def _raise_first(found: Found, where: Where, column: str) -> None:
    bad, first = found
    if first is not None:
        more = f" ({bad - 1} more row(s) like it)" if bad > 1 else ""
        raise DataError(f"{where.cell(first[0], column)} {first[1]}{more}")


def check_columns(ds, columns: dict[str, str], where: Where) -> None:
    """``check_column`` for every column → kind of ``columns`` that ``ds`` holds: the vectorised rules pick the
    candidate rows of each column (all rows where they do not apply), Python checks those."""
    table = ds.with_format("arrow")  # an indices mapping (a selection) applied, still Arrow
    for column, kind in columns.items():
        if column not in ds.column_names:
            continue
        values = table[column]
        values = values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])
        # A column whose cells differ in type is stored as JSON text (datasets' Json feature): decoded by datasets.
        mask = None if _holds_json(ds.features[column]) else candidates(values, kind)
        if mask is None:
            _check_all(ds.select_columns([column]), kind, where, column)
            continue
        rows = np.flatnonzero(mask)
        if len(rows):
            check_column(values.take(pa.array(rows)).to_pylist(), kind, where, column, rows.tolist())


def _holds_json(feature: Any) -> bool:
    if type(feature).__name__ == "Json":
        return True
    if isinstance(feature, dict):
        return any(_holds_json(f) for f in feature.values())
    inner = getattr(feature, "feature", None)  # List / LargeList / Sequence
    return inner is not None and _holds_json(inner)


def _check_all(ds, kind: str, where: Where, column: str) -> None:
    """Row by row as datasets decodes them, a slice at a time; the message counts the bad rows of every slice."""
    found: Found = (0, None)
    for start, batch in zip(range(0, len(ds), SLICE), ds.iter(batch_size=SLICE), strict=False):
        found = _scan(batch[column], itertools.count(start), CHECKS[kind], found)
    _raise_first(found, where, column)


def _mask(array) -> np.ndarray:
    """A boolean Arrow array as numpy, null counting as a candidate."""
    return np.asarray(pc.fill_null(array, True).to_numpy(zero_copy_only=False), dtype=bool)


def candidates(values: pa.ChunkedArray, kind: str) -> np.ndarray | None:
    """Rows of a column that may not be ``kind`` cells (a superset of the bad ones: the Python check decides),
    or None where no vectorised rule covers the column's type."""
    t = values.type
    if pa.types.is_null(t):
        return np.ones(len(values), dtype=bool)
    if kind == "conversation":
        return _conversation_candidates(values)
    if (pa.types.is_string(t) or pa.types.is_large_string(t)) and kind == "number":
        return _mask(pc.invert(pc.match_substring_regex(values, NUMBER_TEXT)))
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return _mask(pc.or_kleene(pc.match_substring_regex(values, BLANK), pc.match_substring_regex(values, LIST_TEXT)))
    if pa.types.is_integer(t):
        return _mask(pc.is_null(values))
    if pa.types.is_floating(t):
        return _mask(pc.or_kleene(pc.is_null(values), pc.invert(pc.is_finite(values))))
    if pa.types.is_boolean(t):
        return _mask(pc.is_null(values)) if kind == "label" else np.ones(len(values), dtype=bool)
    return None


def _conversation_candidates(values: pa.ChunkedArray) -> np.ndarray | None:
    """Lists of ``{role, content}`` (or ShareGPT ``{from, value}``) structs with text contents: a row is a candidate
    when it is null or empty, a message is null or has a role outside ``ROLES`` or a null or blank content, or no
    assistant answers after the first turn. Other layouts (contents as lists of parts, JSON strings): None."""
    t = values.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return None
    names = [t.value_type.field(i).name for i in range(t.value_type.num_fields)]
    role, content = ("role", "content") if "role" in names else ("from", "value")
    if role not in names or content not in names:
        return None
    kinds = {name: t.value_type.field(name).type for name in (role, content)}
    if not all(pa.types.is_string(k) or pa.types.is_large_string(k) for k in kinds.values()):
        return None
    # Chunk by chunk: one copy of the whole column (combine_chunks) would be the file's size again in memory.
    if values.num_chunks == 0:
        return np.zeros(0, dtype=bool)
    return np.concatenate([_conversation_chunk(chunk, role, content) for chunk in values.chunks])


def _conversation_chunk(lists: pa.Array, role: str, content: str) -> np.ndarray:
    """``_conversation_candidates`` of one Arrow chunk of the column."""
    n = len(lists)
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    lengths = np.nan_to_num(np.asarray(lengths, dtype=float), nan=0).astype(np.int64)  # a null list: no messages
    bad = lengths == 0
    flat = lists.flatten()
    parent = np.asarray(pc.list_parent_indices(lists).to_numpy(zero_copy_only=False), dtype=np.int64)
    roles, texts = flat.field(role), flat.field(content)
    message_bad = _mask(pc.or_kleene(pc.or_kleene(flat.is_null(), pc.invert(pc.is_in(roles, pa.array(list(ROLES))))),
                                     pc.match_substring_regex(texts, BLANK)))
    bad[parent[message_bad]] = True
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    position = np.arange(len(flat)) - starts[parent]
    answers = pc.and_kleene(pc.is_in(roles, pa.array([r for r, to in ROLES.items() if to == "assistant"])),
                            pc.is_valid(flat))
    answers = np.asarray(pc.fill_null(answers, False).to_numpy(zero_copy_only=False), dtype=bool)
    answered = np.zeros(n, dtype=bool)
    answered[parent[answers & (position >= 1)]] = True
    return bad | ~answered
