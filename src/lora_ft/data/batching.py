"""Batching: which examples go into one micro-batch (length-grouped index batches that Accelerate can shard).

How a batch is padded is the objective's business (``Objective.collate``); this module only picks indices.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

GROUPED_WINDOW = 64
"""Batches per length-sorted window when grouping by length (as transformers' ``group_by_length``)."""


class LengthGroupedBatches:
    """Batches of similar length, so little compute goes to padding.

    Training: shuffle with (seed, epoch), sort within windows of ``window`` batches by length, shuffle the
    batches (like transformers' ``group_by_length``); ``window=0`` only shuffles. Evaluation: sorted longest
    first. Indices, not data, so Accelerate can shard it across processes.
    """

    def __init__(self, lengths: list[int], batch_size: int, shuffle: bool, seed: int = 0,
                 window: int = GROUPED_WINDOW):
        self.lengths, self.batch_size, self.shuffle, self.seed = lengths, batch_size, shuffle, seed
        self.window = window
        self.epoch = 0

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

    def batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        if not self.shuffle:
            order.sort(key=lambda i: -self.lengths[i])
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        rng.shuffle(order)
        span = self.batch_size * max(self.window, 1)
        out = []
        for start in range(0, len(order), span):
            chunk = order[start : start + span]
            if self.window:
                chunk.sort(key=lambda i: -self.lengths[i])
            out += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(out)
        # The one short batch goes last: accelerate shards batches pairwise across processes and would
        # drop a short batch (and its partner) found in the middle.
        out.sort(key=lambda b: len(b) < self.batch_size)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)
