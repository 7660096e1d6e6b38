"""Rendering conversations with the tokenizer's chat template, and which tokens carry loss.

Shared by every objective that trains on chat data: supervised fine-tuning now, preference tuning next.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from ..errors import RecipeError
from ..recipe import DataConfig

IGNORE = -100
"""The label of a position that carries no loss (``torch.nn.functional.cross_entropy``'s default ignore_index)."""
CHAT_FORMATS = ("messages", "sharegpt", "prompt_completion", "alpaca")
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
         # ShareGPT's names (``from``/``value`` turns)
         "human": "user", "gpt": "assistant"}
"""Accepted turn roles → the chat template's role."""


TEXT_PART = "text"
"""The one content part read: OpenAI's and transformers' ``{"type": "text", "text": ...}``."""


def join_parts(content: list | tuple, who: str) -> str:
    """A content given as a list of parts (the OpenAI/transformers multimodal message layout) as its text.

    Text parts are concatenated with nothing in between, as transformers' own chat templates that render part
    lists do (the Llama 4 and Qwen2-Audio templates shipped in transformers 5.25 emit each ``content['text']`` in
    turn, no separator): the joined string renders through a text-only template exactly as those render the parts.
    TRL 1.16 has no one rule to follow (its experimental trainers join with " " or "\n", for logging only).

    Any other part (image, image_url, audio, input_audio, video, file, ...) is refused by its type: this toolkit
    trains text models, and dropping the part silently would train on a question about an image nobody sees.
    Keys whose value is null are ignored: a parquet or datasets struct column gives every part the keys of all
    parts (``url: None`` on a text part).

    Args:
        content: the message's list of parts.
        who: the message, for errors ("message 2 (user)").
    """
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise ValueError(f"{who} part {j + 1} is {type(part).__name__}, not an object with 'type' and 'text'")
        part = {k: v for k, v in part.items() if v is not None}
        kind = part.get("type")
        if kind != TEXT_PART:
            what = f"of type {kind!r}" if kind is not None else f"without a 'type' (keys present: {sorted(part)})"
            raise ValueError(f"{who} has a part {what} (part {j + 1}): only text parts are read, as lora-ft trains "
                             "text models; remove the part or the row")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{who} part {j + 1} (text) has no string 'text'")
        texts.append(part["text"])
    return "".join(texts)


def _turn(i: int, m: Any) -> dict[str, str]:
    """One turn, ``{role, content}`` or ShareGPT's ``{from, value}``, as ``{role, content}``."""
    if not isinstance(m, dict):
        raise ValueError(f"message {i + 1} is {type(m).__name__}, not an object with role and content")
    role, content = (m.get("role"), m.get("content")) if "role" in m else (m.get("from"), m.get("value"))
    if role is None and "from" not in m:
        raise ValueError(f"message {i + 1} has no 'role' (or ShareGPT 'from'); keys present: {sorted(m)}")
    if role not in ROLES:
        raise ValueError(f"message {i + 1} has the role {role!r}; use one of {', '.join(ROLES)}")
    if content is None:
        raise ValueError(f"message {i + 1} ({role}) has no content (null)")
    if isinstance(content, int | float) and not isinstance(content, bool):
        content = str(content)
    if isinstance(content, list | tuple):
        content = join_parts(content, f"message {i + 1} ({role})")
    if not isinstance(content, str):
        raise ValueError(f"message {i + 1} ({role}) has content of type {type(content).__name__}: give its text, "
                         "or a list of text parts (tool calls are not supported)")
    if not content.strip():
        raise ValueError(f"message {i + 1} ({role}) is empty")
    return {"role": ROLES[role], "content": content}


def parse_conversation(value: Any) -> list[dict[str, str]]:
    """A conversation cell as a list of ``{role, content}`` turns; ``ValueError`` says what is wrong with it.

    Accepted: a list of ``{role, content}`` messages, ShareGPT's ``{from, value}`` turns (``human``/``gpt``/
    ``system``), or either as a JSON string (CSV files hold lists that way). A content (or value) may be a list of
    text parts, read as their joined text (``join_parts``). It needs an assistant answer after a prompt turn."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("is text, not a list of messages (nor a JSON string of one)") from None
    if value is None:
        raise ValueError("is null; every example needs a conversation")
    if not isinstance(value, list | tuple):
        raise ValueError(f"is {type(value).__name__}, not a list of messages")
    if not value:
        raise ValueError("is an empty list of messages")
    turns = [_turn(i, m) for i, m in enumerate(value)]
    if not any(t["role"] == "assistant" for t in turns[1:]):
        raise ValueError("has no assistant answer after the prompt; every conversation needs one")
    return turns


def to_messages(row: dict[str, Any], fmt: str, cfg: DataConfig) -> list[dict[str, str]]:
    if fmt in ("messages", "sharegpt"):
        messages = parse_conversation(row[cfg.messages_column if fmt == "messages" else cfg.conversations_column])
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": str(row[cfg.prompt_column])},
                    {"role": "assistant", "content": str(row[cfg.completion_column])}]
    else:  # alpaca
        extra = row.get(cfg.input_column)
        extra = "" if extra is None else str(extra).strip()  # optional: null or empty means no input
        prompt = str(row[cfg.instruction_column]) + (f"\n\n{extra}" if extra else "")
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": str(row[cfg.output_column])}]
    if cfg.system_prompt and messages and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


def assistant_char_spans(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> tuple[str, list]:
    """Render a conversation; return the text and the character spans of each assistant answer.

    Written by hand because transformers' ``return_assistant_tokens_mask`` (and TRL's
    ``assistant_only_loss``) only work with templates that carry ``{% generation %}`` markers, which most
    shipped templates (SmolLM2, Llama, Qwen) lack. A span runs from the end of the rendered prompt to the
    end of the answer's EOS/turn-end token, so the EOS is learned and the template's trailing newline is not.
    """
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        # The last answer's prefix is the whole conversation: rendered once (a third of the rendering of a pair).
        upto = full if i == len(messages) - 1 else tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            continue  # templates that rewrite earlier turns: only prefix-stable answers get loss
        end = len(upto)
        eos = upto.rfind(tok.eos_token, len(before), end) if tok.eos_token else -1
        spans.append((len(before), eos + len(tok.eos_token) if eos >= 0 else end))
    if not spans:
        raise RecipeError("chat example without an answer: every conversation needs an assistant turn "
                          "after the prompt")
    return full, spans


def encode_chat(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], train_on_prompt: bool) -> dict:
    text, spans = assistant_char_spans(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return {"input_ids": enc["input_ids"],
            "labels": answer_labels(enc["input_ids"], enc["offset_mapping"], spans, train_on_prompt)}


def answer_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                  train_on_prompt: bool) -> list[int]:
    """The token ids whose first character lies in an answer span, ``IGNORE`` elsewhere (every id with
    ``train_on_prompt``). Numpy over the offsets: a Python test of every token against every span was a fifth of
    the time of tokenizing a chat example."""
    if train_on_prompt:
        return list(ids)
    starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
    inside = np.zeros(len(ids), dtype=bool)
    for s, e in spans:
        inside |= (starts >= s) & (starts < e)
    return np.where(inside, np.asarray(ids, dtype=np.int64), IGNORE).tolist()


def render_prompt(tok: PreTrainedTokenizerBase, prompt: list[dict[str, str]]) -> list[int]:
    """The token ids a model answers from: the prompt turns with the chat template's generation prompt, exactly
    the prefix ``encode_chat`` puts before an answer (``encode_plain``'s without a template)."""
    if tok.chat_template:
        text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok("\n".join(m["content"] for m in prompt) + "\n", add_special_tokens=True)["input_ids"]


def prompt_text(messages: list[dict[str, str]]) -> str:
    """Turns as ``role: content`` lines: how ``lora-ft inspect`` and the samples table show a conversation."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def encode_plain(tok: PreTrainedTokenizerBase, prompt: str, answer: str) -> dict:
    """Prompt/answer without a chat template: loss on the answer and the EOS."""
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return {"input_ids": p + a, "labels": [IGNORE] * len(p) + a}


def encode_text(tok: PreTrainedTokenizerBase, text: str) -> dict:
    ids = tok(text, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}
