"""Ctrl-C and SIGTERM, phase by phase, for every command.

A command runs as a sequence of named phases. In an *immediate* phase (loading a model, reading data, evaluating,
merging: work that can simply be dropped) the signal handler raises ``Interrupted`` at once; in a *deferred*
phase (a training step, a final save: work that must not be cut in half) it only records the signal, and the code
asks ``pending`` at a point where stopping loses nothing. A second Ctrl-C in a deferred phase raises at once, for
a user who does not want to wait.

``Interrupted`` derives from ``BaseException``, as ``KeyboardInterrupt`` does, so that the ``except Exception``
of library code (datasets wraps parser errors that way) cannot turn it into something else. Whoever catches it
says what was kept and which command continues (the trainer, the sweep, the CLI for the other commands).
This module imports nothing heavy: ``lora-ft validate`` uses it too.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):  # noqa: N818 - named like KeyboardInterrupt, which it generalises
    """A signal ended the phase ``phase``; ``forced``: a second Ctrl-C while a deferred phase was finishing."""

    def __init__(self, signum: int, phase: str, forced: bool = False):
        super().__init__(f"{signal.Signals(signum).name} during {phase}")
        self.signum, self.phase, self.forced = signum, phase, forced

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class Signals:
    """SIGINT/SIGTERM handlers for the duration of a ``with`` block, answering according to the current phase.

    Nested blocks (the CLI's, then the trainer's) each install their own handlers and put the previous ones back
    on exit. Outside the main thread no handler can be set: signals then keep their default behaviour.
    """

    def __init__(self, phase: str = "startup") -> None:
        self.signum: int | None = None
        self.current, self.immediate = phase, True
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        forced = self.signum is not None and signum == signal.SIGINT
        if self.signum is None:
            self.signum = signum
        if self.immediate or forced:
            raise Interrupted(signum, self.current, forced=forced and not self.immediate)
        # Written straight to the file descriptor: the handler may run while the main code is inside a write to
        # stderr (a progress bar, a log line), and a second buffered write there raises "reentrant call".
        message = f"{signal.Signals(signum).name} received: finishing {self.current} first (Ctrl-C again " \
                  "to abort at once)\n"
        try:
            os.write(sys.stderr.fileno(), message.encode())
        except (OSError, ValueError):  # no usable stderr (closed, replaced by an object without a descriptor)
            pass

    @contextmanager
    def phase(self, name: str, immediate: bool = True) -> Iterator[Signals]:
        """Run the block as phase ``name``. Entering an immediate phase with a signal already recorded (it came
        while a deferred phase was finishing) raises at once."""
        previous = self.current, self.immediate
        self.current, self.immediate = name, immediate
        try:
            if immediate and self.signum is not None:
                raise Interrupted(self.signum, name)
            yield self
        finally:
            self.current, self.immediate = previous

    @property
    def pending(self) -> int | None:
        """The signal recorded during a deferred phase, if any."""
        return self.signum
