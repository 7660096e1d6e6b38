"""Task data: the recipe's splits read, carved (``validation_split``), checked and tokenized by the objective.

What depends on the kind of task (formats, label sets, how an example is tokenized, which examples still carry
a training signal) is asked of the objective (``objectives/``); this module only orchestrates, so it never
branches on the task and never needs the model.

At scale: cells are checked column-wise (``cells.py``), examples are tokenized in batches on every core
(``datasets.map(num_proc=...)``, with a progress bar), each example's length is a column written by that map (the
statistics and the samplers read it as numpy, never as Python lists of every sequence), and what a split's
preparation produced, its checks and statistics included, is kept in the data cache (``cache.py``) for every later
command that prepares the same split.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pyarrow as pa

from ..errors import RecipeError
from ..recipe import DataConfig
from . import cache
from .cells import Where
from .chat import IGNORE
from .reading import is_local, read_split

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
    stream: tuple[datasets.IterableDataset, str] | None = None
    """``data.streaming``: the training split as a stream and its format (``streaming.open_train``), in place of
    ``splits["train"]``."""


AUTO_EVAL_EXAMPLES = 1000
"""``max_eval_examples: auto``: an evaluation split of more examples is evaluated on this many, spread evenly over it
(every k-th example): about 1% standard error on a mean loss, for seconds of compute instead of minutes at every
``eval_every`` on a large validation set. Smaller splits are evaluated whole."""
PARALLEL_FROM = 20_000
"""Examples from which tokenizing runs on every core: below it, starting the workers costs more than it saves."""
ENCODE_BATCH = 1000
"""Examples per batch of the tokenizing map (and per progress bar update)."""
NOT_TOKENIZING = {"train", "validation", "test", "validation_split", "max_eval_examples", "group_by_length",
                  "packing", "augment", "streaming", "shuffle_buffer"}
"""Data settings that do not change how an example is tokenized (the rest are part of the data cache's key)."""


def workers(rows: int) -> int:
    """Processes that tokenize ``rows`` examples: every core this process may use (``$LORA_FT_DATA_WORKERS``
    overrides), one for small splits."""
    if os.environ.get("LORA_FT_DATA_WORKERS"):
        return max(1, int(os.environ["LORA_FT_DATA_WORKERS"]))
    return max(1, len(os.sched_getaffinity(0))) if rows >= PARALLEL_FROM else 1


@dataclass
class Origin:
    """Where a split's rows come from: the file (or Hub id), the recipe field that named it, and which rows."""

    spec: str
    field: str
    rows: dict[str, Any] = field(default_factory=dict)
    """Which rows of the file, in the data cache's key (the carved part and its seed, the evaluation cap)."""
    _identity: dict[str, Any] | None = None

    def identity(self, ds: datasets.Dataset) -> dict[str, Any]:
        """The file's content identity (hashed once per command)."""
        if self._identity is None:
            self._identity = cache.file_identity(self.spec, ds, is_local(self.spec))
        return self._identity


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


def check_split(objective: Objective, ds: datasets.Dataset, fmt: str, where: Where, origin: Origin) -> None:
    """Every cell the objective reads, checked once per file content: a file that passed is remembered in the data
    cache (``cache.was_checked``), so ``validate``, ``inspect`` and every later run skip the checks."""
    key = cache.digest({"version": cache.VERSION, "file": origin.identity(ds), "format": fmt,
                        "objective": type(objective).__qualname__, "columns": objective.columns(fmt),
                        "data": objective.cfg.model_dump(mode="json", exclude=NOT_TOKENIZING),
                        "code": cache.code_identity(objective)})
    if cache.was_checked(key):
        log.info("%s: %s: cells checked before (data cache), not again", where.field, where.source)
        return
    objective.check_rows(ds, fmt, where)
    cache.mark_checked(key, {"source": where.source, "rows": len(ds), "format": fmt})


def read_checked(cfg: DataConfig, objective: Objective, seed: int, need_train: bool = True,
                 extra: dict[str, str] | None = None
                 ) -> tuple[dict[str, datasets.Dataset], dict[str, str], dict[str, Origin]]:
    """The splits read, their formats detected and every cell the objective reads checked (``cells.py``), then
    ``validation_split`` carved: (splits, formats, origins), by split name."""
    files = read_splits(cfg, need_train, extra)
    formats = {name: objective.detect_format(ds.column_names, name) for name, (_, ds) in files.items()}
    origins = {}
    for name, (spec, ds) in files.items():
        field_ = f"data.{name}" if name in ("train", "validation", "test") else "--data"
        origins[name] = Origin(spec, field_)
        check_split(objective, ds, formats[name], Where(field_, spec), origins[name])
    raw = carve_validation({name: ds for name, (_, ds) in files.items()}, cfg, seed)
    if "validation" in raw and "validation" not in formats:
        formats["validation"] = formats["train"]
        carved = {"fraction": cfg.validation_split, "seed": seed}
        origins["validation"] = Origin(cfg.train, "data.train", {"part": "validation", **carved},
                                       origins["train"]._identity)
        origins["train"].rows = {"part": "train", **carved}
    return raw, formats, origins


def cap_evaluation(raw: dict[str, datasets.Dataset], cfg: DataConfig, origins: dict[str, Origin],
                   log_auto: bool = True) -> dict[str, datasets.Dataset]:
    """``max_eval_examples`` on every split but train: a number keeps the first that many; ``auto`` keeps
    ``AUTO_EVAL_EXAMPLES`` spread evenly over a larger split (logged); null keeps all."""
    out = {}
    for name, ds in raw.items():
        cap = cfg.max_eval_examples
        if name == "train" or cap is None or len(ds) <= (AUTO_EVAL_EXAMPLES if cap == "auto" else cap):
            out[name] = ds
        elif cap == "auto":
            rows = np.linspace(0, len(ds) - 1, AUTO_EVAL_EXAMPLES).round().astype(np.int64)
            out[name] = ds.select(rows)
            origins[name].rows = {**origins[name].rows, "evenly": AUTO_EVAL_EXAMPLES}
            if log_auto:
                log.info("data.%s: evaluating on %d of its %d examples, spread evenly over it (data.max_eval_examples "
                         "auto; set a number, or null for all of them)", name, AUTO_EVAL_EXAMPLES, len(ds))
        else:
            out[name] = ds.select(range(cap))
            origins[name].rows = {**origins[name].rows, "first": cap}
    return out


def prepare_data(cfg: DataConfig, objective: Objective, seed: int, need_train: bool = True,
                 extra: dict[str, str] | None = None, id2label: dict[int, str] | None = None) -> TaskData:
    """Read every split named in ``cfg`` (plus ``extra`` name→file), validate and tokenize them, through the data
    cache (``cache.py``): a split prepared before with the same file, tokenizer and settings is read back.

    Args:
        cfg: the recipe's data section.
        objective: tokenizes and labels the examples (``objectives.objective_for``).
        seed: carves ``validation_split`` from the training data.
        need_train: read the training split (evaluation of a saved run does not).
        extra: further splits by name, e.g. the file ``lora-ft eval --data`` scores.
        id2label: a trained classifier's label set; otherwise the objective reads it from ``train``.
    """
    # data.streaming: the training split is read as a stream when training starts (``streaming.py``), not here.
    raw, formats, origins = read_checked(cfg, objective, seed, need_train and not cfg.streaming, extra)
    fmt = formats.get("train") or next(iter(formats.values()), "")
    raw = cap_evaluation(raw, cfg, origins)
    data = TaskData({}, fmt, objective.fit_labels(raw, id2label),
                    raw={n: ds for n, ds in raw.items() if n != "train"}, formats=formats)
    for name, ds in raw.items():
        data.splits[name], data.stats[name] = prepared_split(ds, name, formats[name], objective, origins[name])
    return data


def prepared_split(ds: datasets.Dataset, name: str, fmt: str, objective: Objective,
                   origin: Origin) -> tuple[datasets.Dataset, dict[str, int]]:
    """One split tokenized, from the data cache when it holds it (else tokenized into it), with its statistics."""
    facts = {"file": origin.identity(ds), "rows": origin.rows, "format": fmt,
             "objective": {"class": type(objective).__qualname__, **objective.data_identity(),
                           "data": objective.cfg.model_dump(mode="json", exclude=NOT_TOKENIZING)},
             "tokenizer": cache.tokenizer_identity(objective.tokenizer), "code": cache.code_identity(objective)}
    key = cache.digest(facts)
    hit = cache.load_entry(key)
    if hit is not None:
        log.info("data.%s: %d examples tokenized before, read from the data cache %s", name, hit[1]["rows"],
                 cache.entry_path(key))
    max_length = objective.cfg.max_length
    enc, meta = hit or cache.write_entry(key, lambda folder: _tokenize(ds, name, fmt, objective, folder),
                                         {**facts, "source": origin.spec})
    stats = meta["stats"]
    if stats["truncated"]:
        log.warning("data.%s: %d of %d examples were longer than max_length=%d and were truncated%s",
                    name, stats["truncated"], stats["examples"] + stats["dropped"], max_length,
                    f"; {stats['dropped']} lost every answer token and were dropped" if stats["dropped"] else "")
    if stats["dropped"]:
        enc = enc.select(np.flatnonzero(column(enc, "usable")))
    enc = enc.remove_columns(["truncated", "usable"] + (["idx"] if name != "train" else []))
    return enc.with_format(None), stats


def column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """One column of ``ds`` as numpy, through its selection if it has one (never a Python list per row)."""
    values = ds.with_format("arrow")[name]
    return values.to_numpy() if isinstance(values, pa.ChunkedArray) else np.asarray(values)


def _arrow_column(values: list) -> pa.Array:
    """Token-id lists as int32 lists (half of int64's disk and page cache; ids and -100 fit), the rest as inferred."""
    first = next((v for v in values if v), None)
    if isinstance(first, list) and isinstance(first[0], int) and not isinstance(first[0], bool):
        return pa.array(values, type=pa.list_(pa.int32()))
    return pa.array(values)


def _encoder(objective: Objective, fmt: str):
    """The batched tokenizing function: the objective's ``encode_batch``, plus ``length`` (tokens after
    truncation, what the samplers sort and pack by), ``answer_tokens`` (from the first label to the end: what
    ``logits_to_keep`` covers; causal labels only) and ``idx`` (the example's row: augmentation seeds by it)."""
    def encode(batch: dict[str, list], indices: list[int]) -> pa.Table:
        names = list(batch)
        out = objective.encode_batch([dict(zip(names, values, strict=True))
                                      for values in zip(*batch.values(), strict=True)], fmt)
        cols = {k: _arrow_column([o[k] for o in out]) for k in out[0]}
        cols["length"] = pa.array([len(o["input_ids"]) for o in out], pa.int32())
        if isinstance(out[0].get("labels"), list):
            cols["answer_tokens"] = pa.array([_answer_tokens(o["labels"]) for o in out], pa.int32())
        cols["idx"] = pa.array(indices, pa.int64())
        return pa.table(cols)
    return encode


@contextmanager
def _progress_bar(show: bool):
    """datasets' progress bar for one long map, even where the CLI turned the library's bars off (they would
    clutter every small step; minutes of tokenizing deserve one)."""
    was = datasets.is_progress_bar_enabled()
    if show and not was:
        datasets.enable_progress_bars()
    try:
        yield
    finally:
        if show and not was:
            datasets.disable_progress_bars()


def _answer_tokens(labels: list[int]) -> int:
    return len(labels) - next((k for k, v in enumerate(labels) if v != IGNORE), len(labels))


def _tokenize(ds: datasets.Dataset, name: str, fmt: str, objective: Objective,
              folder) -> tuple[datasets.Dataset, dict[str, int]]:
    """Tokenize into ``folder`` (the data cache's new entry) on ``workers`` processes; the statistics from the
    written columns."""
    procs, t0 = workers(len(ds)), time.perf_counter()
    log.info("data.%s: tokenizing %d examples on %d process(es)", name, len(ds), procs)
    with _progress_bar(len(ds) >= PARALLEL_FROM):
        enc = ds.map(_encoder(objective, fmt), batched=True, batch_size=ENCODE_BATCH, with_indices=True,
                     num_proc=procs if procs > 1 else None, remove_columns=ds.column_names,
                     cache_file_name=str(folder / "encoded.arrow"), load_from_cache_file=False,
                     new_fingerprint=folder.name, desc=f"tokenizing {name} ({procs} process{'es' * (procs > 1)})")
    log.info("data.%s: tokenized in %.1f s (%.0f examples/s)", name, time.perf_counter() - t0,
             len(ds) / max(time.perf_counter() - t0, 1e-9))
    usable, lengths = column(enc, "usable").astype(bool), column(enc, "length")
    if not usable.any():
        raise RecipeError(f"data.{name}: every example lost its answer to truncation at data.max_length="
                          f"{objective.cfg.max_length}; raise max_length")
    stats = {"examples": int(usable.sum()), "truncated": int(column(enc, "truncated").sum()),
             "dropped": int((~usable).sum()), "tokens": int(lengths[usable].sum()),
             "max_tokens": int(lengths[usable].max())}
    if "answer_tokens" in enc.column_names:
        stats["answer_tokens"] = int(column(enc, "answer_tokens")[usable].max())
    return enc, stats
