"""What the training loop consults after each validation: the best adapter (and early stopping), the overfitting
watch, and the forgetting guard.

Each keeps its state in a small dataclass that ``state.LoopState`` holds (and checkpoints); the behaviour lives
here, as methods, so the loop itself only asks "improved?", "stop?", "breached?".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data.cells import Where, check_column
from ..data.chat import IGNORE, encode_text
from ..data.reading import read_split
from ..errors import RecipeError
from ..recipe import ForgettingConfig

log = logging.getLogger(__name__)

REFERENCE_TEXT = Path(__file__).parents[1] / "resources" / "general_text.jsonl"
Weights = dict[str, torch.Tensor]


@dataclass
class BestAdapter:
    """The adapter with the best validation score so far (kept in memory, CPU tensors), and how many evaluations
    have passed without improving on it (early stopping)."""

    loss: float = math.inf
    """The validation loss of the best adapter."""
    step: int = 0
    bad_evals: int = 0
    weights: Weights | None = None
    score: list[float] | None = None
    """What adapters are ranked by, lower is better: the objective's ``selection_key`` of the validation metrics
    (None: the loss alone, as in checkpoints written before scores existed)."""

    def consider(self, loss: float, step: int, snapshot: Callable[[], Weights], score: list[float] | None = None,
                 noise: list[float] | None = None) -> None:
        """Keep the current adapter if its ``score`` (default: its ``loss``) beats the best: compared item by item,
        a difference within that item's ``noise`` (default: float noise) is a tie that the next item decides."""
        new, best = score or [loss], self.score or [self.loss]
        if _beats(new, best, noise or [1e-6] * len(new)):
            self.loss, self.score, self.step, self.bad_evals, self.weights = loss, new, step, 0, snapshot()
        else:
            self.bad_evals += 1

    def patience_exhausted(self, patience: int | None) -> bool:
        return bool(patience and self.bad_evals >= patience)


def _beats(new: list[float], best: list[float], noise: list[float]) -> bool:
    for a, b, tolerance in zip(new, best, noise, strict=False):
        if a < b - tolerance:
            return True
        if a > b + tolerance:
            return False
    return False


@dataclass
class OverfittingWatch:
    """The train/validation gap, and validation loss rising while the training loss falls."""

    recent: list[float] = field(default_factory=list)
    """Training losses logged since the last evaluation."""
    previous: tuple[float, float] | None = None
    """(validation loss, mean training loss) at the last evaluation."""
    worsening: int = 0
    """Consecutive evaluations with validation up and training down."""

    def record(self, train_loss: float) -> None:
        self.recent.append(train_loss)

    def on_evaluation(self, val_loss: float, step: int, patience: int | None) -> dict[str, float]:
        """``train_loss`` (mean since the last evaluation) and ``gap`` for the metrics row; warns once the
        validation loss has risen for ``patience`` (default 2) evaluations while the training loss fell."""
        train_mean = sum(self.recent) / len(self.recent) if self.recent else float("nan")
        self.recent.clear()
        if self.previous and val_loss > self.previous[0] and train_mean < self.previous[1]:
            self.worsening += 1
            if self.worsening >= (patience or 2):
                log.warning("step %d: validation loss rose for %d evaluations while training loss fell: the "
                            "adapter is overfitting (the best one is kept)", step, self.worsening)
        else:
            self.worsening = 0
        self.previous = (val_loss, train_mean)
        return {"train_loss": train_mean, "gap": val_loss - train_mean}


@dataclass
class ForgettingBudget:
    """The forgetting guard's state: the base's general-text metrics before training, and (``action: rollback``)
    the last adapter that was within budget."""

    before: dict[str, float] | None = None
    within_budget: tuple[int, Weights] | None = None


def reference_examples(path: str | None, tok, max_examples: int, max_length: int) -> list[dict]:
    """Tokenized general text for the forgetting guard (loss on every token, truncated to max_length)."""
    ds = read_split(path or str(REFERENCE_TEXT), "forgetting.reference")
    if "text" not in ds.column_names:
        raise RecipeError(f"forgetting.reference: needs a 'text' column; columns present: {ds.column_names}")
    check_column(ds["text"], "text", Where("forgetting.reference", path or str(REFERENCE_TEXT)), "text")
    rows = [encode_text(tok, str(t)) for t in ds["text"][:max_examples]]
    return [{k: v[:max_length] for k, v in r.items()} for r in rows]


@torch.no_grad()
def forgetting_metrics(model, loader, accelerator, base_ppl: float | None = None) -> dict[str, float]:
    """Perplexity of the adapted model and of its base (the same weights with the adapter disabled: no
    second copy in memory) on general text, and the mean per-token KL(adapted ‖ base)."""
    was_training = model.training
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    nll_a = nll_b = kl = n = 0.0
    for batch in loader:  # every process computes the whole (small) set: exact, and no gather needed
        batch = {k: v.to(accelerator.device) for k, v in batch.items() if k != "logits_to_keep"}
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE
        logp_a = F.log_softmax(model(**inputs).logits[:, :-1].float(), -1)
        with unwrapped.disable_adapter():
            logp_b = F.log_softmax(model(**inputs).logits[:, :-1].float(), -1)
        target = labels.clamp(min=0).unsqueeze(-1)
        token_kl = (logp_a.exp() * (logp_a - logp_b)).sum(-1)
        nll_a += (-logp_a.gather(-1, target).squeeze(-1) * mask).sum().item()
        nll_b += (-logp_b.gather(-1, target).squeeze(-1) * mask).sum().item()
        kl += (token_kl * mask).sum().item()
        n += mask.sum().item()
    model.train(was_training)
    n = max(n, 1.0)
    return {"ppl_adapted": math.exp(nll_a / n), "ppl_base": base_ppl or math.exp(nll_b / n), "kl": kl / n}


def forgetting_breach(metrics: dict[str, float], max_kl: float | None, max_ppl_increase: float | None) -> str | None:
    """A sentence naming the budget that was exceeded, or None."""
    if max_kl is not None and metrics["kl"] > max_kl:
        return f"KL to the base model on general text {metrics['kl']:.4g} > forgetting.max_kl {max_kl}"
    rise = metrics["ppl_adapted"] / metrics["ppl_base"] - 1
    if max_ppl_increase is not None and rise > max_ppl_increase:
        return (f"general-text perplexity rose {100 * rise:.1f}% over the base "
                f"(> forgetting.max_ppl_increase {max_ppl_increase})")
    return None


class ForgettingGuard:
    """The model against its own base (adapter disabled) on general text, with the recipe's budget.

    Args:
        cfg: the recipe's ``forgetting`` section.
        tokenizer: tokenizes the reference text.
        collate: pads it (the causal objective's left padding).
        batch_size: examples per forward pass.
        max_length: truncation of the reference text.
    """

    def __init__(self, cfg: ForgettingConfig, tokenizer, collate: Callable, batch_size: int, max_length: int):
        self.cfg = cfg
        self.loader = DataLoader(reference_examples(cfg.reference, tokenizer, cfg.max_examples, max_length),
                                 batch_size=batch_size, collate_fn=collate)

    def measure(self, model, accelerator, base: dict[str, float] | None = None) -> dict[str, float]:
        """Metrics now; ``base``: the metrics before training, whose base perplexity is reused (it cannot change)."""
        return forgetting_metrics(model, self.loader, accelerator, base["ppl_base"] if base else None)

    def judge(self, metrics: dict[str, float], step: int, budget: ForgettingBudget, best: BestAdapter,
              snapshot: Callable[[], Weights]) -> str | None:
        """None while within budget; on a breach, the sentence saying what happened. With ``action: rollback`` the
        kept adapter becomes the last one within budget (the untrained one if none was), not the best."""
        breach = forgetting_breach(metrics, self.cfg.max_kl, self.cfg.max_ppl_increase)
        rollback = self.cfg.action == "rollback"
        if breach is None:
            if rollback:
                budget.within_budget = (step, snapshot())
            return None
        if rollback:
            best.step, best.weights = budget.within_budget or (0, None)
            if best.weights is None:  # nothing trained was within budget: back to the untrained adapter
                best.weights = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in snapshot().items()}
        return f"forgetting guard at step {step}: {breach}; " + (
            f"rolled back to the adapter of step {best.step}" if rollback else
            f"stopped (keeping the best adapter, step {best.step})")
