"""The generation evaluation inside a training run: before, during (``eval.every_eval``) and after training.

The trainer calls these at its evaluation points; the metrics join the validation split's own (``rougeL``,
``stop_rate``… next to ``loss`` in ``eval_results.json`` and ``metrics.jsonl``), the answers before training are kept
in the loop state (a resumed run shows them too), and the samples go to the run folder and the trackers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
from accelerate import Accelerator

from ..errors import RecipeError
from ..run import RunFolder
from ..scoring.generation import Answer
from ..scoring.suite import GenerationSuite, samples_jsonl, samples_markdown
from .state import LoopState

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ["prompt", "reference", "before", "after"]


def check_selectable(select_by: str | None, before: dict[str, dict[str, float]]) -> None:
    """``eval.select_by`` must name a metric the validation reports: checked on the evaluation before training,
    so a typo costs no training step."""
    reported = before.get("validation", {})
    if select_by is not None and select_by not in reported:
        raise RecipeError(f"eval.select_by {select_by}: the validation reports {sorted(reported)}; choose one of "
                          "them (generated metrics need eval.every_eval: true)")


class GeneratedEvaluation:
    """One run's generation evaluation.

    Args:
        suite: the prompts, references and settings (``scoring.suite.GenerationSuite``).
        accelerator: generation is split over its processes and gathered.
    """

    def __init__(self, suite: GenerationSuite, accelerator: Accelerator):
        self.suite, self.accelerator = suite, accelerator
        self.last: tuple[int, dict[str, float], list[Answer]] | None = None  # (step, metrics, answers)
        self.rows: list[dict[str, Any]] = []
        self.seconds: dict[int, float] = {}  # step → wall time of its generation (run_info.json: the cost)

    def settings(self) -> dict[str, Any]:
        """What ``run_info.json`` records: the resolved generation settings."""
        cfg = self.suite.cfg
        return {"examples": len(self.suite.examples), "max_new_tokens": self.suite.max_new_tokens,
                "temperature": cfg.temperature, "top_p": cfg.top_p, "metrics": cfg.metric_names,
                "seconds": {str(k): round(v, 2) for k, v in self.seconds.items()}}

    def run(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics, answers = self.suite.run(self.accelerator.unwrap_model(model), self.accelerator)
        self.last, self.seconds[step] = (step, metrics, answers), time.perf_counter() - t0
        log.info("step %d: generated %d answers in %.1f s: %s", step, len(answers), self.seconds[step],
                 ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics

    def before(self, model: torch.nn.Module, state: LoopState, fresh: bool) -> None:
        """Generate with the untrained adapter into ``state.before``. A resumed run has it from its checkpoint; one
        resumed from a checkpoint written without it (``fresh`` false: the model is trained already) goes without."""
        if state.generated_before is None and fresh:
            state.before["validation"].update(self.run(model, 0))
            state.generated_before = [dataclasses.asdict(a) for a in self.last[2]]

    def after(self, model: torch.nn.Module, step: int, state: LoopState) -> dict[str, float]:
        """The final model's metrics (the last generation's, when it was of this very model) and the samples."""
        if self.last is None or self.last[0] != step:
            self.run(model, step)
        _, metrics, answers = self.last
        before = [Answer(**a) for a in state.generated_before] if state.generated_before else None
        self.rows = self.suite.samples(before, answers)
        return metrics

    def write(self, folder: RunFolder, results: dict[str, Any], step: int) -> None:
        """``samples.jsonl``, ``samples.md`` and the trackers' tables (main process)."""
        names = self.suite.cfg.metric_names
        metrics = {when: {k: v for k, v in results[when].get("validation", {}).items() if k in names}
                   for when in ("before", "after")}
        markdown = samples_markdown(self.rows, metrics)
        folder.write_samples(samples_jsonl(self.rows), markdown)
        log_samples(self.accelerator, self.rows, markdown, step)


def log_samples(accelerator: Accelerator, rows: list[dict[str, Any]], markdown: str, step: int) -> None:
    """The samples table in every tracker that shows one: W&B and ClearML tables (accelerate's ``log_table``),
    a Trackio table, TensorBoard text (Markdown), MLflow artifacts (``samples.md``, ``samples.jsonl``)."""
    data = [[r[c] if r[c] is not None else "" for c in SAMPLE_COLUMNS] for r in rows]
    for tracker in accelerator.trackers:
        if tracker.name in ("wandb", "clearml"):
            tracker.log_table("samples", columns=SAMPLE_COLUMNS, data=data, step=step)
        elif tracker.name == "trackio":
            import trackio  # optional tracker package

            tracker.log({"samples": trackio.Table(columns=SAMPLE_COLUMNS, data=data)}, step=step)
        elif tracker.name == "tensorboard":
            tracker.writer.add_text("samples", markdown, global_step=step)
        elif tracker.name == "mlflow":
            import mlflow  # optional tracker package

            mlflow.log_text(markdown, "samples.md")
            mlflow.log_text(samples_jsonl(rows), "samples.jsonl")
        else:
            log.info("train.trackers: %s gets the generation metrics; the samples table is in samples.md",
                     tracker.name)
