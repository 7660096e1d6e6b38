"""Packed rows attended example by example: what transformers' SDPA computes with the rows' block-diagonal causal
mask, outputs and gradients, with grouped key/value heads and with segments long enough for SDPA's own kernel;
every other mask left to SDPA."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lora_ft.modeling import packed_attention
from lora_ft.modeling.packed_attention import (
    NAME,
    SDPA_FROM,
    aligned,
    buckets,
    cached_plan,
    eager,
    packed_attention_forward,
    plan_of,
    widest_eager,
)


class Heads(torch.nn.Module):
    """What an attention function reads of its module: the query heads per key/value head, causality."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def block_mask(lengths: list[list[int]]) -> torch.Tensor:
    """SDPA's boolean mask for rows made of segments of these lengths (each row's lengths sum to the width)."""
    width = sum(lengths[0])
    seg = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths])
    return ((seg[:, :, None] == seg[:, None, :]) & torch.ones(width, width, dtype=torch.bool).tril())[:, None]


def qkv(rows: int, width: int, heads: int = 6, kv: int = 2, dim: int = 8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(rows, n, width, dim, generator=g, dtype=dtype).requires_grad_() for n in (heads, kv, kv)]


def out_and_grads(fn, tensors, mask):
    for t in tensors:
        t.grad = None
    out, _ = fn(Heads(tensors[0].shape[1] // tensors[1].shape[1]), *tensors, mask, scaling=0.3)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()  # a loss that weighs every output differently
    return out.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("lengths", [
    [[5, 17, 3, 31], [56]],  # two rows: several short examples, and one row of one example
    [[9, 12, 13, 15, 1, 14]],  # lengths that bucketing groups
    [[SDPA_FROM + 6, 10]],  # a segment long enough for SDPA's causal kernel beside a short one
])
def test_outputs_and_gradients_equal_sdpa_with_the_block_diagonal_mask(lengths):
    mask = block_mask(lengths)
    tensors = qkv(len(lengths), sum(lengths[0]))
    packed_attention._last = None
    ours, our_grads = out_and_grads(packed_attention_forward, tensors, mask)
    assert packed_attention._last[1] is not None  # it did attend example by example
    ref, ref_grads = out_and_grads(sdpa_attention_forward, tensors, mask)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(our_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_under_bf16_autocast_it_stays_within_bf16_rounding_of_sdpa():
    mask = block_mask([[20, 40, 4], [64]])
    tensors = qkv(2, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = out_and_grads(packed_attention_forward, tensors, mask)
        ref, _ = out_and_grads(sdpa_attention_forward, tensors, mask)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), rtol=0.02, atol=0.02)


def test_masks_that_are_not_block_diagonal_causal_go_to_sdpa_unchanged():
    causal = block_mask([[12, 12]])
    padded = causal.clone()
    padded[0, 0, :, :3] = False  # padding keys, as a left-padded batch has
    window = causal & ~torch.ones(24, 24, dtype=torch.bool).tril(-4)  # a 4-token sliding window inside examples
    one_example = block_mask([[24]])
    for mask in (padded, window, one_example, torch.zeros(1, 1, 24, 24), None):
        if mask is not None:
            assert plan_of(mask, 48) is None
        tensors = qkv(1, 24)
        ours, our_grads = out_and_grads(packed_attention_forward, tensors, mask)
        ref, ref_grads = out_and_grads(sdpa_attention_forward, tensors, mask)
        assert torch.equal(ours, ref) and all(torch.equal(a, b) for a, b in zip(our_grads, ref_grads, strict=True))


def test_buckets_are_runs_of_sorted_lengths_traded_against_their_fixed_cost():
    lengths = [100, 10, 40, 101, 12]  # widths 112, 16, 48, 112, 16: multiples of ALIGN
    assert buckets(lengths, 500) == [[1, 4], [2], [0, 3]]
    assert buckets(lengths, 5000) == [[1, 4, 2], [0, 3]]
    assert buckets(lengths, 10**9) == [[1, 4, 2, 0, 3]]
    # the planner's bound: the widest bucket attended eagerly (wider ones go through SDPA's kernel)
    assert [widest_eager(n) for n in (100, SDPA_FROM - 20, 5000)] == [112, SDPA_FROM - 16, SDPA_FROM - 16]
    assert not eager(aligned(SDPA_FROM - 10))  # 374 tokens sit in a 384-wide bucket: SDPA's


def test_results_are_bit_identical_at_one_and_two_threads():
    """A run on one process (two threads) must equal one on two (a thread each): torch's CPU softmax backward is
    not thread-count invariant for rows of 40 values, so buckets are ALIGN wide."""
    mask = block_mask([[5, 17, 3, 31, 8], [40, 24]])
    results = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results.append(out_and_grads(packed_attention_forward, qkv(2, 64), mask))
        finally:
            torch.set_num_threads(before)
    (out1, grads1), (out2, grads2) = results
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(grads1, grads2, strict=True))


def test_a_plan_is_kept_for_one_mask_object_and_made_again_for_another():
    mask = block_mask([[3, 5]])
    plan = cached_plan(mask, 48)
    assert cached_plan(mask, 48) is plan
    again = cached_plan(mask.clone(), 48)  # a new batch's mask, equal or not, is another object
    assert again is not plan and torch.equal(again.back, plan.back)
    slots = torch.cat([b.index.flatten() for b in plan.buckets])
    assert torch.equal(slots[plan.back], torch.arange(8))  # each token comes back from its own slot


def _tiny(model_type: str, attention: str, **extra):
    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()


def test_a_sliding_window_shorter_than_an_example_is_left_to_sdpa():
    """Mistral's window of 4 tokens cuts inside 9-token examples: the mask says so, and SDPA computes it."""
    ids = torch.randint(0, 64, (1, 18), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(9).repeat(2)[None]
    sdpa = _tiny("mistral", "sdpa", sliding_window=4)
    ours = _tiny("mistral", "sdpa", sliding_window=4)
    ours.set_attn_implementation(NAME)
    packed_attention._last = None
    with torch.no_grad():
        got = ours(input_ids=ids, position_ids=positions, use_cache=False).logits
        want = sdpa(input_ids=ids, position_ids=positions, use_cache=False).logits
    assert packed_attention._last[1] is None
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_only_sdpa_causal_lms_that_packing_is_checked_for_are_switched():
    llama, gemma2 = _tiny("llama", "sdpa"), _tiny("gemma2", "eager")
    assert packed_attention.use_packed_attention(llama) and llama.config._attn_implementation == NAME
    assert not packed_attention.use_packed_attention(gemma2) and gemma2.config._attn_implementation == "eager"
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=16, n_layer=1, n_head=2),
                                            attn_implementation="sdpa")
    assert not packed_attention.use_packed_attention(gpt2) and gpt2.config._attn_implementation == "sdpa"
