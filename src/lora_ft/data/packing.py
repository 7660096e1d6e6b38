"""Packing: whole examples laid end to end in rows of ``capacity`` tokens, so no compute goes to padding.

The sampler decides which examples share a row (first-fit decreasing within a shuffled window, then the rows
shuffled and grouped into micro-batches) and yields each micro-batch as one flat list of example indices, row
after row, each row's examples longest first. That order lets the collator rebuild the very same rows with
``next_fit_rows`` (start a new row when the next example does not fit): in first-fit decreasing, the first
(longest) example of every row did not fit into any earlier row when it was placed, and rows only fill up later.

Written by hand: the stack has padding-free collators (TRL's ``DataCollatorWithFlattening``, transformers'
``DataCollatorWithFlattening``) that put a whole batch into one row, but no sampler that packs rows to a token
capacity across a shuffled epoch while keeping Accelerate's batch sharding and an exact resume position.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

PACK_WINDOW = 1024
"""Examples packed together: first-fit decreasing over the whole epoch would cost O(n²) in Python, and within
1024 examples the rows of the docstring chat data are already filled to 99% (``scripts/bench_train.py`` prints
the fill of each run)."""


def first_fit_decreasing(lengths: dict[int, int], capacity: int) -> list[list[int]]:
    """Bins of indices whose lengths add up to at most ``capacity``; each bin longest first."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(lengths, key=lambda k: -lengths[k]):
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def next_fit_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Positions of ``lengths`` grouped in order into rows of at most ``capacity``: the rows ``PackedBatches``
    made, given its order."""
    rows: list[list[int]] = []
    used = capacity
    for i, n in enumerate(lengths):
        if used + n > capacity:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


class PackedBatches:
    """Micro-batches of up to ``rows`` packed rows of at most ``capacity`` tokens each, for training.

    Args:
        lengths: tokens of every training example (each at most ``capacity``).
        capacity: tokens per row (``data.max_length``).
        rows: rows per micro-batch.
        seed: with the epoch, decides the shuffle (the same for every process and for a resumed run).
        in_order: pack the examples in their order, rows unshuffled: what ``data.streaming`` yields for a stream in
            the file's order (``data.shuffle_buffer: 0``), the reference its tests compare with.
    """

    batch_size = None
    """Accelerate shards batches of varying size only when the sampler says it has no fixed size."""

    def __init__(self, lengths: list[int], capacity: int, rows: int, seed: int = 0, in_order: bool = False):
        if max(lengths, default=0) > capacity:
            raise ValueError(f"an example of {max(lengths)} tokens does not fit a row of {capacity}")
        self.lengths, self.capacity, self.rows, self.seed, self.in_order = lengths, capacity, rows, seed, in_order
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This epoch's micro-batches, as flat index lists (see the module docstring for the order)."""
        if self._cache and self._cache[0] == self.epoch:  # copies: accelerate may extend the last batch in place
            return [list(b) for b in self._cache[1]]
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        if not self.in_order:
            rng.shuffle(order)
        packed: list[list[int]] = []
        for start in range(0, len(order), PACK_WINDOW):
            window = order[start : start + PACK_WINDOW]
            packed += first_fit_decreasing({i: self.lengths[i] for i in window}, self.capacity)
        if not self.in_order:
            rng.shuffle(packed)
        out = [[i for row in packed[k : k + self.rows] for i in row] for k in range(0, len(packed), self.rows)]
        self._cache = (self.epoch, out)
        return [list(b) for b in out]

    def fill(self) -> float:
        """Real tokens over computed tokens in this epoch's micro-batches, whose rows are padded to the longest
        row of their micro-batch (1.0: no padding at all)."""
        computed = 0
        for b in self.batches():
            rows = next_fit_rows([self.lengths[i] for i in b], self.capacity)
            computed += len(rows) * max(sum(self.lengths[b[k]] for k in row) for row in rows)
        return sum(self.lengths) / max(computed, 1)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        if self._cache and self._cache[0] == self.epoch:  # no copies: counted again at every epoch's start
            return len(self._cache[1])
        return len(self.batches())
