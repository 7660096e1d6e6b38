"""Packing: every example exactly once per epoch, rows within capacity and well filled, the collator rebuilds the
sampler's rows, the same batches for the same (seed, epoch)."""

import random

import pytest

from lora_ft.data.packing import PackedBatches, first_fit_decreasing, next_fit_rows


def _lengths(n: int, seed: int, low: int = 5, high: int = 120) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def test_every_example_once_in_rows_that_fit_and_the_collator_rebuilds_them():
    lengths = _lengths(3000, 0)  # three packing windows
    sampler = PackedBatches(lengths, capacity=256, rows=4, seed=7)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(3000))
    for b in batches:
        rows = next_fit_rows([lengths[i] for i in b], 256)
        assert 1 <= len(rows) <= 4
        assert all(sum(lengths[b[k]] for k in row) <= 256 for row in rows)
    assert sampler.fill() > 0.95  # padding only at the end of each row, to the micro-batch's longest row
    again = PackedBatches(lengths, capacity=256, rows=4, seed=7)
    assert again.batches() == batches
    sampler.set_epoch(1)
    assert sampler.batches() != batches and sorted(i for b in sampler.batches() for i in b) == list(range(3000))


@pytest.mark.parametrize("seed", range(5))
def test_next_fit_in_the_samplers_order_gives_back_first_fit_decreasing_rows(seed):
    lengths = dict(enumerate(_lengths(200, seed, high=60)))
    bins = first_fit_decreasing(lengths, 100)
    order = [i for row in bins for i in row]
    rebuilt = next_fit_rows([lengths[i] for i in order], 100)
    assert [[order[k] for k in row] for row in rebuilt] == bins


def test_a_too_long_example_is_refused_and_accelerate_sees_varying_batch_sizes():
    with pytest.raises(ValueError, match="does not fit a row of 10"):
        PackedBatches([5, 11], capacity=10, rows=2)
    sampler = PackedBatches([5] * 10, capacity=10, rows=2)
    assert sampler.batch_size is None and len(sampler) == len(sampler.batches()) == 3
