"""Graceful interruption: SIGINT/SIGTERM end training after the current step, with a checkpoint
(``errors.TrainingInterrupted`` then carries the exit code)."""

from __future__ import annotations

import logging
import signal
import threading

import torch

log = logging.getLogger(__name__)


class StopOnSignal:
    """Turns SIGINT/SIGTERM into a flag the loop reads between optimizer steps.

    Stopping mid-step would leave gradients half-accumulated; stopping between steps lets the loop write a
    checkpoint that resumes exactly. A second Ctrl-C raises KeyboardInterrupt at once, for a user who does not
    want to wait for the step to finish.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: finishing the current step, then saving a checkpoint (Ctrl-C again to abort)",
                    signal.Signals(signum).name)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, accelerator) -> int | None:
        """The signal number if any process was signalled (all ranks must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor(self.signum or 0, device=accelerator.device)
        signum = int(accelerator.reduce(flag, "max").item())
        return signum or None
