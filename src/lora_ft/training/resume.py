"""Continuing a run: where it starts from, whether the recipe still fits that checkpoint, and what was abandoned.

A checkpoint saves the resolved recipe beside its weights. On ``--resume`` the new recipe is compared with it:

- ``FIXED`` keys (the model, the whole ``lora`` section) decide which weights exist and what they mean; a
  checkpoint cannot serve another value, and the run is refused with the changed keys named;
- ``REPLAY`` keys (the training data, its tokenization and order, the batch sizes, the seed, the freezing
  schedule, the compute dtype) change which examples come next or how they are computed; the run continues,
  with a warning that it no longer replays the uninterrupted one;
- everything else is served: the length of the run (``max_steps``, ``epochs``), evaluation and early stopping,
  logging, checkpointing, the learning rates and weight decay (``keep_new_hyperparameters``), the guards.

Resuming from a checkpoint older than the newest abandons everything after it: the newer checkpoints (and the
metrics rows of their steps) move to ``checkpoints/abandoned-<time>``, so ``--resume latest`` can never pick a
checkpoint of the abandoned branch (e.g. the weights that led to a NaN).
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch.optim.lr_scheduler import LambdaLR

from ..errors import RecipeError, RunError
from ..recipe import Recipe, changes, describe_changes
from ..run import ADAPTER, RUN_CONFIG, RunFolder, read_run_config
from . import checkpoint as ckpt

log = logging.getLogger(__name__)

FIXED = ("model.name", "model.task", "model.quant", "model.double_quant", "model.revision", "model.trust_remote_code",
         "model.chat_template", "lora.")
"""Keys a checkpoint cannot serve another value of (``model.chat_template``: the vocabulary and the trained token
rows are the template's)."""
REPLAY = ("data.train", "data.validation_split", "data.format", "data.max_length", "data.train_on_prompt",
          "data.system_prompt", "data.group_by_length", "data.augment.",
          "data.streaming", "data.shuffle_buffer", "train.seed", "train.micro_batch_size",
          "train.grad_accum", "train.global_batch_size", "freeze.", "model.compute_dtype")


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns) \
        or (patterns is REPLAY and key.startswith("data.") and key.endswith("_column"))


def start_point(folder: RunFolder, resume: str | None) -> Path | None:
    """The checkpoint ``--resume`` continues from; None to start from step 0.

    ``--resume latest`` in a run that saved no intact checkpoint (it was stopped during setup or the first
    evaluation, or killed before its first save) starts from step 0 with a warning: there is nothing else to
    continue. A finished run (its adapter saved) without checkpoints, or a folder without a run, is refused.
    """
    if resume is None:
        return None
    found = ckpt.find_checkpoint(folder.checkpoints, resume, strict=True)
    if found is not None:
        return found
    if not folder.holds_run():
        raise RunError(f"--resume {resume}: {folder.path} holds no run to continue (no {RUN_CONFIG}); drop --resume to "
                       "start one")
    if folder.adapter.exists():
        raise RunError(f"--resume {resume}: the run in {folder.path} finished ({ADAPTER}/ is saved) and kept no "
                       "checkpoint to continue from; pass --overwrite to train it again, or choose another output_dir")
    log.warning("--resume %s: %s holds no intact checkpoint (the run stopped before saving one): starting from step 0",
                resume, folder.checkpoints)
    return None


def check_recipe_fits(checkpoint: Path, folder: RunFolder, recipe: Recipe) -> None:
    """Refuse a recipe whose ``FIXED`` values differ from the checkpoint's; warn about ``REPLAY`` ones."""
    saved_at = checkpoint / RUN_CONFIG if (checkpoint / RUN_CONFIG).is_file() else folder / RUN_CONFIG
    if not saved_at.is_file():
        return
    diff = changes(read_run_config(saved_at), recipe)
    fixed = [k for k in diff if _matches(k, FIXED)]
    if fixed:
        raise RecipeError(f"--resume {checkpoint.name}: the recipe changed what the checkpoint was trained with: "
                          f"{describe_changes(diff, fixed)}; restore these values (see {saved_at}), or start a new "
                          "run (another output_dir, or --overwrite)")
    replay = [k for k in diff if _matches(k, REPLAY)]
    if replay:
        log.warning("--resume %s with changed %s: the run continues, but no longer replays the uninterrupted one "
                    "exactly", checkpoint.name, describe_changes(diff, replay))


def abandon_after(folder: RunFolder, checkpoint: Path | None) -> None:
    """Set aside what came after ``checkpoint`` (everything, for None: a run starting again from step 0): newer
    checkpoints, and the metrics rows of later steps (they would be logged twice)."""
    step = ckpt.step_of(checkpoint) if checkpoint is not None else None
    rows = folder.read_metrics()  # first: a damaged log stops the resume before anything moves
    aside = ckpt.set_aside_after(folder.checkpoints, step)
    later = [step is None or r.get("step", 0) > step or bool(r.get("final")) for r in rows]
    if any(later):
        aside = aside or ckpt.abandoned_folder(folder.checkpoints)
        RunFolder(aside).write_metrics([r for r, x in zip(rows, later, strict=True) if x])
        folder.write_metrics([r for r, x in zip(rows, later, strict=True) if not x])
    if aside is None:
        return
    moved = sorted(p.name for p in aside.iterdir() if p.name.startswith("step-"))
    moved += [f"{sum(later)} metrics row(s)"] if any(later) else []
    start = f"resuming from {checkpoint.name}" if checkpoint is not None else "starting from step 0"
    log.warning("%s: set aside %s to %s (an abandoned continuation of this run: --resume latest never picks it)",
                start, ", ".join(moved), aside)


def keep_new_hyperparameters(optimizer, scheduler, new_groups: list[dict]) -> None:
    """After a checkpoint's optimizer and schedule were loaded (which brings back their old learning rates and
    weight decay): the recipe's values again, at the schedule's current position. ``new_groups``: the groups'
    settings (without ``params``) as this recipe built them, taken before loading.

    The parameter groups themselves (one per block, one for heads: ``param_groups.py``) must be the same; they
    are whenever the model and the lora section are, which ``check_recipe_fits`` has made sure of."""
    names = [g.get("name") for g in optimizer.param_groups]
    if names != [g.get("name") for g in new_groups]:
        raise RecipeError(f"the checkpoint's optimizer holds the parameter groups {names}, this recipe builds "
                          f"{[g.get('name') for g in new_groups]}: start a new run")
    for group, new in zip(optimizer.param_groups, new_groups, strict=True):
        group.update({k: v for k, v in new.items() if k not in ("params", "lr")})
    if isinstance(scheduler, LambdaLR):
        scheduler.base_lrs = [g["initial_lr"] for g in new_groups]
        lrs = [base * f(scheduler.last_epoch) for f, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs
