"""interrupts.Signals: immediate phases raise at once, deferred phases record the signal (a second Ctrl-C raises),
nested blocks put the previous handlers back."""

import os
import signal

import pytest

from lora_ft.interrupts import Interrupted, Signals


def _send(sig=signal.SIGTERM):
    os.kill(os.getpid(), sig)  # the handler runs right after this returns


def test_an_immediate_phase_raises_at_once_with_its_name():
    with Signals() as signals, pytest.raises(Interrupted) as caught:
        with signals.phase("loading"):
            _send()
            raise AssertionError("not reached")
    assert (caught.value.signum, caught.value.phase, caught.value.forced) == (signal.SIGTERM, "loading", False)


def test_a_deferred_phase_records_the_signal_and_a_second_ctrl_c_forces():
    with Signals() as signals:
        with signals.phase("a step", immediate=False):
            _send(signal.SIGINT)
            assert signals.pending == signal.SIGINT  # recorded, the step goes on
            with pytest.raises(Interrupted) as caught:
                _send(signal.SIGINT)
        assert caught.value.forced and caught.value.phase == "a step"


def test_a_signal_recorded_in_a_deferred_phase_stops_the_next_immediate_one():
    with Signals() as signals:
        with signals.phase("saving", immediate=False):
            _send()
        with pytest.raises(Interrupted, match="SIGTERM during evaluating"):
            with signals.phase("evaluating"):
                raise AssertionError("not reached")


def test_nested_blocks_restore_the_previous_handlers():
    outer_handler = signal.getsignal(signal.SIGTERM)
    with Signals() as outer:
        mine = signal.getsignal(signal.SIGTERM)
        with Signals():
            assert signal.getsignal(signal.SIGTERM) != mine
        assert signal.getsignal(signal.SIGTERM) == mine
        with pytest.raises(Interrupted):
            with outer.phase("after the inner block"):
                _send()
    assert signal.getsignal(signal.SIGTERM) == outer_handler
