"""Training checkpoints: adapter + optimizer/scheduler/RNG/data position, written atomically.

Only the trainable weights are saved (peft's adapter format, safetensors); the frozen base is re-loaded
from its source, so a checkpoint of a 7B QLoRA run is tens of MB, not GB. The non-tensor training state
is a ``torch.save`` of plain containers and tensors, read back with ``weights_only=True`` (no pickle code).
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

log = logging.getLogger(__name__)


class SaveError(RuntimeError):
    """Writing a checkpoint or adapter failed (disk full, permissions); what was there before is intact."""


def _failed(target: Path, tmp: Path, err: OSError) -> SaveError:
    shutil.rmtree(tmp, ignore_errors=True)  # free what the failed write took; the old copy is untouched
    return SaveError(f"could not write {target}: {err.strerror or err}; the previous copy is intact - free disk "
                     "space (or set another output_dir) and continue with --resume latest")

STATE_FILE = "trainer_state.pt"
ADAPTER_FILE = "adapter/adapter_model.safetensors"


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


def save_adapter(model: PeftModel, folder: Path, tokenizer=None, state_dict: dict | None = None) -> None:
    """Write an adapter folder atomically: a reader never sees a half-written adapter.

    ``state_dict``: weights gathered from a sharded engine (FSDP2/ZeRO-3) instead of the model's own.
    """
    tmp = folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    except OSError as e:
        raise _failed(folder, tmp, e) from None
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(root: Path, step: int, model: PeftModel, training_state: dict[str, Any], keep: int) -> Path:
    """``root/step-N`` via a temporary folder and a rename, then prune to the newest ``keep``."""
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    for stale in root.glob(".tmp-step-*"):  # left by a crash during an earlier save: never valid
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp / "adapter")
        torch.save({**training_state, "rng": rng_state()}, tmp / STATE_FILE)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        raise _failed(final, tmp, e if isinstance(e, OSError) else OSError(str(e))) from None
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)  # the commit point: before it the previous checkpoint is the latest intact one
    for stale in list_checkpoints(root)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def find_checkpoint(root: Path, which: str = "latest") -> Path | None:
    """The newest intact checkpoint (or the one named); partial or corrupt ones are skipped with a message."""
    candidates = [Path(which)] if which != "latest" else list(reversed(list_checkpoints(root)))
    for path in candidates:
        try:
            torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
            load_file(path / ADAPTER_FILE)
            return path
        except Exception as e:  # missing file, truncated zip, bad safetensors header: all mean "unusable"
            log.warning("skipping checkpoint %s: unreadable (%s)", path, str(e).splitlines()[0][:120])
    return None


def load_checkpoint(path: Path, model: PeftModel) -> dict[str, Any]:
    """Restore adapter weights into ``model``; return the rest (optimizer, scheduler, position, ``rng``).

    The caller restores ``rng`` last, just before the first resumed step, so nothing in between draws.
    """
    set_peft_model_state_dict(model, load_file(path / ADAPTER_FILE))
    return torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
