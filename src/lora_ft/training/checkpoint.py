"""Training checkpoints: adapter + optimizer/scheduler/RNG/data position, written atomically.

Only the trainable weights are saved (peft's adapter format, safetensors); the frozen base is re-loaded
from its source, so a checkpoint of a 7B QLoRA run is tens of MB, not GB. The non-tensor training state
is a ``torch.save`` of plain containers and tensors, read back with ``weights_only=True`` (no pickle code).

Checkpoints and adapters are written through ``storage.write_folder`` (a temporary folder, then renamed in), so
a kill at any moment leaves an intact copy. What a checkpoint holds besides the adapter is composed by the
trainer (``LoopState.to_checkpoint`` plus the optimizer and scheduler); this module adds the RNG.
"""

from __future__ import annotations

import logging
import random
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from ..errors import RecipeError, RunError, UsageError, first_line
from ..modeling.adapters import adapter_state_dict
from ..run import RUN_CONFIG, run_config_cut
from ..storage import recover, write_folder

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
ADAPTER_FILE = "adapter/adapter_model.safetensors"
RETRY_TRAINING = "free disk space (or set another output_dir) and continue with --resume latest"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any] | list[dict[str, Any]], rank: int = 0) -> None:
    """Restore the RNG state ``rng_state`` captured, or this process's entry of a list saved by every process
    (each process draws its own dropout masks: a resumed rank must continue its own stream)."""
    if isinstance(state, list):
        if rank >= len(state):
            log.warning("the checkpoint holds the RNG state of %d process(es); process %d continues with process "
                        "0's (the run no longer replays the uninterrupted one exactly)", len(state), rank)
        state = state[rank if rank < len(state) else 0]
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_adapter(model: PeftModel, folder: Path, tokenizer=None, state_dict: dict | None = None) -> None:
    """Write an adapter folder (and the tokenizer) through ``write_folder``.

    ``state_dict``: weights gathered from a sharded engine (FSDP2/ZeRO-3) instead of the model's own.
    Without whole embedding layers, here and in checkpoints (see ``adapter_state_dict``).
    """
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state_dict, save_embedding_layers=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_folder(folder, write, RETRY_TRAINING)


def save_checkpoint(root: Path, step: int, model: PeftModel, training_state: dict[str, Any], keep: int,
                    recipe: str | None = None) -> Path:
    """``root/step-N`` through ``write_folder``, then prune to the newest ``keep``; the previous checkpoints stay
    intact when the write fails. ``training_state`` carries everything but the adapter (the trainer adds the RNG
    states of every process); ``recipe``: the resolved recipe, saved beside the weights so a resumed run can tell
    which of its values the checkpoint can serve (``resume.py``)."""
    root = Path(root)
    final = root / f"step-{step:08d}"
    recover_checkpoints(root)
    for stale in root.glob(".tmp-step-*"):  # left by a crash during an earlier save: never valid
        shutil.rmtree(stale, ignore_errors=True)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp / "adapter", save_embedding_layers=False)
        torch.save(training_state, tmp / STATE_FILE)
        if recipe is not None:
            (tmp / RUN_CONFIG).write_text(recipe, encoding="utf-8")

    # A second save of the same step (a signal on a checkpoint_every step) replaces it like any other folder.
    write_folder(final, write, RETRY_TRAINING, tmp=root / f".tmp-step-{step:08d}")
    for stale in list_checkpoints(root)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def set_aside_after(root: Path, step: int | None) -> Path | None:
    """Move every checkpoint newer than ``step`` (all of them for None) into ``root/abandoned-<time>``, where
    ``list_checkpoints`` (and so ``--resume latest``) never looks; returns that folder, or None if none moved."""
    newer = [c for c in list_checkpoints(root) if step is None or step_of(c) > step]
    if not newer:
        return None
    aside = abandoned_folder(root)
    for c in newer:
        c.rename(aside / c.name)
    return aside


def abandoned_folder(root: Path) -> Path:
    """A new ``root/abandoned-<UTC time>`` folder for the outputs of an abandoned continuation."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    aside, n = root / f"abandoned-{stamp}", 1
    while aside.exists():
        n += 1
        aside = root / f"abandoned-{stamp}-{n}"
    aside.mkdir(parents=True)
    return aside


def recover_checkpoints(root: Path) -> None:
    """Put back (or drop) the aside copies an interrupted replacement of a step left under ``root``."""
    if root.is_dir():
        for aside in root.glob(".step-*.old"):
            recover(aside.with_name(aside.name[1:].removesuffix(".old")))


def list_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def _read_recipe(path: Path) -> None:
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if run_config_cut(text) is None:
            yaml.safe_load(text)
        cut = run_config_cut(text, parsed=True)
        if cut is not None:
            raise ValueError(f"cut short ({cut})")


def damage(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from (which file, and the first line of its error), None
    when it can: the state loads (``weights_only``: a pickle with code is refused), the adapter loads, the saved
    recipe is whole and parses."""
    reads = {STATE_FILE: lambda p: torch.load(p, weights_only=True, map_location="cpu"), ADAPTER_FILE: load_file,
             RUN_CONFIG: _read_recipe}
    for name, read in reads.items():
        try:
            read(path / name)
        except Exception as e:  # noqa: BLE001 - missing file, truncated zip, bad safetensors header, pickled code,
            if "Weights only load failed" in str(e):  # malformed YAML: torch.load alone raises many types
                return f"{name} holds more than tensors and plain values: loading it would run code"
            return f"{name}: {first_line(e, 160)}"
    return None


def _damaged_latest(root: Path, broken: Path, why: str) -> RunError:
    """``--resume latest`` when the newest checkpoint is damaged: name it, and the newest intact one to use."""
    intact = next((p for p in reversed(list_checkpoints(root)) if p != broken and damage(p) is None), None)
    fix = (f"continue from the newest intact one with --resume {intact.name}, or delete {broken.name}" if intact else
           f"no intact checkpoint is left: delete {root} to start again from step 0 with --resume latest, or train "
           "again with --overwrite")
    return RunError(f"--resume latest: the newest checkpoint {broken} is damaged ({why}); {fix}")


def find_checkpoint(root: Path, which: str = "latest", strict: bool = False) -> Path | None:
    """The newest intact checkpoint under ``root``, or None.

    ``which`` other than ``latest`` names one checkpoint: a path, or a bare name such as ``step-00000003``
    looked up under ``root``. A named one that is missing or damaged raises UsageError listing the intact
    checkpoints there. ``strict`` (``--resume latest``): a damaged newest checkpoint is a RunError naming it and
    what to do, never silently passed over for an older one (that would discard its steps without a word);
    otherwise (the message after a signal) damaged ones are skipped with a warning.
    """
    root = Path(root)
    recover_checkpoints(root)
    if which == "latest":
        for path in reversed(list_checkpoints(root)):
            why = damage(path)
            if why is None:
                return path
            if strict:
                raise _damaged_latest(root, path, why)
            log.warning("skipping checkpoint %s: damaged (%s)", path, why)
        return None
    path = Path(which).expanduser()
    if not path.exists() and not path.is_absolute():
        path = root / which  # `--resume step-00000003`: the run's own checkpoints, not the cwd
    why = damage(path) if path.is_dir() else "not a folder"
    if why is None:
        return path
    state = f"is not an intact checkpoint ({why})" if path.exists() else "does not exist"
    available = [p.name for p in list_checkpoints(root) if damage(p) is None]
    raise UsageError(f"--resume {which}: {path} {state}; intact checkpoints under {root}: "
                      f"{', '.join(available) or 'none'} (give one of them, or --resume latest)")


def load_checkpoint(path: Path, model: PeftModel) -> dict[str, Any]:
    """Restore adapter weights into ``model``; return the rest (optimizer, scheduler, position, ``rng``).

    The weights must fit the model exactly: peft's loader would skip missing or extra tensors without a word.
    The caller restores ``rng`` last, just before the first resumed step, so nothing in between draws.
    """
    weights = load_file(path / ADAPTER_FILE)
    expected = adapter_state_dict(model)
    missing, extra = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & weights.keys() if expected[k].shape != weights[k].shape)
    if missing or extra or shapes:
        what = [f"{len(x)} {w} (e.g. {x[0]})" for x, w in ((missing, "missing"), (extra, "unexpected"),
                                                          (shapes, "of another shape")) if x]
        raise RecipeError(f"checkpoint {path} does not fit this recipe's adapter: tensors {', '.join(what)}; it was "
                          "trained with another model or lora section (restore them, or start a new run)")
    set_peft_model_state_dict(model, weights)
    return torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
