"""Command-line values: every number with its range, every path expanded, and one-line errors.

argparse reports a bad value as a usage block plus an error line; ``Parser`` prints one ``lora-ft: error:`` line
instead (exit status 2, as for every usage error), the way every other error of lora_ft reads. The types here
are what ``cli.build_parser`` gives each flag: a number outside its range, an empty path, a size that is no size
is refused before any command runs. Where an output may go is decided by the command that writes it (it knows
its inputs): ``RunFolder.check_location``, ``merge._check_out``, ``check_output_file``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import UsageError

SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*", re.IGNORECASE)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``lora-ft: error: train: argument --trials: ...``."""

    def error(self, message: str):
        command = self.prog.removeprefix("lora-ft").strip()
        sys.stderr.write(f"lora-ft: error: {command + ': ' if command else ''}{message} (see {self.prog} --help)\n")
        sys.exit(2)


def _named(parse: Callable, name: str) -> Callable:
    parse.__name__ = name  # argparse names the type in its message when a value fails
    return parse


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number in [low, high]."""
    bounds = f"at least {low}" if high is None else f"between {low} and {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number {bounds}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {bounds} (got {value})")
        return value

    return _named(parse, "integer")


def number(low: float, high: float | None = None, low_open: bool = False) -> Callable[[str], float]:
    """A finite number ≥ low (> low with ``low_open``) and ≤ high."""
    bounds = (f"> {low:g}" if low_open else f"≥ {low:g}") + (f" and ≤ {high:g}" if high is not None else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or \
                (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds} (got {text})")
        return value

    return _named(parse, "number")


def size(text: str) -> str:
    """A positive size such as ``5GB``, ``500MiB`` or a number of bytes (the text itself is kept)."""
    m = SIZE.fullmatch(text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size such as 5GB or 500MB, got {text!r}")
    return text.strip()


def path(text: str) -> str:
    """A path as a user means it: ``~`` expanded; an empty value (an unset shell variable) is refused rather than
    read as the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a path")
    return str(Path(text).expanduser())


def text(value: str) -> str:
    """A value that must not be empty (a repository id, a model id, a grid axis)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty")
    return value


def resume(value: str) -> str:
    """``latest``, a checkpoint name (``step-00000003``) or a checkpoint folder."""
    return value if value == "latest" else path(value)


def check_output_file(out: Path, flag: str, inputs: dict[str, Path], protected: list[Path]) -> None:
    """Refuse an output file that would replace an input (``inputs``: flag → file), a folder, the current
    directory, or a file in one of ``protected`` (a run's own outputs, the base model's folder)."""
    target = out.resolve()
    if out.is_dir() or target == Path.cwd().resolve():
        raise UsageError(f"{flag} {out} is a folder; give a file name, e.g. predictions.jsonl")
    for name, source in inputs.items():
        if source.exists() and target == source.resolve():
            raise UsageError(f"{flag} {out} is the {name} file itself; write the output to another file")
    for folder in protected:
        folder = folder.resolve()
        if target == folder or folder in target.parents:
            raise UsageError(f"{flag} {out} lies inside {folder}, which lora_ft writes itself; choose another file")
