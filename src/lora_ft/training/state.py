"""The training loop's state: everything that must survive a checkpoint for a resumed run to continue exactly.

``LoopState.to_checkpoint`` and ``LoopState.from_checkpoint`` are the only places this state is written or read;
the checkpoint file adds the optimizer, the scheduler and the RNG (``checkpoint.py``). Plain containers and
tensors only, so the file loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from .guards import BestAdapter, ForgettingBudget, OverfittingWatch


@dataclass
class LoopState:
    """Where the run is, and what its evaluations have found so far."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Epochs started (0-based: the epoch the next micro-batch comes from)."""
    position: int = 0
    """Micro-batches of the current epoch already consumed: a resumed run skips exactly these."""
    evaluated_epoch: int = 0
    """Epochs completed when the loop last checked for a per-epoch evaluation (``eval_every`` unset)."""
    stopped: str | None = None
    """Why training ended early (early stopping, the forgetting guard): a resumed run that had stopped only finishes."""
    before: dict[str, dict[str, float]] | None = None
    """The evaluation before training, by split (reused by a resumed run, which does not evaluate again)."""
    generated_before: list[dict[str, Any]] | None = None
    """The generation evaluation's answers before training (``scoring.generation.Answer`` fields), for the samples
    table of a resumed run."""
    best: BestAdapter = field(default_factory=BestAdapter)
    watch: OverfittingWatch = field(default_factory=OverfittingWatch)
    forgetting: ForgettingBudget = field(default_factory=ForgettingBudget)

    def epoch_progress(self, batches_per_epoch: int) -> float:
        """Epochs done as a fraction (for the metrics log); whole epochs while their length is unknown (0: a stream
        not yet read to its end)."""
        if not batches_per_epoch:
            return float(self.epoch)
        return round(self.epoch + self.position / max(batches_per_epoch, 1), 4)

    def to_checkpoint(self) -> dict[str, Any]:
        """Plain containers and tensors (no copy: the checkpoint is written right away)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = {g.name: getattr(value, g.name) for g in fields(value)} if is_dataclass(value) else value
        return out

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> LoopState:
        """The inverse of ``to_checkpoint`` (other keys of the checkpoint file are ignored)."""
        parts = {"best": BestAdapter, "watch": OverfittingWatch, "forgetting": ForgettingBudget}
        values = {f.name: saved[f.name] for f in fields(cls) if f.name in saved}
        for name, kind in parts.items():
            if name in values:
                values[name] = kind(**values[name])
        return cls(**values)
