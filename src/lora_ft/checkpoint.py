"""Training checkpoints: adapter + optimizer/scheduler/RNG/data position, written atomically.

Only the trainable weights are saved (peft's adapter format, safetensors); the frozen base is re-loaded
from its source, so a checkpoint of a 7B QLoRA run is tens of MB, not GB. The non-tensor training state
is a ``torch.save`` of plain containers and tensors, read back with ``weights_only=True`` (no pickle code).

Every write goes to a temporary folder first. Replacing a folder that already exists (the same step saved
twice, the final adapter of a second run) renames the old one aside and deletes it only after the new one is
in place, so a kill at any moment leaves one intact copy: either the folder itself or its aside copy, which
the next save or resume puts back.
"""

from __future__ import annotations

import errno
import logging
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from .config import RecipeError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
ADAPTER_FILE = "adapter/adapter_model.safetensors"
# Below either limit a failed write is most likely a full disk (torch.save then says only "unexpected pos").
NEARLY_FULL_FRACTION = 0.01
NEARLY_FULL_BYTES = 100 * 2**20


class SaveError(RuntimeError):
    """Writing a checkpoint or adapter failed (disk full, permissions); what was there before is intact."""


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


RETRY_TRAINING = "free disk space (or set another output_dir) and continue with --resume latest"


def _failed(target: Path, tmp: Path, err: BaseException, retry: str = RETRY_TRAINING) -> SaveError:
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


def _recover(folder: Path) -> None:
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
    """Move the complete ``tmp`` to ``folder``; at no point is there no intact copy (see _recover)."""
    aside = _aside(folder)
    shutil.rmtree(aside, ignore_errors=True)  # stale from a kill; _recover ran first, so folder holds the data
    if folder.exists():
        folder.rename(aside)
    try:
        tmp.rename(folder)  # the commit point
    except OSError:
        if aside.exists() and not folder.exists():
            aside.rename(folder)  # put the previous copy back before reporting
        raise
    shutil.rmtree(aside, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_folder(folder: Path, write: Callable[[Path], None], tmp: Path | None = None,
                 retry: str = RETRY_TRAINING) -> None:
    """Create or replace ``folder`` with what ``write(tmp)`` puts into a fresh temporary folder: a reader never
    sees a half-written folder, and a kill at any moment leaves an intact copy (see ``_replace``/``_recover``).

    Used for checkpoints, adapters and merged models alike. Any write failure (OSError, torch's RuntimeError
    "unexpected pos" on a full disk, safetensors' SafetensorError) becomes a one-line SaveError ending in
    ``retry``: what to do next.
    """
    folder = Path(folder)
    tmp = tmp or folder.with_name(f".{folder.name}.tmp")
    _recover(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        _replace(tmp, folder)
    except Exception as e:  # safetensors raises a plain Exception subclass on a full disk
        raise _failed(folder, tmp, e, retry) from None


def save_adapter(model: PeftModel, folder: Path, tokenizer=None, state_dict: dict | None = None) -> None:
    """Write an adapter folder (and the tokenizer) through ``write_folder``.

    ``state_dict``: weights gathered from a sharded engine (FSDP2/ZeRO-3) instead of the model's own.
    """
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_folder(folder, write)


def save_checkpoint(root: Path, step: int, model: PeftModel, training_state: dict[str, Any], keep: int) -> Path:
    """``root/step-N`` through ``write_folder``, then prune to the newest ``keep``; the previous checkpoints stay
    intact when the write fails."""
    root = Path(root)
    final = root / f"step-{step:08d}"
    recover_checkpoints(root)
    for stale in root.glob(".tmp-step-*"):  # left by a crash during an earlier save: never valid
        shutil.rmtree(stale, ignore_errors=True)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp / "adapter")
        torch.save({**training_state, "rng": rng_state()}, tmp / STATE_FILE)

    # A second save of the same step (a signal on a checkpoint_every step) replaces it like any other folder.
    write_folder(final, write, tmp=root / f".tmp-step-{step:08d}")
    for stale in list_checkpoints(root)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def recover_checkpoints(root: Path) -> None:
    """Put back (or drop) the aside copies an interrupted replacement of a step left under ``root``."""
    if root.is_dir():
        for aside in root.glob(".step-*.old"):
            _recover(aside.with_name(aside.name[1:].removesuffix(".old")))


def list_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def _readable(path: Path) -> bool:
    """Load the state (``weights_only``: a pickle with code is refused) and the adapter; log why not."""
    try:
        torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
        load_file(path / ADAPTER_FILE)
        return True
    except Exception as e:  # missing file, truncated zip, bad safetensors header, pickled code: all "unusable"
        log.warning("skipping checkpoint %s: unreadable (%s)", path, (str(e).strip().splitlines() or [""])[0][:160])
        return False


def find_checkpoint(root: Path, which: str = "latest") -> Path | None:
    """The newest intact checkpoint under ``root``, or None; partial or corrupt ones are skipped with a message.

    ``which`` other than ``latest`` names one checkpoint: a path, or a bare name such as ``step-00000003``
    looked up under ``root``. A named one that is missing or unreadable raises RecipeError listing the
    intact checkpoints there.
    """
    root = Path(root)
    recover_checkpoints(root)
    if which == "latest":
        return next((p for p in reversed(list_checkpoints(root)) if _readable(p)), None)
    path = Path(which).expanduser()
    if not path.exists() and not path.is_absolute():
        path = root / which  # `--resume step-00000003`: the run's own checkpoints, not the cwd
    if path.is_dir() and _readable(path):
        return path
    state = "is not an intact checkpoint" if path.exists() else "does not exist"
    available = [p.name for p in list_checkpoints(root) if _readable(p)]
    raise RecipeError(f"--resume {which}: {path} {state}; intact checkpoints under {root}: "
                      f"{', '.join(available) or 'none'} (give one of them, or --resume latest)")


def load_checkpoint(path: Path, model: PeftModel) -> dict[str, Any]:
    """Restore adapter weights into ``model``; return the rest (optimizer, scheduler, position, ``rng``).

    The caller restores ``rng`` last, just before the first resumed step, so nothing in between draws.
    """
    set_peft_model_state_dict(model, load_file(path / ADAPTER_FILE))
    return torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
