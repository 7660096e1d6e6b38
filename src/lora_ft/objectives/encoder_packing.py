"""Unpadded encoder batches: a micro-batch's examples laid end to end in rows, each example attending only to itself.

A padded batch of short, varied examples spends much of its compute on padding; length grouping saves some of it
but gives batches of similar examples (where length says something about the label, batches of fewer labels). A
packed batch keeps the micro-batch's examples (the same ones, so optimisation is unchanged) and lays them end to
end in rows (first-fit decreasing), so the linear layers, most of an encoder's work, see only real tokens. What
keeps it exact:

- **position ids restart** on every example (RoBERTa-style embeddings count from ``pad_token_id + 1``);
- **a block-diagonal attention mask**, 4-D, as the attention implementation takes it (boolean for SDPA, additive
  for eager), handed to the backbone in place of its 2-D mask: transformers' ``masking_utils`` returns a 4-D mask
  as it is. ModernBERT takes one per layer type (its sliding-window layers get the band too); DeBERTa-v2 gets it
  at the encoder, because its embeddings multiply by a 2-D mask. Relative positions (DeBERTa-v2's buckets,
  ModernBERT's rotary) depend only on the distance between two tokens, which packing does not change;
- **one vector per example**: the output of the module whose token states the head reads is replaced by each
  example's first ([CLS]) state, or its mean over the example where the head mean-pools, as a batch of
  one-token sequences; the model's own pooler, dropout and classifier then run unchanged, one row per example;
- **token type ids** per example, as its tokenizer gave them.

Padding at a row's end forms a segment of its own, so no attention row is empty. Where an architecture is not in
``ENCODERS`` or its attention implementation is neither ``sdpa`` nor ``eager``, ``cannot_pack`` says why and the
batches stay padded. Each architecture is proven in ``tests/test_encoder_packing.py``: per-example logits and LoRA
gradients of a packed batch equal the padded batch's to 1e-5.

Written by hand: transformers' ``DataCollatorWithFlattening`` flattens a batch into one row for the varlen
(flash-attention) kernels of decoders, which neither run on the CPU nor cover these encoders' heads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data.packing import first_fit_decreasing
from ..modeling.model_dropout import attention_dropout, sdpa_math_kernel
from .base import Batch
from .chunked_loss import innermost

CPU_HEAD_PAIR_FLOPS = 2000.0
"""What one (query, key) pair of one head costs the CPU attention beyond its matmuls, in matmul FLOPs: CPU SDPA
with dropout runs the math kernel, whose mask, softmax and dropout are passes over (heads × width²) values, forward
and backward. Measured on MiniLM-L6 NF4 LoRA, one thread, AMD EPYC (AVX512-BF16): rows 32 against 128 wide on
short examples took 0.06 s less per step for 24.5k fewer pairs per layer, 2.4 µs per pair over the 6 layers, i.e.
a pair costs 1/140 of a token's linear layers; less the pair's matmuls (4 × hidden FLOPs), ≈ 2,000 per head. GPU
kernels fuse these passes, and so does CPU SDPA's flash kernel where the attention has no dropout (ModernBERT's
default): 0 there (not measured; the matmuls alone)."""


def pair_cost(config: Any, device: torch.device) -> float:
    """The attention cost of one token pair per layer relative to one token's linear layers: what
    ``pack_examples`` weighs a row's width with.

    Args:
        config: the encoder's config (``hidden_size``, ``intermediate_size``, ``num_attention_heads``; DistilBERT's
            ``dim``, ``hidden_dim``, ``n_heads``; its attention dropout, ``model_dropout.attention_dropout``).
        device: where the model computes (the per-head passes are the CPU math kernel's: ``CPU_HEAD_PAIR_FLOPS``).
    """
    h = getattr(config, "hidden_size", None) or config.dim
    i = getattr(config, "intermediate_size", None) or config.hidden_dim
    heads = getattr(config, "num_attention_heads", None) or config.n_heads
    per_head = CPU_HEAD_PAIR_FLOPS if sdpa_math_kernel(attention_dropout(config), device.type) else 0.0
    linear = 2 * (4 * h * h + 2 * h * i)  # q, k, v, output and the two MLP layers: FLOPs per token
    return (4 * h + heads * per_head) / linear


@dataclass(frozen=True)
class PackedEncoder:
    """Where one architecture takes the packed layout.

    Args:
        mask_at: the submodule whose ``attention_mask`` (keyword, or second positional argument) becomes the
            block-diagonal mask.
        states: the submodule whose output's token states (``last_hidden_state``, or the tensor itself) the head
            reads; they become one state per example.
        position_offset: added to the restarted position ids (RoBERTa counts from ``pad_token_id + 1``: None).
        boolean: the model takes a boolean mask whatever its attention implementation (DeBERTa-v2 fills where
            the mask is False).
    """

    mask_at: str
    states: str
    position_offset: int | None = 0
    boolean: bool = False


ENCODERS = {
    "bert": PackedEncoder("bert", "bert.encoder"),  # the pooler is inside BertModel: replace before it
    "roberta": PackedEncoder("roberta", "roberta.encoder", None),
    "xlm-roberta": PackedEncoder("roberta", "roberta.encoder", None),
    "electra": PackedEncoder("electra", "electra.encoder"),
    "distilbert": PackedEncoder("distilbert", "distilbert.transformer"),
    "deberta-v2": PackedEncoder("deberta.encoder", "deberta", boolean=True),
    "modernbert": PackedEncoder("model", "model"),
}
"""Architectures (``config.model_type``) whose packed classification is proven exact, each by a test on a tiny
random model."""
ATTENTION = ("sdpa", "eager")


def cannot_pack_encoder(model: nn.Module) -> str | None:
    """Why ``model``'s classification batches cannot be packed exactly (None: they can)."""
    config = innermost(model).config
    if config.model_type not in ENCODERS:
        return (f"unpadded encoder batches are proven for {', '.join(sorted(ENCODERS))}, not "
                f"'{config.model_type}'")
    if config._attn_implementation not in ATTENTION:
        return f"attention implementation '{config._attn_implementation}' takes no 4-D block-diagonal mask"
    if config.model_type == "deberta-v2" and (getattr(config, "z_steps", 0) > 1
                                              or getattr(config, "conv_kernel_size", 0) > 0):
        return "DeBERTa-v2 with z_steps > 1 or a convolution layer reads a 2-D padding mask, not a block-diagonal one"
    return None


def row_width(lengths: dict[int, int], capacity: int, pair: float) -> int:
    """The row width, between the longest example and ``capacity``, that minimises the step's estimated cost:
    rows × width × (1 + width × ``pair``) — the linear layers see every slot of a row, the attention every pair of
    slots (``pair_cost``). Wide rows leave little padding; narrow rows attend over less. Measured (MiniLM-L6, one
    thread): rows as wide as the longest example against 128 gave 1.46× the tokens/s on 12-token man-page
    descriptions, 1.15× on docstrings; the rule picks the faster of the candidate widths on each.

    Args:
        lengths: the micro-batch's example lengths.
        capacity: the widest row allowed (``data.max_length``).
        pair: ``pair_cost``; 0 packs as tightly as possible (the widest rows).
    """
    longest = max(lengths.values())
    candidates = {longest, capacity} | {w for w in (32, 64, 128, 256, 512) if longest < w < capacity}

    def cost(width: int) -> float:
        rows = len(first_fit_decreasing(lengths, width))
        return rows * width * (1 + width * pair)

    return min(sorted(candidates), key=cost)


def pack_examples(rows: list[dict[str, Any]], pad_id: int, capacity: int, pair: float = 0.0) -> Batch:
    """The examples in rows of at most ``row_width`` tokens (first-fit decreasing).

    Returns ``input_ids``, ``position_ids`` (0 at each example's first token), ``token_type_ids`` (where the
    examples have them), ``segments`` (the example's number in the batch at each token, −1 − row at a row's
    padding), ``starts`` (each example's first token as an index into the flattened rows), ``labels`` (one per
    example, in the order of ``starts``), ``real_tokens``.
    """
    lengths = {i: len(r["input_ids"]) for i, r in enumerate(rows)}
    width = row_width(lengths, capacity, pair)
    layout = first_fit_decreasing(lengths, width)
    width = max(sum(lengths[i] for i in row) for row in layout)
    shape = (len(layout), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    types = torch.zeros(shape, dtype=torch.long)
    segments = torch.empty(shape, dtype=torch.long)
    starts, order = [], []
    for r, row in enumerate(layout):
        segments[r] = -1 - r
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at : at + n] = torch.tensor(rows[i]["input_ids"])
            positions[r, at : at + n] = torch.arange(n)
            if "token_type_ids" in rows[i]:
                types[r, at : at + n] = torch.tensor(rows[i]["token_type_ids"])
            segments[r, at : at + n] = len(order)
            starts.append(r * width + at)
            order.append(i)
            at += n
        positions[r, at:] = torch.arange(width - at)
    batch = {"input_ids": ids, "position_ids": positions, "segments": segments, "starts": torch.tensor(starts),
             "labels": torch.tensor([rows[i]["labels"] for i in order]), "real_tokens": torch.tensor(sum(
                 lengths.values()))}
    if "token_type_ids" in rows[0]:
        batch["token_type_ids"] = types
    return batch


def block_mask(segments: torch.Tensor, attention: str, dtype: torch.dtype) -> torch.Tensor:
    """(rows, 1, T, T): token q may attend to token k where both belong to the same example (or the same row's
    padding); boolean for SDPA (True: attend), additive for eager (0 or the dtype's minimum)."""
    same = (segments[:, None, :, None] == segments[:, None, None, :])
    if attention == "sdpa":
        return same
    return torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill(~same, torch.finfo(dtype).min)


def _band(mask: torch.Tensor, half_window: int) -> torch.Tensor:
    """``mask`` limited to |q − k| ≤ ``half_window`` (ModernBERT's sliding-window layers)."""
    t = mask.shape[-1]
    idx = torch.arange(t, device=mask.device)
    near = (idx[:, None] - idx[None, :]).abs() <= half_window
    if mask.dtype == torch.bool:
        return mask & near
    return mask.masked_fill(~near, torch.finfo(mask.dtype).min)


def _per_example(states: torch.Tensor, batch: Batch, mean: bool) -> torch.Tensor:
    """(examples, 1, hidden): each example's first state, or its mean over the example's tokens."""
    flat = states.reshape(-1, states.shape[-1])
    if not mean:
        return flat[batch["starts"].to(flat.device)].unsqueeze(1)
    seg = batch["segments"].reshape(-1).to(flat.device)
    real = seg >= 0
    n = batch["starts"].shape[0]
    sums = flat.new_zeros(n, flat.shape[-1]).index_add(0, seg[real], flat[real])
    counts = torch.bincount(seg[real], minlength=n).to(flat.dtype)
    return (sums / counts[:, None]).unsqueeze(1)


def _replace_states(output: Any, per_example: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return per_example
    if isinstance(output, tuple):
        return (per_example, *output[1:])
    output["last_hidden_state"] = per_example  # a ModelOutput: sets the key and the attribute
    return output


@contextmanager
def packed_forward(model: nn.Module, batch: Batch) -> Iterator[dict[str, torch.Tensor]]:
    """Inside: ``model(**inputs)`` with the yielded inputs computes one row of logits per example of the packed
    ``batch`` (in the order of its ``starts``); see the module docstring for how."""
    base = innermost(model)
    config = base.config
    spec = ENCODERS[config.model_type]
    segments = batch["segments"]
    mask: Any = block_mask(segments, "sdpa" if spec.boolean else config._attn_implementation, base.dtype)
    if config.model_type == "modernbert":
        mask = {"full_attention": mask, "sliding_attention": _band(mask, config.sliding_window)}
    mean = getattr(config, "classifier_pooling", "cls") == "mean"

    def give_mask(module, args, kwargs):
        if "attention_mask" in kwargs or len(args) < 2:
            return args, {**kwargs, "attention_mask": mask}
        return (args[0], mask, *args[2:]), kwargs

    def take_states(module, args, output):
        states = output if isinstance(output, torch.Tensor) else output[0]
        return _replace_states(output, _per_example(states, batch, mean))

    offset = spec.position_offset if spec.position_offset is not None else config.pad_token_id + 1
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"] + offset,
              **({"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {})}
    hooks = [base.get_submodule(spec.mask_at).register_forward_pre_hook(give_mask, with_kwargs=True),
             base.get_submodule(spec.states).register_forward_hook(take_states)]
    try:
        yield inputs
    finally:
        for h in hooks:
            h.remove()


def packed_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(examples, labels) float logits of a packed batch (``pack_examples``)."""
    with packed_forward(model, batch) as inputs:
        return model(**inputs).logits.float()
