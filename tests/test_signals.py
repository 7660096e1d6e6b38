"""SIGTERM/SIGINT in every phase of `lora-ft train`: one line saying what was kept and the one command that
continues, that command works, and the run folder holds what the line says.

Each signal is landed inside its phase by a hook: a function of that phase, patched to send the signal to this
very process (``os.kill(os.getpid(), ...)``) before doing its work, when the trainer is in that phase. No sleeps,
no timing: Python runs the handler right after ``os.kill`` returns.
"""

import json
import os
import shlex
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_ft.cli import main
from lora_ft.training import trainer as trainer_module
from lora_ft.training.generated import GeneratedEvaluation
from lora_ft.training.trainer import Trainer


def _files(folder: Path) -> list[str]:
    """What is on disk under a run folder (an adapter folder as one entry), for the assertions and the closing
    note."""
    names = set()
    for p in folder.rglob("*") if folder.exists() else ():
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            names.add(rel[: rel.index("adapter/") + len("adapter/")] if "adapter/" in rel else rel)
    return sorted(names)


def _signal_in(monkeypatch, method: str, when, signum=signal.SIGTERM, count: int = 1) -> None:
    """Patch ``Trainer.<method>`` so that the first time ``when(trainer)`` holds, it signals this process
    ``count`` times before doing its work."""
    real = getattr(Trainer, method)
    sent = []

    def hooked(self, *args, **kwargs):
        if not sent and when(self):
            sent.append(True)
            for _ in range(count):
                os.kill(os.getpid(), signum)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, method, hooked)


def _in_phase(name: str):
    return lambda t: t.signals.current.startswith(name)


def _signal_in_final_save(monkeypatch) -> None:
    real = trainer_module.save_adapter

    def hooked(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # deferred: the save must still complete
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "save_adapter", hooked)


def _signal_in_generation(monkeypatch, at) -> None:
    """SIGTERM as the generation evaluation of the step ``at`` accepts starts (once)."""
    real, sent = GeneratedEvaluation.run, []

    def hooked(self, model, step):
        if not sent and at(step):
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, model, step)

    monkeypatch.setattr(GeneratedEvaluation, "run", hooked)


# phase → (hook, expected words of the line, files afterwards, the continuation's extra arguments or None)
PHASES = {
    "setup": (lambda mp: _signal_in(mp, "_build_loop", _in_phase("setup")),
              "interrupted during setup (loading the model and data); nothing was trained yet; nothing was written; "
              "continue with: lora-ft train {recipe} --set train.max_steps=2 (output_dir {out})",
              [], []),
    "evaluation before training": (
        lambda mp: _signal_in(mp, "evaluate", _in_phase("the evaluation before training")),
        "interrupted during the evaluation before training; nothing was trained yet; no checkpoint was saved yet, so "
        "this starts again from step 0; continue with: lora-ft train {recipe} --set train.max_steps=2 --resume "
        "latest (output_dir {out})",
        ["run_config.yaml", "run_info.json"], ["--resume", "latest"]),
    "training step": (
        lambda mp: _signal_in(mp, "train_step", lambda t: t.state.step == 0),
        "interrupted at step 1/2; checkpoint saved to {out}/checkpoints/step-00000001; continue with: lora-ft train "
        "{recipe} --set train.max_steps=2 --resume latest (output_dir {out})",
        ["checkpoints/step-00000001/adapter/", "checkpoints/step-00000001/run_config.yaml",
         "checkpoints/step-00000001/trainer_state.pt", "metrics.jsonl", "run_config.yaml", "run_info.json"],
        ["--resume", "latest"]),
    "final evaluation": (
        lambda mp: _signal_in(mp, "evaluate", lambda t: t.signals.current == "the final evaluation"),
        "interrupted during the final evaluation (training finished at step 2); the trained adapter was saved to "
        "{out}/adapter (not evaluated) and a checkpoint to {out}/checkpoints/step-00000002; finish the evaluation "
        "and reports with: lora-ft train {recipe} --set train.max_steps=2 --resume latest (output_dir {out})",
        ["adapter/", "checkpoints/step-00000002/adapter/", "checkpoints/step-00000002/run_config.yaml",
         "checkpoints/step-00000002/trainer_state.pt", "metrics.jsonl", "run_config.yaml", "run_info.json"],
        ["--resume", "latest"]),
    "final save": (
        _signal_in_final_save,
        "interrupted during the final save, which was completed first: the run is complete (adapter and reports in "
        "{out}); nothing to continue",
        ["adapter/", "curves.png", "eval_results.json", "metrics.jsonl", "run_config.yaml", "run_info.json",
         "samples.jsonl", "samples.md"], None),
}
# The generation evaluation belongs to the evaluations around it: the same line, the same files, the same continuation.
PHASES["generation before training"] = (lambda mp: _signal_in_generation(mp, lambda step: step == 0),
                                        *PHASES["evaluation before training"][1:])
PHASES["generation after training"] = (lambda mp: _signal_in_generation(mp, lambda step: step == 2),
                                       *PHASES["final evaluation"][1:])


def _recipe(tmp_path, tiny_llama, chat_data, **train) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama)}, "lora": {"r": 4, "dropout": 0.0},
        # Batches of 8 examples (not packed rows): the steps, evaluations and stops these tests count on.
        "data": {"train": str(chat_data["train"]), "validation": str(chat_data["validation"]), "max_length": 128,
                 "max_eval_examples": 8, "packing": False},
        # lora_ft's defaults of before the auto rules: the phases these tests interrupt stay where they were.
        "train": {"micro_batch_size": 8, "warmup": 0, "epochs": 1, "lr": 2e-4, "eval_every": None,
                  "early_stopping_patience": None, **train}, "output_dir": str(tmp_path / "run")}))
    return recipe


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_signal_in_each_phase_ends_cleanly_says_what_was_kept_and_how_to_continue(
        phase, tiny_llama, chat_data, tmp_path, monkeypatch, capsys):
    hook, expected, files, again = PHASES[phase]
    recipe, out = _recipe(tmp_path, tiny_llama, chat_data), tmp_path / "run"
    argv = ["train", str(recipe), "--set", "train.max_steps=2"]
    with monkeypatch.context() as mp:
        hook(mp)
        code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 128 + signal.SIGTERM and err[-1].startswith("lora-ft: "), err
    assert sum(line.startswith("lora-ft") for line in err) == 1 and "Traceback" not in "\n".join(err)
    assert err[-1] == "lora-ft: " + expected.format(recipe=recipe, out=out)
    left = _files(out)
    print(f"\n[{phase}] on disk: {left}", file=sys.__stdout__)  # the closing note's table
    assert left == files
    if again is None:
        return
    # The one command the line gives continues the run to its end.
    command = shlex.split(err[-1].split("continue with: " if "continue with: " in err[-1] else "reports with: ")[1]
                          .split(" (output_dir")[0])
    assert command[:2] == ["lora-ft", "train"] and command[2:] == [*argv[1:], *again]
    before_adapter = _weights(out / "adapter") if (out / "adapter").is_dir() else None
    assert main(command[1:]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results["after"]) == {"validation"}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "split" not in r and "loss" in r]
    assert train_steps == [1, 2]  # every step once: nothing repeated, nothing lost
    if before_adapter is not None:  # only evaluated: the adapter kept at the interruption is the run's result
        after = _weights(out / "adapter")
        assert all(torch.equal(before_adapter[k], after[k]) for k in after)


def test_a_second_ctrl_c_aborts_the_step_and_keeps_the_last_checkpoint(tiny_llama, chat_data, tmp_path,
                                                                       monkeypatch, capsys):
    """The first Ctrl-C asks for a checkpoint after the step; a second one aborts at once: nothing of that step is
    saved, the checkpoint before it is what --resume latest continues from."""
    recipe, out = _recipe(tmp_path, tiny_llama, chat_data, checkpoint_every=1), tmp_path / "run"
    _signal_in(monkeypatch, "train_step", lambda t: t.state.step == 1, signal.SIGINT, count=2)
    assert main(["train", str(recipe), "--set", "train.max_steps=3"]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"lora-ft: aborted by a second Ctrl-C during the current training step (step 1); the last "
                   f"checkpoint is {out}/checkpoints/step-00000001; continue with: lora-ft train {recipe} --set "
                   f"train.max_steps=3 --resume latest (output_dir {out})")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]
    monkeypatch.undo()
    assert main(["train", str(recipe), "--set", "train.max_steps=3", "--resume", "latest"]) == 0


def test_an_interrupted_overwrite_puts_the_old_run_back(tiny_llama, chat_data, tmp_path, monkeypatch, capsys):
    """--overwrite keeps the old run aside until the new one has saved something: a signal before that (here in
    the evaluation before training, after the new run_config.yaml was written) leaves the old run as it was."""
    import hashlib

    recipe, out = _recipe(tmp_path, tiny_llama, chat_data), tmp_path / "run"
    assert main(["train", str(recipe), "--set", "train.max_steps=1"]) == 0

    def digest():
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file()}

    old = digest()
    with monkeypatch.context() as mp:
        _signal_in(mp, "evaluate", _in_phase("the evaluation before training"))
        assert main(["train", str(recipe), "--set", "train.max_steps=2", "--overwrite"]) == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"lora-ft: interrupted during the evaluation before training; nothing was trained yet; the previous "
                   f"run is kept as it was; continue with: lora-ft train {recipe} --set train.max_steps=2 --overwrite "
                   f"(output_dir {out})")
    assert digest() == old
    # Uninterrupted, the new run replaces the old one once it has saved its adapter.
    assert main(["train", str(recipe), "--set", "train.max_steps=2", "--overwrite"]) == 0
    assert json.loads((out / "run_info.json").read_text())["steps_done"] == 2
    assert not (out / ".lora_ft.replaced").exists()


def test_a_signal_while_the_best_adapter_is_evaluated_keeps_both_it_and_the_last_steps_state(
        tiny_llama, chat_data, tmp_path, monkeypatch, capsys):
    """Early stopping put an earlier (best) adapter back before the final evaluation: a signal there saves the
    best adapter as the run's result and a checkpoint of the last step's state; --resume latest trains no further
    (the stop is part of the state) and writes the reports for that same adapter."""
    recipe, out = _recipe(tmp_path, tiny_llama, chat_data, lr=0.3, schedule="constant", eval_every=2,
                          early_stopping_patience=2, max_steps=40), tmp_path / "run"
    _signal_in(monkeypatch, "evaluate", lambda t: t.signals.current == "the final evaluation" and
               t.final_weights is not None)
    assert main(["train", str(recipe)]) == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]
    ckpt = next((out / "checkpoints").iterdir())
    stop = int(ckpt.name.removeprefix("step-"))
    assert err == (f"lora-ft: interrupted during the final evaluation (training finished at step {stop}); the trained "
                   f"adapter was saved to {out}/adapter (not evaluated) and a checkpoint to {ckpt}; finish the "
                   f"evaluation and reports with: lora-ft train {recipe} --resume latest (output_dir {out})")
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["stopped"].startswith("early stopping") and 0 < state["best"]["step"] < stop
    best, last = _weights(out / "adapter"), _weights(ckpt / "adapter")
    assert any(not torch.equal(best[k], last[k]) for k in best)  # the result is the best, the state the last step
    monkeypatch.undo()
    assert main(["train", str(recipe), "--resume", "latest"]) == 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["steps_done"] == stop and info["best_step"] == state["best"]["step"]
    after = _weights(out / "adapter")
    assert all(torch.equal(best[k], after[k]) for k in best)
