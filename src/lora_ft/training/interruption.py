"""What a signal outside the training steps leaves behind (see ``Trainer.run``), said in one message.

Setup and the first evaluation stop at once (nothing is trained yet; an ``--overwrite``'s old run comes back);
a signal during the final evaluation keeps the result of the finished training: the adapter training chose and a
checkpoint of the last step, from which ``--resume latest`` only evaluates and writes the reports. A second Ctrl-C
during a training step aborts it; the last checkpoint is what continues.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import TrainingInterrupted
from . import checkpoint as ckpt
from .distributed import restore_adapter, save_adapter
from .signals import Interrupted

if TYPE_CHECKING:  # the trainer imports this module
    from .trainer import Trainer

FINAL_EVALUATION = "the final evaluation"
"""The phase whose interruption keeps the trained adapter (``Trainer.train`` and ``Trainer.finish`` use it)."""


def interrupted(trainer: Trainer, e: Interrupted) -> TrainingInterrupted:
    """The message for a signal outside the training steps, with the command that continues (``lora-ft train
    RECIPE ...``: the CLI spells out the recipe and its --set values).

    Args:
        trainer: the interrupted run.
        e: the signal and the phase it came in.
    """
    st = trainer.state
    if e.phase == FINAL_EVALUATION and not e.forced:
        kept = save_trained(trainer)
        return TrainingInterrupted(
            f"interrupted during the final evaluation (training finished at step {st.step}); {kept}; finish the "
            f"evaluation and reports with: lora-ft train RECIPE --resume latest (output_dir {trainer.folder.path})",
            e.signum)
    latest = ckpt.find_checkpoint(trainer.folder.checkpoints) if trainer.started or trainer.resume else None
    if trainer.overwrite and trainer.folder.aside.exists():
        kept, again = "the previous run is kept as it was", " --overwrite"
    elif trainer.started or trainer.resume is not None:
        kept = (f"the last checkpoint is {latest}" if latest else
                "no checkpoint was saved yet, so this starts again from step 0")
        again = " --resume latest"
    else:
        kept, again = "nothing was written", ""
    what = f"aborted by a second Ctrl-C during {e.phase} (step {st.step})" if e.forced else \
        f"interrupted during {e.phase}" + ("; nothing was trained yet" if st.step == 0 else "")
    return TrainingInterrupted(f"{what}; {kept}; continue with: lora-ft train RECIPE{again} (output_dir "
                               f"{trainer.folder.path})", e.signum)


def save_trained(trainer: Trainer) -> str:
    """A signal during the final evaluation: training is done, so its result is kept: a checkpoint of the last
    step (``--resume latest`` then only evaluates and writes the reports) and the adapter training chose."""
    acc, st = trainer.accelerator, trainer.state
    with trainer.signals.phase("saving the trained adapter", immediate=False):
        if trainer.final_weights is not None:  # finish() had put the best adapter in place already
            restore_adapter(acc, trainer.model, trainer.unwrapped, trainer.final_weights)
        existing = [c for c in ckpt.list_checkpoints(trainer.folder.checkpoints) if ckpt.step_of(c) == st.step]
        path = existing[0] if existing else trainer.save_checkpoint()
        if st.best.weights is not None and st.best.step != st.step:
            restore_adapter(acc, trainer.model, trainer.unwrapped, st.best.weights)
        save_adapter(acc, trainer.unwrapped, trainer.folder.adapter, trainer.session.loaded.tokenizer)
        acc.wait_for_everyone()
        if acc.is_main_process:
            trainer.folder.drop_aside()
    return f"the trained adapter was saved to {trainer.folder.adapter} (not evaluated) and a checkpoint to {path}"
