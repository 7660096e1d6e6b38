"""Evaluation: token-weighted loss (and perplexity) for causal LMs, loss/accuracy/F1 for classifiers.

Shared by training (before/after and periodic evaluation) and ``lora-ft eval``. Per-example sums are
gathered with ``gather_for_metrics`` so multi-process evaluation equals single-process evaluation.
"""

from __future__ import annotations

import inspect
import math
from functools import cache
from pathlib import Path

import evaluate
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from .chunked_loss import chunked_token_losses, head_inputs, innermost, output_head
from .data import IGNORE

METRICS_DIR = Path(__file__).parent / "metrics"


@cache
def _metric(name: str) -> evaluate.EvaluationModule:
    return evaluate.load(str(METRICS_DIR / f"{name}.py"))


def supports_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the innermost transformers model takes ``logits_to_keep`` (through DDP and peft wrappers)."""
    return _forward_has_keep(type(innermost(model)))


@cache
def _forward_has_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def causal_loss(model: torch.nn.Module, batch: dict, per_example: bool = False, chunked: bool = True):
    """Summed next-token loss and the number of label tokens, from the last ``logits_to_keep`` positions.

    ``chunked``: through ``chunked_loss`` where the model allows it (no full-vocabulary logits; same values).
    """
    batch = dict(batch)
    keep = int(batch.pop("logits_to_keep"))
    labels = batch.pop("labels")
    target = labels[:, labels.shape[1] - keep + 1 :]
    head = output_head(model) if chunked else None
    # use_cache=False: training and scoring never generate, and a KV cache copies K/V in every layer.
    kwargs = {"logits_to_keep": keep} if supports_logits_to_keep(model) else {}
    if head is not None:
        with head_inputs(head) as captured:
            model(**batch, **kwargs, use_cache=False)
        # Without logits_to_keep the head saw every position: the same slice as the logits below.
        losses = chunked_token_losses(head, captured[0].hidden[:, -keep:][:, :-1], target, captured[0].autocast)
    else:
        logits = model(**batch, **kwargs, use_cache=False).logits[:, -keep:][:, :-1].float()
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                 ignore_index=IGNORE, reduction="none").view(target.shape)
    counts = (target != IGNORE).sum(-1)
    if per_example:
        return losses.sum(-1), counts
    return losses.sum(), counts.sum()


def classification_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


def classification_loss(model: torch.nn.Module, batch: dict):
    logits = classification_logits(model, batch)
    return F.cross_entropy(logits, batch["labels"], reduction="sum"), batch["labels"].new_tensor(len(logits))


def train_loss(model: torch.nn.Module, batch: dict, causal: bool):
    """(summed loss, number of items) for one micro-batch."""
    return causal_loss(model, batch) if causal else classification_loss(model, batch)


@torch.no_grad()
def evaluate_loader(model: torch.nn.Module, loader, accelerator: Accelerator, causal: bool) -> dict[str, float]:
    was_training = model.training
    model.eval()
    sums, counts, preds, refs = [], [], [], []
    for batch in loader:
        if causal:
            loss, count = causal_loss(model, batch, per_example=True)
        else:
            logits = classification_logits(model, batch)
            loss = F.cross_entropy(logits, batch["labels"], reduction="none")
            count = torch.ones_like(batch["labels"])
            p, r = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
            preds.append(p.cpu())
            refs.append(r.cpu())
        s, c = accelerator.gather_for_metrics((loss.detach().float(), count))
        sums.append(s.cpu())
        counts.append(c.cpu())
    model.train(was_training)
    total, n = torch.cat(sums).double().sum().item(), torch.cat(counts).sum().item()
    result = {"loss": total / max(n, 1), "examples": int(sum(len(c) for c in counts))}
    if causal:
        result["perplexity"] = math.exp(min(result["loss"], 50.0))
        result["tokens"] = int(n)
    else:
        p, r = torch.cat(preds).tolist(), torch.cat(refs).tolist()
        result["accuracy"] = _metric("accuracy").compute(predictions=p, references=r)["accuracy"]
        result["f1_macro"] = _metric("f1").compute(predictions=p, references=r, average="macro")["f1"]
    return result


def evaluate_all(model, loaders: dict, accelerator: Accelerator, causal: bool) -> dict[str, dict[str, float]]:
    return {name: evaluate_loader(model, loader, accelerator, causal) for name, loader in loaders.items()}
