"""Token-level augmentation of training examples (``data.augment``), applied as batches are built, seeded.

Never applied to validation or test data. NEFTune, which perturbs embeddings rather than tokens, is a model hook
(``training/neftune.py``).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from ..recipe import AugmentConfig


def _token_dropout(ids: list[int], p: float, rng: random.Random, protected: set[int], unk: int) -> list[int]:
    return [t if t in protected or rng.random() >= p else unk for t in ids]


def _random_deletion(ids: list[int], p: float, rng: random.Random, protected: set[int], unk: int) -> list[int]:
    kept = [t for t in ids if t in protected or rng.random() >= p]
    return kept if any(t not in protected for t in kept) else ids  # never delete every word


def _random_swap(ids: list[int], p: float, rng: random.Random, protected: set[int], unk: int) -> list[int]:
    ids = list(ids)
    free = [i for i, t in enumerate(ids) if t not in protected]
    for _ in range(int(p * len(free))):
        a, b = rng.sample(free, 2) if len(free) > 1 else (free[0], free[0])
        ids[a], ids[b] = ids[b], ids[a]
    return ids


# The registry: a new augmentation is a function (ids, strength, rng, protected ids, unk id) -> ids,
# plus a float field of the same name in config.AugmentConfig.
TOKEN_AUGMENTATIONS: dict[str, Callable[..., list[int]]] = {
    "token_dropout": _token_dropout,
    "random_deletion": _random_deletion,
    "random_swap": _random_swap,
}


class Augmenter:
    """Applies the enabled token augmentations to one training example.

    The random stream is derived from (seed, epoch, example index), not from a running counter, so the same
    example gets the same augmentation in a resumed run, and every epoch sees a new variant.
    """

    def __init__(self, cfg: AugmentConfig, seed: int, special_ids: set[int], unk_id: int):
        self.active = [(name, getattr(cfg, name)) for name in TOKEN_AUGMENTATIONS if getattr(cfg, name)]
        self.seed, self.special, self.unk = seed, special_ids, unk_id
        self.epoch = 0

    def __bool__(self) -> bool:
        return bool(self.active)

    def __call__(self, row: dict) -> dict:
        rng = random.Random(hash((self.seed, self.epoch, row["idx"])))
        ids = row["input_ids"]
        for name, strength in self.active:
            ids = TOKEN_AUGMENTATIONS[name](ids, strength, rng, self.special, self.unk)
        out = dict(row, input_ids=ids, attention_mask=[1] * len(ids))
        if "token_type_ids" in row:  # keep segment ids aligned: pad/trim the first segment's zeros
            types = row["token_type_ids"]
            out["token_type_ids"] = ([0] * (len(ids) - len(types)) + types)[-len(ids):] if len(ids) else []
        return out
