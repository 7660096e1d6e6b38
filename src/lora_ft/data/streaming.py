"""``data.streaming: true``: the training file read as a stream, for files larger than memory.

The file is read with ``datasets.load_dataset(..., streaming=True)`` (an ``IterableDataset``; jsonl/json/csv/parquet
read as ``reading.read_split`` reads them, or a Hub dataset) and never held whole: ``STREAM_BATCH`` rows at a time
are taken as Arrow, their cells checked (``Objective.check_rows``, row numbers of the stream), tokenized and
truncated by the same batched encoder as the map-style path (``prepare._encoder``: the same columns, ``idx`` the
row's place in the stream), and the examples that lost every answer to truncation are dropped (as ``prepare``
drops them).

Batches, so that the stream's first N micro-batches equal the map-style samplers' first N over the same order
(``PackedBatches`` / ``LengthGroupedBatches`` with ``in_order=True``; ``tests/test_streaming.py`` compares them):

- order: the file's with ``data.shuffle_buffer: 0``; else datasets' ``shuffle(seed=train.seed, buffer_size=...)``,
  a new order each epoch (``set_epoch``). There is no global shuffle and no length grouping (``group_by_length``
  true is refused, ``auto`` does nothing): a stream is read once per epoch, front to back.
- packed (causal LM SFT where ``data.packing`` allows it): windows of ``packing.PACK_WINDOW`` kept examples, each packed
  by ``first_fit_decreasing`` (the map-style packer's capacity and boundaries; the collator restarts positions on
  each example), the rows in that order, ``rows`` rows per micro-batch across windows;
- unpacked: ``micro_batch_size`` consecutive examples (fewer where ``max_tokens_per_batch`` caps a padded batch).

Resume, exact by position: after each micro-batch the stream knows its ``Point``: the stream row where the window
of the first row not yet batched starts, and how many of that window's rows were batched. A checkpoint records it;
a resumed run reads (parses, never tokenizes) the epoch's rows up to that row, packs again from there (the same
windows, so the same rows) and drops the rows already trained on. datasets' own ``IterableDataset.state_dict()``
is not used: it loses the shuffle buffer's contents on resume (its docstring says so) and records the last row
read, while the packer reads a window ahead of what it has batched.

Processes: every process reads the whole stream and keeps micro-batches ``process``, ``process + processes``, ...
(accelerate's ``BatchSamplerShard`` order, so each trains on distinct rows and the batches are the ones a
map-style run of the same order gets); the last round of an epoch that does not give every process a batch is
dropped, so all processes end an epoch together and one ``Point`` describes them all. Each process tokenizes the
whole stream: the price of that exact, shared position.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

import datasets
import pyarrow as pa
from accelerate.utils import send_to_device

from ..errors import DataError, RecipeError, first_line
from ..recipe import DataConfig
from . import packing
from .cells import Where
from .packing import first_fit_decreasing
from .prepare import _encoder
from .reading import open_stream

if TYPE_CHECKING:  # objectives import this package; the objective is only passed in
    from ..objectives import Objective

log = logging.getLogger(__name__)

STREAM_BATCH = 256
"""Rows read, checked and tokenized together (a tokenizer is much faster on a batch than row by row)."""
PREFIX_EXAMPLES = 10_000
"""Rows of a streamed training file that ``validate`` and ``inspect`` read (the rest are checked as training reads
them)."""
END = -1
"""``Point.examples`` of an epoch read to its end."""


@dataclass(frozen=True)
class StreamWhere(Where):
    """``Where`` for a slice of a stream: row numbers counted from the stream's start."""

    offset: int = 0
    shuffled: bool = False

    def cell(self, row: int, column: str) -> str:
        place = f"row {self.offset + row + 1} of the stream" + (
            " (shuffled: data.shuffle_buffer 0 numbers the file's rows)" if self.shuffled else "")
        return f"{self.field}: {self.source} {place}, column '{column}'"


@dataclass
class Point:
    """Where an epoch's micro-batches continue: what a checkpoint records (``data.streaming``)."""

    epoch: int = 0
    examples: int = 0
    """Rows of the (shuffled) stream before the window of the first row not yet batched (``END``: none left)."""
    rows: int = 0
    """That window's rows already batched."""
    batches: int = 0
    """Micro-batches of this epoch made so far, over all processes."""


def open_train(cfg: DataConfig, objective: Objective) -> tuple[datasets.IterableDataset, str]:
    """The training stream and its data format (from its first row's columns, read before any model loads)."""
    ds = open_stream(cfg.train, "data.train")
    first = next(_tables(ds, Where("data.train", cfg.train), 1), None)
    if first is None:
        raise RecipeError(f"data.train: {cfg.train} holds no examples")
    return ds, objective.detect_format(first.column_names, "train")


def read_prefix(spec: str, field: str, n: int | None = None) -> datasets.Dataset:
    """The first ``n`` rows (default ``PREFIX_EXAMPLES``) of a streamed file as a ``Dataset``: what ``validate`` and
    ``inspect`` check under ``data.streaming`` (bounded, whatever the file's size)."""
    n = n or PREFIX_EXAMPLES
    ds = open_stream(spec, field)
    tables = list(islice(_tables(ds, Where(field, spec), min(n, STREAM_BATCH)), -(-n // STREAM_BATCH)))
    if not tables:
        raise RecipeError(f"{field}: {spec} holds no examples")
    return datasets.Dataset(datasets.table.InMemoryTable(pa.concat_tables(tables).slice(0, n)))


def _tables(ds: datasets.IterableDataset, where: Where, size: int = STREAM_BATCH,
            epoch: int = 0) -> Iterator[pa.Table]:
    """The stream ``size`` rows at a time, as Arrow; a row that does not parse is one ``DataError`` line."""
    arrow = ds.with_format("arrow")
    arrow.set_epoch(epoch)  # after with_format, which starts a new dataset at epoch 0
    tables = iter(arrow.iter(batch_size=size))
    while True:
        try:
            table = next(tables)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - datasets wraps parser errors in several types (as reading._read_file)
            raise DataError(f"{where.field}: cannot parse {where.source} (streaming): "
                            f"{first_line(e.__cause__ or e)}") from None
        yield table


class TrainStream:
    """The training micro-batches of a stream, on this process's device (see the module docstring).

    Args:
        ds: the training stream (``open_train``).
        objective: checks, tokenizes and collates.
        fmt: the data format.
        collate: makes a batch of a micro-batch's examples (the packed collator for packed rows).
        capacity: tokens per packed row; None: unpacked.
        batch: rows per packed micro-batch, or examples per unpacked one.
        max_tokens: unpacked: the cap on a padded batch's tokens (``train.max_tokens_per_batch``).
        buffer: ``data.shuffle_buffer`` (0: the file's order).
        seed: the shuffle's seed.
        process: this process's index; processes: how many train together.
        device: where batches go (None: left where the collator made them).
        source: the file (or Hub id), for messages.
    """

    def __init__(self, ds: datasets.IterableDataset, objective: Objective, fmt: str, collate: Callable,
                 capacity: int | None, batch: int, max_tokens: int | None = None, buffer: int = 0, seed: int = 0,
                 process: int = 0, processes: int = 1, device: Any = None, source: str = "the stream"):
        self.ds = ds.shuffle(seed=seed, buffer_size=buffer) if buffer else ds
        self.objective, self.fmt, self.collate, self.capacity = objective, fmt, collate, capacity
        self.batch, self.max_tokens, self.shuffled = batch, max_tokens, bool(buffer)
        self.process, self.processes, self.device = process, processes, device
        self.where = Where("data.train", source)
        self.epoch = 0
        self.point = Point()
        """After the last micro-batch this process yielded: what a checkpoint records."""
        self.restored: Point | None = None
        self._per_epoch: int | None = None  # per-process micro-batches of an epoch, once one was read whole

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        """Micro-batches per process of an epoch: known once one epoch was read to its end (0 until then)."""
        return self._per_epoch or 0

    def restore(self, saved: dict[str, int] | None) -> None:
        """A checkpoint's ``Point`` (None: none recorded, the epoch's batches are made again and skipped)."""
        self.restored = Point(**saved) if saved else None

    def from_position(self, position: int) -> Iterator[dict]:
        """This epoch's batches after the first ``position`` this process already trained on."""
        start, skip = Point(self.epoch), position * self.processes
        if self.restored is not None and self.restored.epoch == self.epoch and self.restored.batches == skip:
            start, skip = self.restored, 0
        elif position:
            log.warning("data.streaming: no stream position in the checkpoint for epoch %d, batch %d: making the "
                        "epoch's first %d micro-batches again to skip them", self.epoch, position, skip)
        self.restored = None
        return self._own(start, skip)

    def __iter__(self) -> Iterator[dict]:
        return self.from_position(0)

    def _own(self, start: Point, skip: int) -> Iterator[dict]:
        """This process's micro-batches, collated, of every complete round of ``processes`` micro-batches."""
        rounds: list[list[dict]] = []
        mine = 0
        for n, (examples, point) in enumerate(self._micro_batches(start)):
            if n < skip:
                continue
            rounds.append(examples)
            if len(rounds) == self.processes:
                self.point = point
                mine += 1
                batch = self.collate(rounds[self.process])
                yield batch if self.device is None else send_to_device(batch, self.device)
                rounds = []
        if start.batches == 0 and not skip:
            self._per_epoch = mine
        if mine == 0 and start.batches == 0 and not skip:
            raise RecipeError(f"data.train: {self.where.source} gave no training batch for {self.processes} "
                              "process(es): no example kept an answer within data.max_length, or the file is empty")

    def _micro_batches(self, start: Point) -> Iterator[tuple[list[dict], Point]]:
        """The epoch's micro-batches over all processes from ``start``, each with the ``Point`` after it."""
        rows = self._rows(start.examples)
        for _ in range(start.rows):  # rows trained on before the checkpoint
            next(rows)
        pending: deque[tuple[list[dict], int, int]] = deque()
        made, done = start.batches, start.examples == END
        while True:
            take, closed = self._fit(pending)
            while not done and not closed:
                row = next(rows, None)
                if row is None:
                    done = True
                else:
                    pending.append(row)
                    take, closed = self._fit(pending)
            if not pending:
                return
            batch = [ex for _ in range(take) for ex in pending.popleft()[0]]
            if not pending and not done:  # the next row says where the stream continues
                row = next(rows, None)
                done = row is None
                pending.extend([row] if row is not None else [])
            made += 1
            head = pending[0] if pending else (None, END, 0)
            yield batch, Point(self.epoch, head[1], head[2], made)

    def _fit(self, pending: deque) -> tuple[int, bool]:
        """Rows of ``pending`` that the next micro-batch takes, and whether it is complete (no further row could
        join it): ``rows`` packed rows; unpacked, ``LengthGroupedBatches._split``'s rule."""
        if self.capacity is not None or self.max_tokens is None:
            take = min(self.batch, len(pending))
            return take, take == self.batch
        longest = 0
        for k, (row, _, _) in enumerate(pending):
            n = len(row[0]["input_ids"])
            if k and (k == self.batch or (k + 1) * max(longest, n) > self.max_tokens):
                return k, True
            longest = max(longest, n)
        return len(pending), len(pending) == self.batch

    def _rows(self, start: int) -> Iterator[tuple[list[dict], int, int]]:
        """(a row's examples, the stream row where its window starts, the row's index in its window) from stream
        row ``start`` on: packed, ``first_fit_decreasing`` over windows of ``packing.PACK_WINDOW`` examples (each row
        longest first, as ``PackedBatches`` orders it); unpacked, one example per row and window."""
        if start == END:
            return
        examples = self._examples(start)
        while window := list(islice(examples, packing.PACK_WINDOW if self.capacity is not None else 1)):
            if self.capacity is None:
                yield window, window[0]["idx"], 0
                continue
            bins = first_fit_decreasing({i: len(ex["input_ids"]) for i, ex in enumerate(window)}, self.capacity)
            for k, b in enumerate(bins):
                yield [window[i] for i in b], window[0]["idx"], k

    def _examples(self, start: int) -> Iterator[dict]:
        """Every kept example from stream row ``start`` on, checked, tokenized and truncated; the rows before
        ``start`` are read (parsed) but not tokenized."""
        encode, at, truncated, dropped = _encoder(self.objective, self.fmt), 0, 0, 0
        for table in _tables(self.ds, self.where, epoch=self.epoch):
            if at + len(table) <= start:
                at += len(table)
                continue
            table, at = table.slice(max(start - at, 0)), max(at, start)
            where = StreamWhere(self.where.field, self.where.source, at, self.shuffled)
            self.objective.check_rows(datasets.Dataset(datasets.table.InMemoryTable(table)), self.fmt, where)
            for ex in encode(table.to_pydict(), list(range(at, at + len(table)))).to_pylist():
                truncated += ex.pop("truncated")
                if ex.pop("usable"):
                    yield ex
                else:
                    dropped += 1
            at += len(table)
        if truncated:
            log.warning("data.train (streaming, epoch %d): %d example(s) were longer than max_length=%d and were "
                        "truncated%s", self.epoch, truncated, self.objective.cfg.max_length,
                        f"; {dropped} lost every answer token and were dropped" if dropped else "")

    def state(self) -> dict[str, int]:
        """The ``Point`` a checkpoint records."""
        return asdict(self.point)
