"""Reading a split: a local jsonl/json/csv/parquet file or a Hub dataset id, as a ``datasets.Dataset``."""

from __future__ import annotations

from pathlib import Path

import datasets

from ..errors import RecipeError, first_line

READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_split(spec: str, split: str) -> datasets.Dataset:
    """A local jsonl/json/csv/parquet file, or a Hub dataset id (its split named ``split``)."""
    path = Path(spec).expanduser()
    if path.suffix.lower() in READERS or path.exists():
        if not path.is_file():
            raise RecipeError(f"data.{split}: file not found: {spec}")
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise RecipeError(f"data.{split}: cannot read '{path.suffix}' files; use .jsonl, .json, .csv or .parquet")
        if path.stat().st_size == 0:
            raise RecipeError(f"data.{split}: {spec} holds no examples")
        try:
            ds = datasets.load_dataset(reader, data_files=str(path), split="train")
        except Exception as e:  # datasets wraps parser errors in several exception types
            cause = first_line(e.__cause__ or e)
            raise RecipeError(f"data.{split}: cannot parse {spec} as {reader}: {cause}") from None
    else:
        try:
            ds = datasets.load_dataset(spec, split=split)
        except Exception as e:
            raise RecipeError(f"data.{split}: '{spec}' is neither a local file nor a loadable Hub dataset "
                              f"({first_line(e)})") from None
    if len(ds) == 0:
        raise RecipeError(f"data.{split}: {spec} holds no examples")
    return ds
