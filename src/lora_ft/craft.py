"""Fine-tuning practice as recipe switches: layer-wise learning rates, freezing schedules, augmentation,
and the forgetting guard. Each piece is a small function the training loop calls; none changes the model
beyond ``requires_grad`` of adapter/head parameters and a forward hook.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import AugmentConfig, FreezeConfig, TrainConfig

log = logging.getLogger(__name__)

_LAYER = re.compile(r"\.(?:layers?|h|blocks?)\.(\d+)\.")
REFERENCE_TEXT = Path(__file__).parent / "resources" / "general_text.jsonl"


# ------------------------------------------------------------------------------- parameters by layer
def layer_of(name: str) -> int | None:
    """Transformer block index of a parameter (``model.layers.3.…`` → 3), None outside the blocks."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks themselves (``….layers.3``), in order: the modules ``layer_of`` numbers."""
    return [m for n, m in model.named_modules() if (hit := _LAYER.search(n + ".")) and hit.end() == len(n) + 1]


def is_head(name: str, heads: list[str]) -> bool:
    # peft names head copies "<head>.modules_to_save.default.weight"
    return any(f".{h}.modules_to_save." in f".{name}" or name.startswith(f"{h}.") for h in heads)


def param_groups(model: torch.nn.Module, tc: TrainConfig, heads: list[str]) -> list[dict]:
    """AdamW groups: one per block with ``lr · decay^(L−l)`` (l = 1 … L from the bottom), one for heads.

    Parameters outside the blocks (e.g. a pooler's adapter) count as the top layer: they sit above it.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layers = [x for n, _ in named if (x := layer_of(n)) is not None]
    top = max(layers, default=0)
    groups: dict[str, dict] = {}
    for name, p in named:
        if is_head(name, heads):
            key, lr = "head", tc.head_lr or tc.lr
        else:
            layer = layer_of(name)
            depth = top - layer if layer is not None else 0  # 0 for the top block
            key, lr = f"layer{layer if layer is not None else 'top'}", tc.lr * (tc.lr_layer_decay or 1.0) ** depth
        groups.setdefault(key, {"params": [], "lr": lr, "name": key})["params"].append(p)
    return list(groups.values())


# ------------------------------------------------------------------------------------ freezing schedule
class FreezeSchedule:
    """Sets which adapter/head parameters train at each step; the backbone stays frozen throughout.

    Frozen parameters get no gradient, so AdamW keeps no state for them until they join.
    """

    def __init__(self, model: torch.nn.Module, cfg: FreezeConfig, heads: list[str]):
        self.cfg = cfg
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.heads = heads
        layers = [x for n in self.params if (x := layer_of(n)) is not None]
        self.top = max(layers, default=0)
        self.stage: int | None = None

    def _trainable(self, name: str, stage: int) -> bool:
        if self.cfg.strategy == "head_first":
            return stage > 0 or is_head(name, self.heads)
        if self.cfg.strategy == "gradual_unfreeze":
            layer = layer_of(name)
            lowest = self.top + 1 - (stage + 1) * self.cfg.blocks_per_stage
            return layer is None or layer >= lowest
        return True

    def stage_at(self, step: int) -> int:
        if self.cfg.strategy == "head_first":
            return int(step >= self.cfg.head_steps)
        if self.cfg.strategy == "gradual_unfreeze":
            return step // self.cfg.unfreeze_every
        return 0

    def apply(self, step: int) -> str | None:
        """Update ``requires_grad`` for ``step``; return a description when the trainable set changed."""
        stage = self.stage_at(step)
        if stage == self.stage or self.cfg.strategy == "none":
            return None
        self.stage = stage
        for name, p in self.params.items():
            p.requires_grad_(self._trainable(name, stage))
        on = [n for n in self.params if self.params[n].requires_grad]
        blocks = sorted({x for n in on if (x := layer_of(n)) is not None})
        heads = any(is_head(n, self.heads) for n in on)
        return (f"step {step}: {len(on)}/{len(self.params)} trainable tensors; blocks "
                f"{blocks[0] if blocks else '-'}..{blocks[-1] if blocks else '-'}{' + head' if heads else ''}")


# -------------------------------------------------------------------------------------- augmentation
def _token_dropout(ids: list[int], p: float, rng: random.Random, protected: set[int], unk: int) -> list[int]:
    return [t if t in protected or rng.random() >= p else unk for t in ids]


def _random_deletion(ids: list[int], p: float, rng: random.Random, protected: set[int], unk: int) -> list[int]:
    kept = [t for t in ids if t in protected or rng.random() >= p]
    return kept if any(t not in protected for t in kept) else ids  # never delete every word


def _random_swap(ids: list[int], p: float, rng: random.Random, protected: set[int], unk: int) -> list[int]:
    ids = list(ids)
    free = [i for i, t in enumerate(ids) if t not in protected]
    for _ in range(int(p * len(free))):
        a, b = rng.sample(free, 2) if len(free) > 1 else (free[0], free[0])
        ids[a], ids[b] = ids[b], ids[a]
    return ids


# The registry: a new augmentation is a function (ids, strength, rng, protected ids, unk id) -> ids,
# plus a float field of the same name in config.AugmentConfig.
TOKEN_AUGMENTATIONS: dict[str, Callable[..., list[int]]] = {
    "token_dropout": _token_dropout,
    "random_deletion": _random_deletion,
    "random_swap": _random_swap,
}


class Augmenter:
    """Applies the enabled token augmentations to one training example.

    The random stream is derived from (seed, epoch, example index), not from a running counter, so the same
    example gets the same augmentation in a resumed run, and every epoch sees a new variant.
    """

    def __init__(self, cfg: AugmentConfig, seed: int, special_ids: set[int], unk_id: int):
        self.active = [(name, getattr(cfg, name)) for name in TOKEN_AUGMENTATIONS if getattr(cfg, name)]
        self.seed, self.special, self.unk = seed, special_ids, unk_id
        self.epoch = 0

    def __bool__(self) -> bool:
        return bool(self.active)

    def __call__(self, row: dict) -> dict:
        rng = random.Random(hash((self.seed, self.epoch, row["idx"])))
        ids = row["input_ids"]
        for name, strength in self.active:
            ids = TOKEN_AUGMENTATIONS[name](ids, strength, rng, self.special, self.unk)
        out = dict(row, input_ids=ids, attention_mask=[1] * len(ids))
        if "token_type_ids" in row:  # keep segment ids aligned: pad/trim the first segment's zeros
            types = row["token_type_ids"]
            out["token_type_ids"] = ([0] * (len(ids) - len(types)) + types)[-len(ids):] if len(ids) else []
        return out


def activate_neftune(model: torch.nn.Module, alpha: float):
    """NEFTune noise on the input embeddings in training mode (transformers' own hook)."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    embeddings = model.get_input_embeddings()
    embeddings.neftune_noise_alpha = alpha
    return embeddings.register_forward_hook(neftune_post_forward_hook)


# ---------------------------------------------------------------------------------- forgetting guard
def reference_examples(path: str | None, tok, max_examples: int, max_length: int) -> list[dict]:
    """Tokenized general text for the forgetting guard (loss on every token, truncated to max_length)."""
    from .data import encode_text, read_split

    ds = read_split(path or str(REFERENCE_TEXT), "forgetting.reference")
    if "text" not in ds.column_names:
        from .config import RecipeError

        raise RecipeError(f"forgetting.reference: needs a 'text' column; columns present: {ds.column_names}")
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
        mask = labels != -100
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
