"""Kill-safe writes of whole folders (checkpoints, adapters, merged models), and reading back what an unsafe
write (a kill while appending, an older version) may have cut short.

Every write goes to a temporary folder first. Replacing a folder that already exists (the same step saved twice,
the final adapter of a second run) renames the old one aside and deletes it only after the new one is in place,
so a kill at any moment leaves one intact copy: either the folder itself or its aside copy, which the next save
or load puts back. A failed write (full disk, permissions) is one ``SaveError`` line that says what to do next.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import LoraFtError, RunError, SaveError, first_line
from .interrupts import Interrupted

log = logging.getLogger(__name__)

# Below either limit a failed write is most likely a full disk (torch.save then says only "unexpected pos").
NEARLY_FULL_FRACTION = 0.01
NEARLY_FULL_BYTES = 100 * 2**20


def _nearly_full(folder: Path) -> bool:
    """True when the file system holding ``folder`` has < 1% or < 100 MB free."""
    probe = folder
    while not probe.exists() and probe != probe.parent:  # the target itself may not exist yet
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return False
    return usage.free < NEARLY_FULL_BYTES or usage.free < NEARLY_FULL_FRACTION * usage.total


def _failed(target: Path, tmp: Path, err: BaseException, retry: str) -> SaveError:
    """One-line SaveError for any write failure; frees the temporary folder (the old copy is untouched)."""
    # Measured before the partial write is removed: that is when a full disk shows.
    full = _nearly_full(target.parent) or getattr(err, "errno", None) == errno.ENOSPC
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    else:  # SafetensorError, torch's RuntimeError: their first line says what happened
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    hint = " (disk full?)" if full and "(disk full?)" not in reason else ""
    return SaveError(f"could not write {target}: {reason}{hint}; the previous copy is intact - {retry}")


def _aside(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")


def recover(folder: Path) -> None:
    """Undo what a kill between 'rename the old copy aside' and 'delete it' left behind.

    Aside copy and no folder: the kill came before the new copy was in place, so the aside one is the last
    intact copy and goes back. Both present: the new copy was committed, so the aside one is stale (it would
    also make the next rename aside fail with ENOTEMPTY).
    """
    aside = _aside(folder)
    if not aside.exists():
        return
    try:
        if folder.exists():
            shutil.rmtree(aside)
        else:
            aside.rename(folder)
            log.warning("restored %s from %s (an earlier save was interrupted)", folder, aside.name)
    except OSError:  # another process got there first (every rank resumes); what it left is what we want
        pass


def _replace(tmp: Path, folder: Path) -> None:
    """Move the complete ``tmp`` to ``folder``; at no point is there no intact copy (see recover)."""
    aside = _aside(folder)
    shutil.rmtree(aside, ignore_errors=True)  # stale from a kill; recover ran first, so folder holds the data
    if folder.exists():
        folder.rename(aside)
    try:
        tmp.rename(folder)  # the commit point
    except OSError:
        if aside.exists() and not folder.exists():
            aside.rename(folder)  # put the previous copy back before reporting
        raise
    shutil.rmtree(aside, ignore_errors=True)


def write_folder(folder: Path, write: Callable[[Path], None], retry: str, tmp: Path | None = None) -> None:
    """Create or replace ``folder`` with what ``write(tmp)`` puts into a fresh temporary folder: a reader never
    sees a half-written folder, and a kill at any moment leaves an intact copy (see ``_replace``/``recover``).

    Used for checkpoints, adapters and merged models alike. Any write failure (OSError, torch's RuntimeError
    "unexpected pos" on a full disk, safetensors' SafetensorError) becomes a one-line SaveError ending in
    ``retry``: what to do next.
    """
    folder = Path(folder)
    tmp = tmp or folder.with_name(f".{folder.name}.tmp")
    recover(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        _replace(tmp, folder)
    except LoraFtError:  # a problem of what is written (a damaged run file it reads), not of the disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # safetensors raises a plain Exception subclass on a full disk
        raise _failed(folder, tmp, e, retry) from None
    except (Interrupted, KeyboardInterrupt):  # a signal: what a kill would leave, tidied up (see recover)
        recover(folder)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Replace one file whole with what ``write(tmp)`` puts into a temporary file beside it (then ``os.replace``):
    a reader, or a command interrupted while writing it, never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Replace a small text file whole (see ``write_file``)."""
    write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def cut_short(text: str) -> bool:
    """Whether a file lora_ft writes whole (YAML, JSON lines: every one ends with a newline) lost its end: cut
    YAML often still parses, its missing keys silently taking their defaults."""
    return bool(text) and not text.endswith("\n")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines log (``metrics.jsonl``); [] when there is none.

    Rows are appended as training goes, so a kill can cut the last one short: an unfinished last line (no
    newline after it) is skipped with a warning. Any other line that does not parse is a RunError naming it."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if n == len(lines) and not text.endswith("\n"):
                log.warning("%s: ignoring its unfinished last line (a crash while it was written)", path)
                continue
            raise RunError(f"{path} line {n} is not valid JSON ({first_line(e)}); delete that line (the rows "
                           "before and after it stay usable)") from None
    return rows
