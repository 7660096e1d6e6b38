"""The generation evaluation: answers to a few validation prompts, scored against the references.

One ``GenerationSuite`` per run (or per ``lora-ft eval``): the prompts are rendered once, from the split as read;
``run`` generates with whatever model it is given (the adapter model during training, a merged folder, a GGUF
file read back) and returns the metrics and the answers, so every model is judged on the same prompts with the same
settings.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from ..errors import RecipeError
from ..recipe import EvalConfig, Recipe
from .generation import Answer, GenerationExample, generate_all
from .metrics import check_metric_names, score_texts

if TYPE_CHECKING:  # objectives import this package (the example type, the metrics); the objective is passed in
    from ..objectives import Objective

log = logging.getLogger(__name__)

AUTO_MAX_NEW_TOKENS = 256
"""``eval.max_new_tokens: auto`` is at most this: twice the longest reference plus 16, below it."""


def _reference_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """A reference answer's tokens as the model would generate them: its text and the end-of-turn token."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1


@dataclass
class GenerationSuite:
    """Prompts and references of one split, and how to generate and score answers for them.

    Args:
        cfg: the recipe's ``eval`` section.
        tokenizer: the run's tokenizer (pad token set).
        examples: the prompts and references (``Objective.generation_example``).
        max_new_tokens: resolved from ``cfg.max_new_tokens``.
    """

    cfg: EvalConfig
    tokenizer: PreTrainedTokenizerBase
    examples: list[GenerationExample]
    max_new_tokens: int

    @classmethod
    def build(cls, recipe: Recipe, objective: Objective, tokenizer: PreTrainedTokenizerBase,
              raw: datasets.Dataset | None, fmt: str | None) -> GenerationSuite | None:
        """The suite for a split as read (``TaskData.raw``), or None where the recipe does not generate:
        ``eval.generate`` false, no such split, a classifier, or data without prompts (plain text) under ``auto``."""
        cfg = recipe.eval
        insist = cfg.generate is True
        if cfg.generate is False or recipe.model.task != "causal_lm":
            return None
        if raw is None or not len(raw):
            if insist:
                raise RecipeError("eval.generate true: there is no validation data to generate for; set "
                                  "data.validation or data.validation_split")
            return None
        rows = raw.select(range(min(cfg.examples, len(raw))))
        examples = [objective.generation_example(row, fmt) for row in rows]
        if any(e is None for e in examples):
            if insist:
                raise RecipeError(f"eval.generate true: data.format {fmt} has no prompts to answer (plain text); "
                                  "use a chat or prompt/completion format, or set eval.generate: false")
            return None
        max_new = cfg.max_new_tokens
        if max_new == "auto":
            longest = max(_reference_tokens(tokenizer, e.reference) for e in examples)
            max_new = min(AUTO_MAX_NEW_TOKENS, 2 * longest + 16)
        limit = recipe.data.max_length
        too_long = sum(len(e.prompt_ids) >= limit for e in examples)
        if too_long:  # as training truncates them: the model never saw positions past max_length
            log.warning("eval: %d of %d generation prompts reach data.max_length=%d and are cut to their last "
                        "%d tokens", too_long, len(examples), limit, limit - 1)
            examples = [GenerationExample(e.prompt_ids[-(limit - 1):], e.prompt, e.reference) for e in examples]
        return cls(cfg, tokenizer, examples, int(max_new))

    @staticmethod
    def check(recipe: Recipe) -> list[str]:
        """The problems of ``eval.metrics`` (unknown names, functions that do not import) where the recipe may
        generate, before any model loads."""
        e = recipe.eval
        if e.generate is False or recipe.model.task != "causal_lm":
            return []
        return [f"eval.metrics: {p}" for p in check_metric_names(e.metrics, e.regex)]

    def run(self, model: torch.nn.Module, accelerator=None,
            stops: list[int] | None = None) -> tuple[dict[str, float], list[Answer]]:
        """Generate with ``model`` (the unwrapped model under DDP) and score: (metrics, answers in order).
        ``stops``: the tokens that end an answer (default: ``generation.stop_token_ids``)."""
        answers = generate_all(model, self.tokenizer, [e.prompt_ids for e in self.examples], self.max_new_tokens,
                               self.cfg.batch_size, accelerator, self.cfg.temperature, self.cfg.top_p, stops)
        return self.score(answers), answers

    def score(self, answers: Sequence[Answer]) -> dict[str, float]:
        """``eval.metrics`` of the answers against the references, plus the generated ones (``GENERATED_METRICS``)."""
        texts, refs = [a.text for a in answers], [e.reference for e in self.examples]
        metrics = score_texts(self.cfg.metrics, texts, refs, self.cfg.regex)
        ref_tokens = sum(_reference_tokens(self.tokenizer, r) for r in refs)
        answer_tokens = sum(a.tokens for a in answers)
        return {**metrics, "stop_rate": sum(a.stopped for a in answers) / len(answers),
                "length_ratio": answer_tokens / max(ref_tokens, 1), "answer_tokens": answer_tokens / len(answers)}

    def per_example(self, answers: Sequence[Answer]) -> list[dict[str, float]]:
        """The first ``eval.metrics`` metric of each answer alone (the samples table ranks by it)."""
        first = self.cfg.metrics[0] if self.cfg.metrics else None
        if first is None:
            return [{} for _ in answers]
        out = []
        for a, e in zip(answers, self.examples, strict=True):
            value = score_texts([first], [a.text], [e.reference], self.cfg.regex).get(first)
            out.append({first: value} if value is not None and math.isfinite(value) else {})
        return out

    def samples(self, before: Sequence[Answer] | None, after: Sequence[Answer]) -> list[dict[str, Any]]:
        """One row per example: ``prompt``, ``reference``, ``before`` (None for a run resumed without them),
        ``after``, whether each stopped, and the first metric of the answer after training."""
        scores = self.per_example(after)
        rows = []
        for i, e in enumerate(self.examples):
            b = before[i] if before is not None else None
            rows.append({"prompt": e.prompt, "reference": e.reference, "before": b.text if b else None,
                         "after": after[i].text, "stopped_before": b.stopped if b else None,
                         "stopped_after": after[i].stopped, **{f"{k}_after": v for k, v in scores[i].items()}})
        return rows


def samples_jsonl(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _cell(text: str | None) -> str:
    """Text in one Markdown table cell: pipes escaped, line breaks as <br>."""
    if text is None:
        return "–"
    text = text.replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")
    # An untrained model's answers can hold control characters, which break a Markdown table's line.
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


def samples_markdown(rows: Sequence[dict[str, Any]], metrics: dict[str, dict[str, float]] | None = None) -> str:
    """``samples.md``: the metrics before → after, then prompt / reference / before / after for every example."""
    out = ["# Generated samples", ""]
    if metrics:
        before, after = metrics.get("before", {}), metrics.get("after", {})
        out += ["| metric | before | after |", "|---|---:|---:|"]
        out += [f"| {k} | {before.get(k, float('nan')):.4g} | {v:.4g} |" for k, v in after.items()]
        out.append("")
    out += ["| # | prompt | reference | before | after |", "|---:|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        stop = {True: "", False: " ⟨no stop⟩", None: ""}
        out.append(f"| {i} | {_cell(r['prompt'])} | {_cell(r['reference'])} | "
                   f"{_cell(r['before'])}{stop[r['stopped_before']]} | {_cell(r['after'])}{stop[r['stopped_after']]} |")
    return "\n".join(out) + "\n"


def best_samples(rows: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The ``n`` samples that score highest after training on the first metric (ties: data order) — the model
    card's examples; the first ``n`` where no metric was scored per example."""
    keys = [k for k in (rows[0] if rows else {}) if k.endswith("_after") and k != "stopped_after"]
    if not keys:
        return list(rows[:n])
    ranked = sorted(range(len(rows)), key=lambda i: (-(rows[i].get(keys[0]) or 0.0), i))
    return [rows[i] for i in ranked[:n]]
