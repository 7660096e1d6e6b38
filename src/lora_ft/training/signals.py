"""Graceful interruption of training: between optimizer steps every process must agree that a signal came.

The handlers and phases are ``interrupts.Signals`` (shared by every command). Stopping mid-step would leave
gradients half-accumulated; stopping between steps lets the loop write a checkpoint that resumes exactly, and
all ranks must stop at the same step, hence the collective below.
"""

from __future__ import annotations

import torch

from ..interrupts import Interrupted, Signals

__all__ = ["Interrupted", "Signals", "requested"]


def requested(signals: Signals, accelerator) -> int | None:
    """The signal number if any process was signalled (a collective on several processes)."""
    if accelerator.num_processes == 1:
        return signals.pending
    flag = torch.tensor(signals.pending or 0, device=accelerator.device)
    signum = int(accelerator.reduce(flag, "max").item())
    return signum or None
