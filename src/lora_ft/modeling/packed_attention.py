"""Attention over packed rows computed example by example on the CPU: ``attn_implementation="lora_ft_packed"``.

Written by hand because transformers has no CPU path for packed rows: it turns the rows' restarting position ids
into a 4-D block-diagonal causal mask and hands that to SDPA, whose CPU kernel then computes every pair of the
row (256² for a 256-token row of ~70-token chat examples, 7× the pairs that count) and, in bf16, pays a fixed
cost per call that dwarfs products this small. FlashAttention's varlen path does the same job on GPUs.

Here the segments are read off that very mask (a block-diagonal causal mask is what makes this exact, so it is
checked in full once per forward), gathered into a few buckets of similar length (``buckets``), and attended in
each bucket as transformers' eager attention does (scores, mask, fp32 softmax cast back, product), or through
SDPA with ``is_causal`` for long segments, where its kernel is the faster; the outputs go back to their places in
the rows. Measured (bf16, one thread, AMD EPYC, SmolLM2-135M heads: 9 query, 3 key/value, 64 wide), forward +
backward of one layer's attention on four 256-token rows of 13 examples: 26.5 ms through SDPA with the mask, 12-15
ms here; a whole SmolLM2 NF4 + LoRA training step on nine such rows (a new batch each step): 7.3 → 5.5 s. The cost
is memory: each token keeps fp32 and bf16 probabilities over its example (``memory/activations.py`` counts them).

Every other call goes to transformers' SDPA function with the mask it was given: a mask that is not block-diagonal
causal (padding, sliding windows shorter than an example, image tokens), generation with a cache, attention
dropout, logit soft-capping, other devices (GPUs are not measured yet: no device was lent).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "lora_ft_packed"
MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo2", "smollm3", "gpt_neox"})
"""Causal LMs whose attention reads example boundaries from the position ids of a mask-free batch (transformers'
``create_causal_mask`` packed-sequence detection), each checked in ``tests/test_causal_lm.py`` on a tiny random
model: packed and one-by-one losses agree to 1e-5, through SDPA and through ``packed_attention_forward``."""
BUCKET_COST = 16384 * 576
"""A bucket's fixed cost (its gathers, kernel calls and their backward) in token pairs × query width (heads × head
dim, the work of one pair): measured on four to eight 256-token rows and two 512- and 1,024-token rows of SmolLM2
shapes, 16k pairs at width 576 was the best of 1k, 4k, 16k, 64k (one bucket for all: up to 3.5× slower)."""
ALIGN = 16
"""Bucket widths are multiples of this: torch's CPU softmax backward gives bit-identical results at any thread count
only for rows of a multiple of 16 values (checked at every width 16-384 and at 24, 40, 100, which differ between one
and two threads), and a one-process run must equal a two-process one (``tests/test_distributed.py``)."""
SDPA_FROM = 384
"""Segments at least this long go through SDPA's causal kernel. Forward + backward, bf16, one thread, SmolLM2 heads,
~2k tokens of equal examples, eager vs SDPA: 320 tokens 44.0 vs 60.3 ms, 384 70.3 vs 67.5, 512 85.6 vs 89.8, 768
113 vs 67; and eager keeps the probabilities, SDPA does not."""


@dataclass(frozen=True)
class Bucket:
    """Segments padded to one width at their ends: ``index`` [segments, width] into the flattened rows (padding
    slots repeat the segment's last token), ``future`` [width, width] the pairs left out (keys after the query),
    None where SDPA's causal kernel runs the bucket. A real query never sees a padding key (they come after it);
    a padding query's output is dropped, so nothing flows back through it."""

    index: torch.Tensor
    future: torch.Tensor | None


@dataclass(frozen=True)
class PackedPlan:
    buckets: tuple[Bucket, ...]
    back: torch.Tensor
    """For each token of the flattened rows, its slot among the buckets' outputs laid end to end."""


def aligned(length: int) -> int:
    """A bucket's width for its longest segment: the next multiple of ``ALIGN``."""
    return -(-length // ALIGN) * ALIGN


def eager(width: int) -> bool:
    """Whether a bucket this wide is attended eagerly (keeping its probabilities), not by SDPA's causal kernel."""
    return width < SDPA_FROM


def widest_eager(length: int) -> int:
    """The widest eager bucket that examples of at most ``length`` tokens can land in (the planner's bound)."""
    return aligned(length) if eager(aligned(length)) else aligned(SDPA_FROM) - ALIGN


def buckets(lengths: list[int], cost: float) -> list[list[int]]:
    """Segment indices grouped for the fewest computed pairs plus ``cost`` per group: segments sorted by length,
    each group a run of them padded to its longest, ``aligned`` (the optimum is such runs; found by dynamic
    programming).

    Args:
        lengths: the segments' token counts.
        cost: a group's fixed cost in pairs.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n = len(order)
    best = [0] + [0] * n  # best[j]: the cost of grouping the j shortest segments
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        width = aligned(lengths[order[j - 1]])
        best[j], cut[j] = min((best[i] + cost + (j - i) * width * width, i) for i in range(j))
    groups, j = [], n
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def plan_of(mask: torch.Tensor, width_q: int) -> PackedPlan | None:
    """The segments of rows whose SDPA mask is block-diagonal causal with at least two blocks in some row; None for
    any other mask (then attending segment by segment would not compute what the mask says).

    Args:
        mask: SDPA's boolean mask, [rows, 1, length, length].
        width_q: heads × head dim of the queries, which sets a bucket's cost in pairs.
    """
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3]:
        return None
    rows, width = mask.shape[0], mask.shape[-1]
    m = mask[:, 0]
    if not m.diagonal(dim1=1, dim2=2).all():  # a padding key masked from itself: padded batches leave here, cheaply
        return None
    starts = torch.ones(rows, width, dtype=torch.bool)
    starts[:, 1:] = ~m.diagonal(offset=-1, dim1=1, dim2=2)
    if not starts[:, 1:].any():
        return None
    seg = starts.cumsum(-1)
    if not torch.equal(m, (seg[:, :, None] == seg[:, None, :]) & torch.ones(width, width, dtype=torch.bool).tril()):
        return None
    first = starts.flatten().nonzero().flatten()
    lengths = torch.diff(first, append=torch.tensor([rows * width])).tolist()
    first = first.tolist()
    out, back, at = [], torch.empty(rows * width, dtype=torch.long), 0
    for group in buckets(lengths, BUCKET_COST / width_q):
        w = aligned(max(lengths[s] for s in group))
        offsets = torch.arange(w)
        size = torch.tensor([lengths[s] for s in group])
        index = torch.tensor([first[s] for s in group])[:, None] + torch.minimum(offsets, size[:, None] - 1)
        out.append(Bucket(index, torch.ones(w, w, dtype=torch.bool).triu(1) if eager(w) else None))
        for k, s in enumerate(group):
            back[first[s]:first[s] + lengths[s]] = at + k * w + offsets[:lengths[s]]
        at += len(group) * w
    return PackedPlan(tuple(out), back)


_last: tuple[weakref.ref, PackedPlan | None] | None = None


def cached_plan(mask: torch.Tensor, width_q: int) -> PackedPlan | None:
    """``plan_of`` once per forward: every layer gets the same mask object, held here by a weak reference (a new
    batch's mask is a new object, so a plan is never reused for another batch)."""
    global _last
    if _last is None or _last[0]() is not mask:
        _last = (weakref.ref(mask), plan_of(mask, width_q))
    return _last[1]


def _attend(bucket: Bucket, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """One bucket's attention, [segments × width, heads, dim], from the flattened rows' q [tokens, heads, dim] and
    k, v [tokens, kv heads, dim]; query heads grouped over their key/value head as ``repeat_kv`` pairs them."""
    n, w = bucket.index.shape
    heads, kv, dim = q.shape[1], k.shape[1], q.shape[2]
    group = heads // kv
    qb = q[bucket.index].view(n, w, kv, group, dim).permute(0, 2, 3, 1, 4)  # [n, kv, group, w, dim]
    kb = k[bucket.index].transpose(1, 2)  # [n, kv, w, dim]
    vb = v[bucket.index].transpose(1, 2)
    if bucket.future is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            qb.reshape(n, heads, w, dim), kb, vb, is_causal=True, scale=scaling, enable_gqa=group > 1)
        return out.transpose(1, 2).reshape(n * w, heads, dim)
    scores = torch.matmul(qb.reshape(n, kv, group * w, dim), kb.transpose(-1, -2)) * scaling
    scores = scores.view(n, kv, group, w, w).masked_fill(bucket.future, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).view(n, kv, group * w, w)
    out = torch.matmul(probs, vb).view(n, kv, group, w, dim)
    return out.permute(0, 3, 1, 2, 4).reshape(n * w, heads, dim)


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q [batch, heads, len, dim], k and v [batch, kv heads, len, dim];
    returns [batch, len, heads, dim] as its SDPA function does."""
    plan = None
    if (attention_mask is not None and query.device.type == "cpu" and dropout == 0 and query.shape[2] > 1
            and query.shape[2] == key.shape[2] and kwargs.get("softcap") is None and kwargs.get("s_aux") is None
            and not kwargs.get("output_attentions")):
        plan = cached_plan(attention_mask, query.shape[1] * query.shape[3])
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, width, dim = query.shape
    scaling = dim ** -0.5 if scaling is None else scaling
    q = query.transpose(1, 2).reshape(rows * width, heads, dim)
    k = key.transpose(1, 2).reshape(rows * width, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(rows * width, value.shape[1], dim)
    out = torch.cat([_attend(b, q, k, v, scaling) for b in plan.buckets])
    return out[plan.back].view(rows, width, heads, dim), None


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch a causal LM of ``MODELS`` that attends through SDPA to ``NAME`` (the switch is not saved with the
    model: transformers keeps the implementation out of ``config.json``). Returns whether it switched."""
    config = getattr(model, "config", None)
    if config is None or config.model_type not in MODELS or config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True


AttentionInterface.register(NAME, packed_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the same boolean mask as SDPA's: it is what plan_of reads
