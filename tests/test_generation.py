"""scoring/generation.py: batched left-padded generation equals one prompt at a time, and what counts as stopped."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_ft.scoring.generation import generate_all, generate_batch, own_stop_token_ids, stop_token_ids


@pytest.fixture(scope="module")
def model_and_tok(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(), tok


def _alone(model, tok, prompt: list[int], n: int) -> list[int]:
    """``generate`` on one unpadded prompt. The attention mask is given: inferred, it would mask the prompt's own
    <|im_end|> tokens (pad == eos here)."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=tok.pad_token_id)
    return out[0, len(prompt):].tolist()


def _prompts(tok) -> list[list[int]]:
    texts = ["What does the cow say?", "Which sound does a duck make? Tell me now", "The owl says what?",
             "bee", "What does the frog say? The frog, the big frog near the pond today"]
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for t in texts]


def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(model_and_tok):
    model, tok = model_and_tok
    prompts = _prompts(tok)
    assert len({len(p) for p in prompts}) > 3  # different lengths: the batch is padded
    batch = generate_batch(model, tok, prompts, max_new_tokens=12, stops=[10**6])  # no stop: all 12 tokens
    for p, answer in zip(prompts, batch, strict=True):
        alone = _alone(model, tok, p, 12)
        assert answer.tokens == 12 and not answer.stopped
        assert answer.text == tok.decode(alone, skip_special_tokens=True).strip()


def test_an_answer_stops_at_the_first_stop_token_and_a_truncated_one_has_not_stopped(model_and_tok):
    model, tok = model_and_tok
    prompts = _prompts(tok)[:2]
    free = generate_batch(model, tok, prompts, max_new_tokens=6, stops=[10**6])
    assert [a.stopped for a in free] == [False, False] and [a.tokens for a in free] == [6, 6]
    # The third token each prompt generates, made a stop token: generation ends there, counted and stopped.
    first = _alone(model, tok, prompts[0], 3)
    stop = first[2]
    assert stop not in first[:2]
    stopped = generate_batch(model, tok, prompts[:1], max_new_tokens=6, stops=[stop])[0]
    assert stopped.stopped and stopped.tokens == 3
    assert stopped.text == tok.decode(first, skip_special_tokens=True).strip()


def test_every_process_count_returns_the_answers_in_prompt_order(model_and_tok):
    model, tok = model_and_tok
    prompts = _prompts(tok)
    together = generate_all(model, tok, prompts, 8, batch_size=2)
    # Batches are formed by length (shortest first); the answers come back in the prompts' order.
    one_by_one = [generate_batch(model, tok, [p], 8)[0] for p in prompts]
    assert [a.text for a in together] == [a.text for a in one_by_one]


class _Accelerator:
    """What generate_all reads of an accelerate.Accelerator, for one rank of two (gather_object is not called
    here: only each rank's share is checked)."""

    def __init__(self, rank: int):
        self.process_index, self.num_processes = rank, 2


def test_two_processes_split_whole_batches_between_them(model_and_tok, monkeypatch):
    from lora_ft.scoring import generation

    model, tok = model_and_tok
    prompts = _prompts(tok)
    shares = {}
    for rank in (0, 1):
        monkeypatch.setattr(generation, "gather_object", lambda mine, rank=rank: shares.setdefault(rank, mine) and [])
        with pytest.raises(KeyError):  # the gather is stubbed out: the whole list is not there
            generate_all(model, tok, prompts, 8, batch_size=2, accelerator=_Accelerator(rank))
    ranks = {i: r for r in shares for i, _ in shares[r]}
    assert sorted(ranks) == list(range(len(prompts)))  # every prompt once, on exactly one process
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    assert [ranks[i] for i in order] == [0, 0, 1, 1, 0]  # batches of 2 by length, dealt out whole
    single = dict(zip(range(len(prompts)), generate_all(model, tok, prompts, 8, batch_size=2), strict=True))
    assert all(single[i] == a for r in shares for i, a in shares[r])


def test_the_stop_tokens_are_the_generation_configs_and_the_tokenizers_eos(model_and_tok):
    model, tok = model_and_tok
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [5, 7]
        assert own_stop_token_ids(model, tok) == [5, 7]
        assert stop_token_ids(model, tok) == [5, 7, tok.eos_token_id]  # what training's labels end answers with
        model.generation_config.eos_token_id = None
        assert own_stop_token_ids(model, tok) == [tok.eos_token_id]
    finally:
        model.generation_config.eos_token_id = saved


# ------------------------------------------------------------------------------ one prefill per prompt group
def _head_logits(model, tok, prompts, repeat: int, steps: int, **sampling) -> tuple[list[torch.Tensor], list]:
    """The LM head's last-position logits at every call (the prefill's first, then one per decoding step) and the
    answers' ids, from ``generate_batch`` with ``repeat`` (the new path) or the prompts repeated (the old one)."""
    seen = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda _m, _i, out: seen.append(out[:, -1].float().clone()))
    try:
        torch.manual_seed(3)
        if repeat > 1:
            answers = generate_batch(model, tok, prompts, steps, stops=[10**6], repeat=repeat, **sampling)
        else:
            answers = generate_batch(model, tok, [p for p in prompts for _ in range(3)], steps, stops=[10**6],
                                     **sampling)
    finally:
        hook.remove()
    return seen, [a.ids for a in answers]


def test_a_group_prefilled_once_decodes_greedily_what_its_repeated_prompts_decode(model_and_tok):
    model, tok = model_and_tok
    prompts = _prompts(tok)[:3]  # different lengths: left padding in both paths
    shared = generate_batch(model, tok, prompts, 10, stops=[10**6], repeat=3)
    copies = generate_batch(model, tok, [p for p in prompts for _ in range(3)], 10, stops=[10**6])
    assert [a.ids for a in shared] == [a.ids for a in copies] and len(shared) == 9
    assert len({a.ids for a in shared}) == 3  # the copies of one prompt agree, the prompts differ


def test_a_group_prefilled_once_samples_from_the_same_logits_as_its_repeated_prompts(model_and_tok):
    model, tok = model_and_tok
    prompts = _prompts(tok)[:3]
    shared, shared_ids = _head_logits(model, tok, prompts, 3, 8, temperature=1.0, top_k=0)
    copies, copies_ids = _head_logits(model, tok, prompts, 1, 8, temperature=1.0, top_k=0)
    assert [len(s) for s in shared] == [3] + [9] * 8  # the prefill on the 3 prompts, then every step on 9 rows
    assert [len(c) for c in copies] == [9] * 8
    assert max((s - c).abs().max().item() for s, c in zip(shared[1:], copies, strict=True)) < 1e-5
    assert shared_ids == copies_ids  # the same seed draws the same tokens from the same distributions
    assert len(set(shared_ids[:3])) > 1  # sampled: the copies of a prompt differ


def test_a_peft_model_under_bf16_autocast_prefills_a_group_once_with_its_adapter_on(tiny_llama):
    from test_preference import policy

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.pad_token = tok.eos_token
    model = policy(tiny_llama)
    prompts = _prompts(tok)[:3]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shared, _ = _head_logits(model, tok, prompts, 3, 4, temperature=1.0, top_k=0)
        copies, _ = _head_logits(model, tok, prompts, 1, 4, temperature=1.0, top_k=0)
        with model.disable_adapter():
            base, _ = _head_logits(model, tok, prompts, 3, 4, temperature=1.0, top_k=0)
    gap = max((s - c).abs().max().item() for s, c in zip(shared[1:], copies, strict=True))
    adapter = max((s - b).abs().max().item() for s, b in zip(shared, base, strict=True))
    assert gap < 0.1 < adapter  # bf16 rounding apart, the adapter's logits (not the base's) in both paths


def test_sampling_with_top_k_0_uses_the_whole_distribution_whatever_the_generation_config_says(model_and_tok):
    model, tok = model_and_tok
    prompts = _prompts(tok)[:2]
    greedy = [a.ids for a in generate_batch(model, tok, prompts, 6, stops=[10**6], repeat=4)]
    saved = model.generation_config.top_k
    try:
        model.generation_config.top_k = 1  # a config that keeps only the most likely token: sampling is greedy
        torch.manual_seed(0)
        config_s = [a.ids for a in generate_batch(model, tok, prompts, 6, 1.0, stops=[10**6], repeat=4)]
        torch.manual_seed(0)
        whole = [a.ids for a in generate_batch(model, tok, prompts, 6, 1.0, stops=[10**6], top_k=0, repeat=4)]
    finally:
        model.generation_config.top_k = saved
    assert config_s == greedy  # top_k=None leaves the config's top-k in force (the chat/generate commands)
    assert sum(w != g for w, g in zip(whole, greedy, strict=True)) >= 6  # top_k=0: tokens past the top 1 drawn
