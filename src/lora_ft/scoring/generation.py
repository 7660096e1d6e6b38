"""Batched generation for evaluation: left-padded prompts, the KV cache, and whether each answer stopped.

Shared by the generation evaluation during training (``suite.py``), ``lora-ft eval`` on adapters, merged folders and
GGUF files, and the export gate. transformers' ``generate`` does the decoding; what it lacks for evaluation is the
batching of token-id prompts of different lengths, the split of the work over processes, and the per-answer record
of whether an end-of-turn token came before ``max_new_tokens`` (the stop rate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object
from transformers import DynamicCache, PreTrainedTokenizerBase


@dataclass(frozen=True)
class GenerationExample:
    """A prompt to generate an answer for, and the answer the data gives (``Objective.generation_example``)."""

    prompt_ids: list[int]
    """The prompt rendered as the model sees it before answering (chat template with its generation prompt)."""
    prompt: str
    """The prompt in words, for the samples table."""
    reference: str


@dataclass(frozen=True)
class Answer:
    """One generated answer."""

    text: str
    """Decoded without special tokens, stripped."""
    tokens: int
    """Tokens generated, up to and including the first end-of-turn token."""
    stopped: bool
    """An end-of-turn token came before ``max_new_tokens`` ran out."""
    ids: tuple[int, ...] = ()
    """The ``tokens`` generated, as ids (what an online objective trains on)."""


def own_stop_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens a plain runtime stops at: the generation config's EOS ids (transformers' ``generate``; a GGUF
    file's metadata becomes that config when transformers reads it), else the tokenizer's EOS."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None) if config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def stop_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end an answer of the model being trained: the generation config's EOS ids (chat models often
    list the end-of-turn token and the end-of-text token) and the tokenizer's EOS, which the training labels end
    every answer with."""
    ids = own_stop_token_ids(model, tokenizer)
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id not in (None, *ids) else ids


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of token-id sequences padded on the left to the longest (generation's
    layout, and GRPO's distinct prompts in ``objectives/shared_prompt.py``)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _answers(out: torch.Tensor, stops: list[int], tokenizer: PreTrainedTokenizerBase) -> list[Answer]:
    answers = []
    stop = torch.tensor(stops, device=out.device)
    for row in out:
        ended = torch.isin(row, stop).nonzero()
        n = int(ended[0]) + 1 if len(ended) else len(row)  # generate pads a finished row after its EOS
        answers.append(Answer(tokenizer.decode(row[:n], skip_special_tokens=True).strip(), n, bool(len(ended)),
                              tuple(row[:n].tolist())))
    return answers


def _prefilled(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
               repeat: int) -> tuple[dict[str, torch.Tensor], DynamicCache]:
    """Each prompt's keys and values computed once and repeated ``repeat`` times, with the inputs repeated alike.

    The cache holds every prompt token but the last: ``generate`` runs the tokens its cache lacks, so the last
    token's forward (and its logits, the first sampled distribution) stays ``generate``'s own.
    """
    mask = inputs["attention_mask"]
    # generate's own positions for a left-padded batch (_prepare_position_ids_for_generation): pads at 0.
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=model.config)
    model(input_ids=inputs["input_ids"][:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
          cache=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(repeat)
    return {k: v.repeat_interleave(repeat, dim=0) for k, v in inputs.items()}, cache


@torch.no_grad()
def generate_batch(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]],
                   max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                   stops: list[int] | None = None, top_k: int | None = None, repeat: int = 1) -> list[Answer]:
    """Answers to token-id prompts generated together.

    Args:
        model: a causal LM (peft model, merged or GGUF-loaded); put in eval mode and left as it was.
        tokenizer: the model's tokenizer (pad token set).
        prompts: rendered prompts as token ids (the chat template's generation prompt included).
        max_new_tokens: the longest answer; one that reaches it without an end-of-turn token has not stopped.
        temperature: 0 decodes greedily.
        top_p: nucleus sampling's mass when sampling.
        stops: the token ids that end an answer (default ``stop_token_ids``).
        top_k: when sampling, keep the k most likely tokens; 0 keeps them all; None leaves it to the model's
            generation config (transformers' default is 50), as a plain ``generate`` would.
        repeat: answers per prompt, returned prompt by prompt (GRPO's group). The prompts' prefill runs once, on
            the distinct prompts, and its cache is repeated for the ``len(prompts) × repeat`` rows that decode.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = stops if stops is not None else stop_token_ids(model, tokenizer)
    inputs = left_padded(prompts, tokenizer.pad_token_id, device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if temperature > 0 and top_k is not None:
        sampling["top_k"] = top_k  # transformers builds no top-k warper for 0 (or None given here)
    cache = {}
    if repeat > 1 and inputs["input_ids"].shape[1] > 1:
        inputs, cache["cache"] = _prefilled(model, inputs, repeat)
    elif repeat > 1:
        inputs = {k: v.repeat_interleave(repeat, dim=0) for k, v in inputs.items()}
    # use_cache=True: training may have turned the cache off (gradient checkpointing); decoding without it
    # recomputes every earlier position at each new token.
    out = model.generate(**inputs, **cache, max_new_tokens=max_new_tokens, eos_token_id=stops,
                         pad_token_id=tokenizer.pad_token_id, use_cache=True, **sampling)
    model.train(was_training)
    return _answers(out[:, inputs["input_ids"].shape[1]:], stops, tokenizer)


def generate_all(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int, batch_size: int, accelerator=None, temperature: float = 0.0,
                 top_p: float = 1.0, stops: list[int] | None = None) -> list[Answer]:
    """Answers to every prompt, in the prompts' order, on 1 process or N.

    Prompts are batched by length (less padding); the batches are the same on any number of processes and are
    dealt out whole (batch i to process i mod N), then gathered: so N processes return exactly what one returns.
    Every process gets the whole list.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    mine = []
    for b in batches[rank::world]:
        mine += zip(b, generate_batch(model, tokenizer, [prompts[i] for i in b], max_new_tokens, temperature, top_p,
                                       stops),
                    strict=True)
    done = dict(gather_object(mine) if world > 1 else mine)
    return [done[i] for i in range(len(prompts))]
