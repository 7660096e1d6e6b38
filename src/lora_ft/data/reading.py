"""Reading a split: a local jsonl/json/csv/parquet file or a Hub dataset id, as a ``datasets.Dataset``.

CSV cells are read as text, exactly as written (``3.10`` stays "3.10", an empty cell is "" rather than a NaN that
turns a whole integer column into floats); the objectives check every cell they read (``cells.py``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets

from ..errors import DataError, RecipeError, first_line
from ..recipe import looks_local

READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def is_local(spec: str) -> bool:
    """Whether a data spec names a local file rather than a Hub dataset id: a path by its form
    (``recipe.looks_local``), or an existing file."""
    return looks_local(spec) or Path(spec).expanduser().exists()


def local_problem(spec: str) -> str | None:
    """Why a local data file cannot be read (without reading it), or None."""
    path = Path(spec).expanduser()
    if not path.is_file():
        return f"file not found: {spec}" if not path.exists() else f"{spec} is a folder, not a data file"
    if path.suffix.lower() not in READERS:
        return f"cannot read '{path.suffix}' files; use .jsonl, .json, .csv or .parquet (got {spec})"
    if path.stat().st_size == 0:
        return f"{spec} holds no examples"
    return None


def read_split(spec: str, split: str, field: str | None = None) -> datasets.Dataset:
    """A local jsonl/json/csv/parquet file, or a Hub dataset id (its split named ``split``).

    ``field``: the recipe field or flag that named the file, for messages (default ``data.<split>``, or ``split``
    itself when it is dotted, as ``forgetting.reference``).
    """
    field = field or (split if "." in split else f"data.{split}")
    if is_local(spec):
        problem = local_problem(spec)
        if problem:
            raise RecipeError(f"{field}: {problem}")
        ds = _read_file(Path(spec).expanduser(), spec, field)
    else:
        try:
            ds = datasets.load_dataset(spec, split=split)
        except Exception as e:
            raise RecipeError(f"{field}: '{spec}' is neither a local file nor a loadable Hub dataset "
                              f"({first_line(e)})") from None
    if len(ds) == 0:
        raise RecipeError(f"{field}: {spec} holds no examples")
    return ds


def open_stream(spec: str, field: str = "data.train") -> datasets.IterableDataset:
    """``read_split`` as a stream (``data.streaming``): an ``IterableDataset`` read the same way (csv cells as text),
    whose rows are parsed only as they are iterated (a parse error then names the file when the row is reached)."""
    if not is_local(spec):
        try:
            return datasets.load_dataset(spec, split="train", streaming=True)
        except Exception as e:  # datasets raises several types for an unknown id or a missing split
            raise RecipeError(f"{field}: '{spec}' is neither a local file nor a loadable Hub dataset "
                              f"({first_line(e)})") from None
    problem = local_problem(spec)
    if problem:
        raise RecipeError(f"{field}: {problem}")
    return _read_file(Path(spec).expanduser(), spec, field, streaming=True)


def _read_file(path: Path, spec: str, field: str, streaming: bool = False):
    reader = READERS[path.suffix.lower()]
    kwargs = {}
    if reader == "csv":
        kwargs = {"features": datasets.Features({c: datasets.Value("string") for c in _csv_header(path, spec, field)}),
                  "keep_default_na": False, "na_filter": False}
    try:
        return datasets.load_dataset(reader, data_files=str(path), split="train", streaming=streaming, **kwargs)
    except Exception as e:  # datasets wraps parser errors in several exception types
        where = _bad_json_line(path) if reader == "json" else None
        raise DataError(f"{field}: cannot parse {spec} as {reader}: {where or first_line(e.__cause__ or e)}") from None


def _csv_header(path: Path, spec: str, field: str) -> list[str]:
    # -sig: Windows tools (Excel's "CSV UTF-8", Notepad) begin the file with a byte-order mark, which is no part of
    # the first column's name (pandas drops it too; datasets' JSON reader skips it)
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
        header = next(csv.reader(f), [])
    if not header or len(set(header)) != len(header) or not all(c.strip() for c in header):
        raise DataError(f"{field}: {spec} needs a header row of distinct, non-empty column names (found {header})")
    return header


def _bad_json_line(path: Path) -> str | None:
    """For a JSON-lines file that does not parse: the first line that is not a JSON object, in words."""
    blank = None
    try:
        with path.open(encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    blank = blank or n
                    continue
                try:
                    value = json.loads(line)
                except ValueError as e:
                    if n == 1 and line.lstrip().startswith("["):
                        return None  # a .json array spread over lines: the library's message is the better one
                    return f"line {n} is not valid JSON ({e.msg}, column {e.colno})"
                if not isinstance(value, dict):
                    return f"line {n} is {type(value).__name__}, not an object of columns"
    except UnicodeDecodeError as e:
        return f"not UTF-8 text ({first_line(e)})"
    if blank:
        # Every line parses: datasets' fallback reader (taken when a column's values differ in type, e.g. labels
        # 1 and "a") stops at blank lines with "Expected object or value".
        return (f"line {blank} is blank; remove the blank lines (datasets' reader stops at them when a column "
                "mixes types)")
    return None
