"""Preference pairs: ``{prompt, chosen, rejected}`` rows read and rendered, the loss mask on the completion only.

Reads TRL's two preference layouts: explicit prompt (``prompt`` a string or a message list, ``chosen``/``rejected``
strings or one assistant message each) and implicit prompt (no ``prompt`` column; ``chosen`` and ``rejected`` are
whole conversations that share every message but the last); a message's content may be a list of text parts, read
as supervised fine-tuning reads them (``chat.join_parts``). Each side is rendered as prompt + answer with the
tokenizer's chat template, as supervised fine-tuning renders it (``chat.py``), so an SFT adapter and its preference
tuning see the same text; only the final answer (up to and including its EOS/turn-end token) carries labels, never
an earlier assistant turn of a multi-turn prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..errors import RecipeError
from ..recipe import DataConfig
from .chat import IGNORE, assistant_char_spans, encode_plain, join_parts

Message = dict[str, str]


@dataclass(frozen=True)
class Pair:
    """One preference example: the prompt as messages, and the two answers."""

    prompt: list[Message]
    chosen: str
    rejected: str


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _content(m: dict, i: int, column: str) -> str:
    """A message's text: a string, or a list of text parts joined as supervised fine-tuning joins them
    (``chat.join_parts``; an image or audio part is refused by its type)."""
    content = m["content"]
    if not isinstance(content, list | tuple):
        return str(content)
    try:
        return join_parts(content, f"message {i + 1} ({m['role']})")
    except ValueError as e:
        raise RecipeError(f"data.{column}: {e}") from None


def _messages(value: list[dict], column: str) -> list[Message]:
    return [{"role": str(m["role"]), "content": _content(m, i, column)} for i, m in enumerate(value)]


def _answer(value: Any, column: str, at: int = 0) -> str:
    """A completion: a string, or TRL's conversational one-assistant-message list (message ``at`` of the cell)."""
    if isinstance(value, str):
        return value
    if value is None:  # a row without the key, in a file where other rows have it
        raise RecipeError(f"column '{column}' is empty; every example needs this text")
    if _is_messages(value) and len(value) == 1 and value[0]["role"] == "assistant":
        return _content(value[0], at, column)
    raise RecipeError(f"data.{column}: a completion is a string or one assistant message "
                      f"([{{'role': 'assistant', 'content': ...}}]), got {str(value)[:80]!r}")


def read_prompt(row: dict[str, Any], cfg: DataConfig, system: bool = True) -> list[Message]:
    """A row's explicit prompt as messages: a message list, or a string as one user message; with ``system``,
    ``data.system_prompt`` put first when the prompt has no system message (KTO's rows read it so)."""
    raw = row[cfg.prompt_column]
    prompt = _messages(raw, cfg.prompt_column) if _is_messages(raw) else [{"role": "user", "content": str(raw)}]
    if system and cfg.system_prompt and (not prompt or prompt[0]["role"] != "system"):
        prompt = [{"role": "system", "content": cfg.system_prompt}, *prompt]
    return prompt


def read_answer(value: Any, column: str) -> str:
    """A completion cell: a string, or TRL's conversational one-assistant-message list."""
    return _answer(value, column)


def read_pair(row: dict[str, Any], cfg: DataConfig) -> Pair:
    """The pair of a data row, in either of TRL's layouts; ``data.system_prompt`` is put first when the prompt
    has no system message."""
    chosen, rejected = row[cfg.chosen_column], row[cfg.rejected_column]
    if cfg.prompt_column in row and row[cfg.prompt_column] is not None:
        pair = Pair(read_prompt(row, cfg, system=False), read_answer(chosen, cfg.chosen_column),
                    read_answer(rejected, cfg.rejected_column))
    else:  # implicit prompt: two whole conversations that differ in their last (assistant) message
        if not (_is_messages(chosen) and _is_messages(rejected) and chosen and rejected):
            raise RecipeError(f"data: without a '{cfg.prompt_column}' column, '{cfg.chosen_column}' and "
                              f"'{cfg.rejected_column}' must be whole conversations (message lists)")
        prompt = _messages(chosen[:-1], cfg.chosen_column)
        if prompt != _messages(rejected[:-1], cfg.rejected_column):
            raise RecipeError(f"data: '{cfg.chosen_column}' and '{cfg.rejected_column}' must share every message "
                              "but the last (the prompt); give a prompt column otherwise")
        pair = Pair(prompt, _answer(chosen[-1:], cfg.chosen_column, len(chosen) - 1),
                    _answer(rejected[-1:], cfg.rejected_column, len(rejected) - 1))
    if cfg.system_prompt and (not pair.prompt or pair.prompt[0]["role"] != "system"):
        pair = Pair([{"role": "system", "content": cfg.system_prompt}, *pair.prompt], pair.chosen, pair.rejected)
    return pair


def encode_answer(tok: PreTrainedTokenizerBase, prompt: list[Message], answer: str) -> dict[str, list[int]]:
    """``input_ids`` of prompt + answer and ``labels`` on the answer's tokens only (its EOS included)."""
    if not tok.chat_template:
        if any(m["role"] == "assistant" for m in prompt):
            raise RecipeError("the tokenizer has no chat template, so multi-turn prompts cannot be rendered; use a "
                              "chat model, set model.chat_template (chatml for a base model), or string prompts")
        return encode_plain(tok, "\n".join(m["content"] for m in prompt) + "\n", answer)
    messages = [*prompt, {"role": "assistant", "content": answer}]
    text, spans = assistant_char_spans(tok, messages)
    # assistant_char_spans leaves out an answer the template renders differently once more turns follow; the
    # last span must be the final answer's.
    answers = sum(1 for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0)
    if len(spans) != answers:
        raise RecipeError("the chat template renders the prompt differently once the answer follows, so the answer's "
                          "tokens cannot be told apart; use another chat template")
    start, end = spans[-1]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [t if start <= s < end else IGNORE for t, (s, _) in zip(enc["input_ids"], enc["offset_mapping"],
                                                                      strict=True)]
    return {"input_ids": enc["input_ids"], "labels": labels}


def pair_text(pair: Pair) -> str:
    """The pair as one text (``lora-ft inspect``'s duplicate and leakage checks)."""
    return "\n".join([*(f"{m['role']}: {m['content']}" for m in pair.prompt), f"chosen: {pair.chosen}",
                      f"rejected: {pair.rejected}"])
