"""``lora-ft eval``: a run's adapter model, its merged folder and its GGUF file judged by the same suite, side by side.

Each model is read through its own files, as a user would run it: the adapter model as training evaluated it
(``training.evaluation.evaluate_run``), the merged folder with plain transformers and its saved tokenizer and
generation config, the GGUF file through transformers' GGUF reader with the tokenizer and end-of-turn tokens it
rebuilds from the file's metadata. Every column gets the same examples, the same loss metrics (where the objective
needs no reference model) and the same generation evaluation; a merged model or GGUF file that no longer stops shows
as a lower ``stop_rate`` beside the adapter's.
"""

from __future__ import annotations

import gc
import logging
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from ..data.prepare import prepare_data
from ..objectives import objective_for
from ..run import Run, default_device, open_run
from ..scoring.generation import own_stop_token_ids
from ..scoring.suite import GenerationSuite
from ..training.evaluation import evaluate_loader, evaluate_run, held_out_file
from ..training.session import make_loader
from .export import latest_export, load_gguf
from .infer import load_for_inference, written_merge

log = logging.getLogger(__name__)


def judge_run(run_dir: str | Path, data_file: str | None = None, merged: bool = False, gguf: str | None = None,
              device: torch.device | str | None = None) -> dict[str, dict[str, float]]:
    """Metrics by model: ``adapter``, and ``merged`` / ``gguf`` when asked for.

    Args:
        run_dir: the run's ``output_dir``.
        data_file: the examples; None: the run's validation file, else its test file.
        merged: also the merged model (``RUN_DIR/merged`` or the latest passing ``merge --out``).
        gguf: also a GGUF file: a path, or ``latest`` for the run's latest passing export.
        device: where the exported models run (default: the first GPU, else the CPU).
    """
    run = open_run(run_dir)
    data_file = data_file or held_out_file(run)
    if merged:  # every model asked for must exist before the first one is evaluated
        written_merge(run)
    path = Path(latest_export(run, None if gguf == "latest" else gguf)["out"]) if gguf is not None else None
    results = {"adapter": evaluate_run(run.dir, data_file, "eval", generate=True)}
    device = torch.device(device) if device else default_device()
    if merged:
        im = load_for_inference(run.dir, merged=True, device=device)
        results["merged"] = _judge_export(run, data_file, im.model, im.tokenizer)
        del im
        gc.collect()
    if path is not None:
        model, tokenizer = load_gguf(path, device)
        results["gguf"] = _judge_export(run, data_file, model, tokenizer)
    return results


def _judge_export(run: Run, data_file: str, model: torch.nn.Module,
                  tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
    """An exported model on the examples, tokenized by its own tokenizer; stopping where its own files say."""
    objective = objective_for(run.recipe, tokenizer)
    cfg = run.recipe.data.model_copy(update={"validation": None, "test": None, "max_eval_examples": None})
    data = prepare_data(cfg, objective, run.recipe.train.seed, False, {"eval": data_file}, run.id2label)
    metrics: dict[str, float] = {}
    # Preference and KTO metrics need the reference model (the adapter switched off), which an export lacks.
    if not (run.recipe.objective.paired or run.recipe.objective.type == "kto"):
        accelerator = Accelerator(cpu=model.device.type == "cpu")  # its loader puts batches on the model's device
        loader = accelerator.prepare(make_loader(data.splits["eval"], run.recipe.train.eval_batch_size,
                                                 objective.collate, False, 0))
        metrics = evaluate_loader(model, loader, objective, accelerator)
    suite = GenerationSuite.build(run.recipe, objective, tokenizer, data.raw.get("eval"), data.formats.get("eval"))
    if suite is not None:
        metrics.update(suite.run(model, stops=own_stop_token_ids(model, tokenizer))[0])
    return metrics


def judge_table(results: dict[str, dict[str, Any]]) -> str:
    """The metrics as a text table: one row per metric, one column per model."""
    names = list(dict.fromkeys(k for m in results.values() for k in m))
    header = ["metric", *results]
    rows = [[name, *(_number(results[col].get(name)) for col in results)] for name in names]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([line(header), *(line(r) for r in rows)])


def _number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1):
        return str(int(value))
    return f"{value:.4f}" if math.isfinite(value) else str(value)
