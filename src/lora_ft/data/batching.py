"""Batching: which examples go into one micro-batch (length-grouped index batches that Accelerate can shard).

How a batch is padded is the objective's business (``Objective.collate``); this module only picks indices.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

GROUPED_WINDOW = 64
"""Batches per length-sorted window when grouping by length (as transformers' ``group_by_length``)."""


def lengths_of(ds) -> list[int]:
    """Tokens of every example of a tokenized split: its ``length`` column (``data.prepare`` writes it; read as one
    Arrow column), else counted from ``input_ids``."""
    if "length" in ds.column_names:
        values = ds.with_format("arrow")["length"]
        return (values.to_numpy() if isinstance(values, pa.ChunkedArray) else np.asarray(values)).tolist()
    return [len(x) for x in ds["input_ids"]]


class LengthGroupedBatches:
    """Batches of similar length, so little compute goes to padding.

    Training: shuffle with (seed, epoch), sort within windows of ``window`` batches by length, shuffle the
    batches (like transformers' ``group_by_length``); ``window=0`` only shuffles. Evaluation: sorted longest
    first. ``in_order``: consecutive batches of the examples in their order (what ``data.streaming`` yields for a
    stream in the file's order, the reference its tests compare with). Indices, not data, so Accelerate can shard it
    across processes.
    """

    def __init__(self, lengths: list[int], batch_size: int, shuffle: bool, seed: int = 0,
                 window: int = GROUPED_WINDOW, max_tokens: int | None = None, in_order: bool = False):
        self.lengths, self.shuffle, self.seed, self.window = lengths, shuffle, seed, window
        self.in_order = in_order
        self.size, self.max_tokens = batch_size, max_tokens
        # Accelerate evens out batches of a fixed size; under a token cap sizes vary, which it must be told.
        self.batch_size = batch_size if max_tokens is None else None
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    @staticmethod
    def window_for(group_by_length: str | bool, auto_window: int) -> int:
        """Batches per length-sorted window that ``data.group_by_length`` asks for; 0 = shuffle only.

        ``auto``: the objective's own window (``Objective.length_window``); ``true``: ``GROUPED_WINDOW``.
        """
        if group_by_length == "auto":
            return auto_window
        return GROUPED_WINDOW if group_by_length else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _split(self, order: list[int]) -> list[list[int]]:
        """Consecutive batches of ``order``: ``size`` examples, fewer where padding to the longest would pass the
        token cap."""
        if self.max_tokens is None:
            return [order[i : i + self.size] for i in range(0, len(order), self.size)]
        out: list[list[int]] = []
        longest = 0
        for i in order:
            n = self.lengths[i]
            if out and len(out[-1]) < self.size and (len(out[-1]) + 1) * max(longest, n) <= self.max_tokens:
                out[-1].append(i)
                longest = max(longest, n)
            else:
                out.append([i])
                longest = n
        return out

    def batches(self) -> list[list[int]]:
        if self._cache and self._cache[0] == self.epoch:  # copies: accelerate may extend the last batch in place
            return [list(b) for b in self._cache[1]]
        order = list(range(len(self.lengths)))
        if self.in_order:
            return self._split(order)
        if not self.shuffle:
            order.sort(key=lambda i: -self.lengths[i])
            return self._split(order)
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        rng.shuffle(order)
        span = self.size * max(self.window, 1)
        out = []
        for start in range(0, len(order), span):
            chunk = order[start : start + span]
            if self.window:
                chunk.sort(key=lambda i: -self.lengths[i])
            out += self._split(chunk)
        rng.shuffle(out)
        if self.batch_size is not None:
            # The one short batch goes last: accelerate shards batches pairwise across processes and would
            # drop a short batch (and its partner) found in the middle.
            out.sort(key=lambda b: len(b) < self.batch_size)
        self._cache = (self.epoch, out)
        return [list(b) for b in out]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        if self.max_tokens is None:
            return -(-len(self.lengths) // self.size)
        return len(self.batches())
