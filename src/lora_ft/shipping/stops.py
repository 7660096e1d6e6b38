"""The stop check of the export gate: a merged folder or GGUF file must end its answers as the adapter model does.

The most reported export failure is a model that answers well and never stops: the end-of-turn token the adapter
learned is not the one the exported file's generation config or GGUF metadata names, so a runtime reading the file
(transformers' ``generate``, llama.cpp, Ollama) keeps going. The logits comparison cannot see it (the model still
predicts the right token); generating can. Both models answer the same held-out prompts greedily; the adapter model
stops at any of the run's end tokens, the exported model only at the ones its own files name.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..data.prepare import TaskData
from ..objectives import Objective
from ..run import Run
from ..scoring.generation import Answer, own_stop_token_ids
from ..scoring.suite import GenerationSuite

STOP_MARGIN = 0.1
"""The exported model may stop on at most this share fewer answers than the adapter model (0.1: 3 of 32; on fewer
than 20 prompts, two answers). An export
that keeps the adapter's end token stops on the same answers (the q8_0 GGUF of the quickstart: README "Judging by
outputs"); one that lost it stops on none."""


def gate_suite(run: Run, objective: Objective, tokenizer: PreTrainedTokenizerBase, data: TaskData, split: str,
               examples: int) -> GenerationSuite | None:
    """The generation evaluation of a causal run on the held-out split (``eval.examples`` of it, at most
    ``examples``), whatever ``eval.generate`` says: the gate checks every export. None for classifiers and data
    without prompts."""
    if not run.causal:
        return None
    cfg = run.recipe.eval.model_copy(update={"generate": "auto", "examples": min(examples, run.recipe.eval.examples)})
    recipe = run.recipe.model_copy(update={"eval": cfg})
    return GenerationSuite.build(recipe, objective, tokenizer, data.raw.get(split), data.formats.get(split))


def generated_stops(suite: GenerationSuite | None, model: torch.nn.Module) -> list[Answer] | None:
    """The adapter model's answers (None without a suite)."""
    return suite.run(model)[1] if suite is not None else None


def check_stops(suite: GenerationSuite | None, reference: list[Answer] | None, candidate: torch.nn.Module,
                tokenizer: PreTrainedTokenizerBase, name: str) -> dict[str, Any]:
    """The report entries of the stop check: both stop rates, the margin, ``stops_ok`` and, when it fails,
    ``stops_problem`` (the refusal's reason). ``tokenizer``: the candidate's own (a GGUF file's is rebuilt from
    it). Empty without a suite."""
    if suite is None or reference is None:
        return {}
    _, answers = suite.run(candidate, stops=own_stop_token_ids(candidate, tokenizer))
    ref_rate = sum(a.stopped for a in reference) / len(reference)
    rate = sum(a.stopped for a in answers) / len(answers)
    # Rounding can move an answer that ends right at max_new_tokens across it: on few prompts, two answers may
    # differ whatever the margin says.
    margin = max(STOP_MARGIN, 2 / len(answers))
    entry: dict[str, Any] = {"stop_rate_adapter": ref_rate, f"stop_rate_{name}": rate, "stop_margin": margin,
                             "stop_examples": len(answers), "stops_ok": rate >= ref_rate - margin}
    if not entry["stops_ok"]:
        entry["stops_problem"] = (
            f"its answers stop less often than the adapter model's (stop rate {rate:.2f} vs {ref_rate:.2f} on "
            f"{len(answers)} prompts, margin {margin:.2g}); it stops only at token ids "
            f"{own_stop_token_ids(candidate, tokenizer)}: check that they include the end-of-turn token the answers "
            "end with")
    return entry
