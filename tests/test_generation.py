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
