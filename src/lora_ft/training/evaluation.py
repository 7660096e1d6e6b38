"""Evaluation: the objective's metrics on whole splits, the same on 1 process or N.

Shared by training (before, periodically, after) and ``lora-ft eval``. The objective computes per-example values;
they are gathered with ``gather_for_metrics`` (which drops the duplicates a sharded last batch carries), so
multi-process evaluation equals single-process evaluation.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import set_peft_model_state_dict
from peft.utils import load_peft_weights

from ..errors import RunError
from ..objectives import Objective
from ..run import Run, open_run
from ..scoring.suite import GenerationSuite
from .session import make_accelerator, make_loader, setup


@torch.no_grad()
def evaluate_loader(model: torch.nn.Module, loader, objective: Objective, accelerator: Accelerator) -> dict[str, float]:
    """The objective's metrics of one split; the model's train/eval mode is left as it was."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    for batch in loader:
        for name, value in accelerator.gather_for_metrics(objective.eval_step(model, batch)).items():
            parts[name].append(value.cpu())
    model.train(was_training)
    return objective.summarize({name: torch.cat(values) for name, values in parts.items()})


def evaluate_all(model: torch.nn.Module, loaders: dict, objective: Objective, accelerator: Accelerator,
                 seconds: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """``evaluate_loader`` for every split, by name, in order (validation first: see ``Objective.begin_split``);
    each split's wall time goes to ``seconds`` when given."""
    results = {}
    for name, loader in loaders.items():
        t0 = time.perf_counter()
        objective.begin_split(name)
        results[name] = evaluate_loader(model, loader, objective, accelerator)
        if seconds is not None:
            seconds[name] = round(time.perf_counter() - t0, 3)
    return results


def evaluate_run(run_dir: str | Path, data_file: str | None = None, split: str = "eval",
                 generate: bool = False) -> dict[str, float]:
    """``lora-ft eval``: the run's adapter on any file, with the run's own recipe and label set.

    The whole file is scored: ``max_eval_examples`` caps only the periodic evaluation during training.

    Args:
        run_dir: the run's ``output_dir``.
        data_file: the examples (the run's data format); None: the run's validation file, else its test file.
        split: the name the examples are reported under.
        generate: add the generation evaluation (``eval`` section; causal runs whose data has prompts).
    """
    run = open_run(run_dir)
    data_file = data_file or held_out_file(run)
    data = run.recipe.data.model_copy(update={"validation": None, "test": None, "max_eval_examples": None})
    train = run.recipe.train.model_copy(update={"trackers": []})
    recipe = run.recipe.model_copy(update={"data": data, "train": train})
    accelerator, compute = make_accelerator(recipe)
    start = run.start_adapter  # lora.init_from: the model training started from is the reference
    s = setup(recipe, accelerator, compute, str(start or run.adapter_dir), {split: data_file}, run.id2label)
    s.data.splits = s.objective.prepare(s.model, accelerator, s.data.splits, train.eval_batch_size)
    s.objective.restore(run.info.get("objective") or {})  # e.g. the thresholds chosen on validation
    s.objective.begin_split(split)
    if start is not None:  # then the trained adapter's weights
        set_peft_model_state_dict(s.model, load_peft_weights(str(run.adapter_dir)))
    loader = accelerator.prepare(make_loader(s.data.splits[split], train.eval_batch_size, s.objective.collate,
                                             False, 0))
    metrics = evaluate_loader(s.model, loader, s.objective, accelerator)
    suite = GenerationSuite.build(recipe, s.objective, s.loaded.tokenizer, s.data.raw.get(split),
                                  s.data.formats.get(split)) if generate else None
    if suite is not None:
        metrics.update(suite.run(s.model, accelerator)[0])
    return metrics


def held_out_file(run: Run) -> str:
    """The file ``lora-ft eval`` scores when given none: the run's validation file, else its test file."""
    d = run.recipe.data
    if d.validation or d.test:
        return d.validation or d.test
    raise RunError(f"{run.dir}: the recipe names no validation or test file (a validation_split is carved from the "
                   "training data); pass --data FILE with held-out examples in the run's data format")
