"""Supervised fine-tuning of a causal LM: next-token loss on the answer tokens (or on all of plain text).

Batches are padded on the left with explicit position ids, so every answer ends at the right edge of the batch:
``logits_to_keep`` then asks the model for the logits of the last K positions only (those that carry loss), and
the loss goes through the frozen output head a chunk at a time (``chunked_loss``), never as full logits. The
loss is summed over label tokens and divided by the label tokens of the whole global batch (the trainer).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

from ..data.chat import (
    IGNORE,
    answer_labels,
    assistant_char_spans,
    encode_chat,
    encode_plain,
    encode_text,
    prompt_text,
    render_prompt,
    to_messages,
)
from ..data.packing import next_fit_rows
from ..errors import RecipeError
from ..modeling import packed_attention
from ..recipe import AugmentConfig
from .base import Batch, GenerationExample, Objective
from .chunked_loss import chunked_token_losses, head_inputs, innermost, output_head


def supports_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the innermost transformers model takes ``logits_to_keep`` (through DDP and peft wrappers)."""
    return _forward_has_keep(type(innermost(model)))


@cache
def _forward_has_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def kept_targets(batch: Batch) -> torch.Tensor:
    """The targets of a left-padded batch's kept positions (``logits_to_keep``): what position t predicts."""
    labels, keep = batch["labels"], int(batch["logits_to_keep"])
    return labels[:, labels.shape[1] - keep + 1 :]


def _kept(batch: Batch) -> tuple[dict[str, Any], int, torch.Tensor]:
    """(model inputs, kept positions, targets of the kept positions) of a left-padded batch."""
    inputs = {k: v for k, v in batch.items() if k not in ("logits_to_keep", "labels")}
    return inputs, int(batch["logits_to_keep"]), kept_targets(batch)


def token_losses(model: torch.nn.Module, batch: Batch, chunked: bool = True,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token losses of the kept positions (0 where no label) and their targets; for a packed
    batch (``pack``), the losses and targets of the labelled positions only, flat.

    ``chunked``: through ``chunked_loss`` where the model allows it (no full-vocabulary logits; same values).
    ``temperature``: the losses of logits / temperature (a sampling policy's log-probs, as TRL's GRPO scores them);
    left-padded batches only. The chunked head then takes hidden / temperature, the same logits for a head without
    a bias (with one, the full logits are computed).
    """
    if "logits_to_keep" not in batch:
        return _packed_token_losses(model, batch, chunked)
    inputs, keep, target = _kept(batch)
    head = output_head(model) if chunked else None
    if head is not None and temperature != 1.0 and head.bias is not None:
        head = None
    # use_cache=False: training and scoring never generate, and a KV cache copies K/V in every layer.
    kwargs = {"logits_to_keep": keep} if supports_logits_to_keep(model) else {}
    if head is not None:
        with head_inputs(head) as captured:
            model(**inputs, **kwargs, use_cache=False)
        # Without logits_to_keep the head saw every position: the same slice as the logits below.
        hidden = captured[0].hidden[:, -keep:][:, :-1]
        hidden = hidden if temperature == 1.0 else hidden / temperature
        return chunked_token_losses(head, hidden, target, captured[0].autocast), target
    logits = model(**inputs, **kwargs, use_cache=False).logits[:, -keep:][:, :-1].float()
    logits = logits if temperature == 1.0 else logits / temperature
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                             ignore_index=IGNORE, reduction="none").view(target.shape)
    return losses, target


def _packed_token_losses(model: torch.nn.Module, batch: Batch, chunked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed batch has no attention mask: transformers then reads the example boundaries from the position ids
    and keeps attention inside each example (``masking_utils.find_packed_sequence_indices``). Labels are spread
    over the rows, so the head's input is taken for every position and only the labelled ones go through it."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "real_tokens")}
    target = batch["labels"][:, 1:]
    labelled = target != IGNORE
    head = output_head(model) if chunked else None
    if head is not None:
        with head_inputs(head) as captured:
            model(**inputs, use_cache=False)
        hidden = captured[0].hidden[:, :-1][labelled]
        return chunked_token_losses(head, hidden, target[labelled], captured[0].autocast), target[labelled]
    logits = model(**inputs, use_cache=False).logits[:, :-1][labelled].float()
    return F.cross_entropy(logits, target[labelled], reduction="none"), target[labelled]


def causal_loss(model: torch.nn.Module, batch: Batch, per_example: bool = False, chunked: bool = True):
    """Summed next-token loss and the number of label tokens (per example with ``per_example``)."""
    losses, target = token_losses(model, batch, chunked)
    counts = (target != IGNORE).sum(-1)
    if per_example:
        return losses.sum(-1), counts
    return losses.sum(), counts.sum()


def pad_left(rows: list[dict[str, Any]], pad_id: int) -> Batch:
    """Left-padded ``input_ids``/``labels``, the attention mask, position ids that start at 0 on each example's
    first real token, and ``logits_to_keep``: the positions from the first label onwards."""
    width = max(len(r["input_ids"]) for r in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, width - k :] = torch.tensor(r["input_ids"])
        labels[i, width - k :] = torch.tensor(r["labels"])
        mask[i, width - k :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    has_label = (labels[:, 1:] != IGNORE).any(0)
    first = int(has_label.nonzero()[0]) if has_label.any() else width - 2
    # Logits at position t predict token t+1: keep positions first..width-2, plus the last (unused).
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels,
            "logits_to_keep": width - first}


def pack(rows: list[dict[str, Any]], pad_id: int, capacity: int) -> Batch:
    """Examples laid end to end in rows of at most ``capacity`` tokens (``data.packing.next_fit_rows``: the rows
    ``PackedBatches`` chose), without an attention mask. Position ids restart at 0 on each example, so attention
    stays inside it; each example's first label is dropped (its first token is never a target: the token before
    it belongs to another example); rows are padded at the end to the longest row, the padding a segment of its
    own with no labels. ``real_tokens``: the tokens that are not padding."""
    lengths = [len(r["input_ids"]) for r in rows]
    layout = next_fit_rows(lengths, capacity)
    width = max(sum(lengths[k] for k in row) for row in layout)
    ids = torch.full((len(layout), width), pad_id, dtype=torch.long)
    labels = torch.full((len(layout), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(layout), width), dtype=torch.long)
    for r, row in enumerate(layout):
        at = 0
        for k in row:
            n = lengths[k]
            ids[r, at : at + n] = torch.tensor(rows[k]["input_ids"])
            labels[r, at + 1 : at + n] = torch.tensor(rows[k]["labels"][1:])
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "position_ids": positions, "labels": labels,
            "real_tokens": torch.tensor(sum(lengths))}


PACKING_MODELS = packed_attention.MODELS
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", packed_attention.NAME)


def _no_template(fmt: str) -> RecipeError:
    return RecipeError(f"the tokenizer has no chat template, so '{fmt}' data cannot be rendered: set "
                       "model.chat_template (chatml for a base model), use a chat model, or data.format "
                       "prompt_completion/text")


class CausalLM(Objective):
    """Next-token prediction on chat/instruction answers (``messages``, ``prompt_completion``, ``alpaca``) or on
    every token of plain ``text``."""

    model_task = "causal_lm"
    length_window = 64
    """As transformers' ``group_by_length``: length hardly says anything about a chat answer's content."""
    formats = ("messages", "sharegpt", "prompt_completion", "alpaca", "text")
    compared = "next-token distributions on answer tokens"

    def detect_format(self, columns: list[str], split: str) -> str:
        cfg = self.cfg
        fmt = cfg.format
        if fmt == "auto":
            fmt = self._guess_format(columns, split)
        self.need_columns(columns, split, *{
            "messages": (cfg.messages_column,),
            "sharegpt": (cfg.conversations_column,),
            "prompt_completion": (cfg.prompt_column, cfg.completion_column),
            "alpaca": (cfg.instruction_column, cfg.output_column),
            "text": (cfg.text_column,),
        }[fmt])
        if fmt in ("messages", "sharegpt") and self.tokenizer is not None and not self.tokenizer.chat_template:
            raise _no_template(fmt)
        return fmt

    def _guess_format(self, columns: list[str], split: str) -> str:
        """``data.format: auto``: the format the columns say. Text with a label column is refused rather than
        trained as plain text: the labels would be dropped without a word."""
        cfg = self.cfg
        if cfg.messages_column in columns:
            return "messages"
        if cfg.conversations_column in columns:
            return "sharegpt"
        if cfg.prompt_column in columns and cfg.completion_column in columns:
            return "prompt_completion"
        if cfg.instruction_column in columns and cfg.output_column in columns:
            return "alpaca"
        if cfg.text_column in columns:
            if cfg.label_column in columns:
                raise RecipeError(f"data.{split}: the columns {columns} look like classification data "
                                  f"('{cfg.text_column}' with '{cfg.label_column}'), but model.task is causal_lm, "
                                  "which would train on the text alone and drop the labels: set model.task: "
                                  "sequence_classification, or data.format: text to train on the text")
            return "text"
        raise RecipeError(f"data.{split}: cannot tell the data format from the columns {columns}; "
                          "set data.format and the column names")

    def columns(self, fmt: str) -> dict[str, str]:
        cfg = self.cfg
        return {"messages": {cfg.messages_column: "conversation"},
                "sharegpt": {cfg.conversations_column: "conversation"},
                "prompt_completion": {cfg.prompt_column: "text", cfg.completion_column: "text"},
                "alpaca": {cfg.instruction_column: "text", cfg.input_column: "optional_text",
                           cfg.output_column: "text"},
                "text": {cfg.text_column: "text"}}[fmt]

    def encode_full(self, row: dict[str, Any], fmt: str) -> dict[str, list[int]]:
        """``input_ids`` and ``labels`` of one example, before truncation."""
        tok, cfg = self.tokenizer, self.cfg
        if fmt == "text":
            return encode_text(tok, str(row[cfg.text_column]))
        if tok.chat_template:
            return encode_chat(tok, to_messages(row, fmt, cfg), cfg.train_on_prompt)
        if fmt in ("messages", "sharegpt"):
            raise _no_template(fmt)
        m = to_messages(row, fmt, cfg)
        return encode_plain(tok, "\n".join(x["content"] for x in m[:-1]) + "\n", m[-1]["content"])

    def encode(self, row: dict[str, Any], fmt: str) -> dict[str, Any]:
        return self._cut(self.encode_full(row, fmt))

    def encode_batch(self, rows: list[dict[str, Any]], fmt: str) -> list[dict[str, Any]]:
        """``encode`` of each row, with the chat texts tokenized in one call: the per-call overhead of the
        tokenizer wrapper was a third of tokenizing a 150-token example one by one (``scripts/make_big_chat.py``
        data, SmolLM2 tokenizer)."""
        tok, cfg = self.tokenizer, self.cfg
        own = type(self).encode is CausalLM.encode and type(self).encode_full is CausalLM.encode_full
        if fmt == "text" or not tok.chat_template or not own:  # a subclass (preference, KTO) encodes its own way
            return super().encode_batch(rows, fmt)
        rendered = [assistant_char_spans(tok, to_messages(r, fmt, cfg)) for r in rows]
        enc = tok([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        return [self._cut({"input_ids": ids, "labels": answer_labels(ids, offsets, spans, cfg.train_on_prompt)})
                for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered, strict=True)]

    def _cut(self, out: dict[str, Any]) -> dict[str, Any]:
        """An encoded example truncated to ``max_length``, with ``truncated`` and ``usable`` (see ``encode``)."""
        truncated = len(out["input_ids"]) > self.cfg.max_length
        if truncated:
            out = {k: v[: self.cfg.max_length] for k, v in out.items()}
        out["truncated"] = truncated
        out["usable"] = any(t != IGNORE for t in out["labels"][1:])  # position 0 predicts nothing
        return out

    def generation_example(self, row: dict[str, Any], fmt: str) -> GenerationExample | None:
        """The conversation up to its last answer, and that answer; plain text has no prompt to answer."""
        if fmt == "text":
            return None
        messages = to_messages(row, fmt, self.cfg)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = messages[:last]
        return GenerationExample(render_prompt(self.tokenizer, prompt), prompt_text(prompt),
                                 messages[last]["content"])

    def collate(self, rows: list[dict[str, Any]], augment: Callable[[dict], dict] | None = None) -> Batch:
        if augment:
            rows = [augment(r) for r in rows]
        return pad_left(rows, self.tokenizer.pad_token_id)

    def example_text(self, row: dict[str, Any], fmt: str) -> str:
        if fmt == "text":
            return str(row[self.cfg.text_column])
        return prompt_text(to_messages(row, fmt, self.cfg))

    def length(self, row: dict[str, Any], fmt: str) -> int:
        return len(self.encode_full(row, fmt)["input_ids"])

    def describe(self, row: dict[str, Any], fmt: str) -> str:
        """The example as text, with the tokens that carry loss wrapped in [[...]]."""
        encoded = self.encode_full(row, fmt)
        out, inside = [], False
        for t, lab in zip(encoded["input_ids"], encoded["labels"], strict=True):
            on = lab != IGNORE
            if on != inside:
                out.append("[[" if on else "]]")
                inside = on
            out.append(self.tokenizer.decode([t]))
        return "".join(out) + ("]]" if inside else "")

    def neftune_alpha(self, cfg: AugmentConfig) -> float | None:
        return cfg.neftune_alpha

    def cannot_pack(self, model: torch.nn.Module) -> str | None:
        config = innermost(model).config
        if config.model_type not in PACKING_MODELS:
            return f"packing is checked for {', '.join(sorted(PACKING_MODELS))}, not '{config.model_type}'"
        if config._attn_implementation not in PACKING_ATTENTION:
            return f"attention implementation '{config._attn_implementation}' does not read packed position ids"
        return None

    def collate_packed(self, rows: list[dict[str, Any]], capacity: int) -> Batch:
        return pack(rows, self.tokenizer.pad_token_id, capacity)

    def tokens(self, batch: Batch) -> torch.Tensor:
        return batch["real_tokens"] if "real_tokens" in batch else batch["attention_mask"].sum()

    def head_positions(self, batch: Batch) -> torch.Tensor:
        return self.items(batch)

    def items(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE).sum()

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return causal_loss(model, batch)[0]

    def eval_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        loss, count = causal_loss(model, batch, per_example=True)
        return {"loss": loss.detach().float(), "tokens": count}

    def summarize(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        tokens = values["tokens"].sum().item()
        loss = values["loss"].double().sum().item() / max(tokens, 1)
        return {"loss": loss, "examples": len(values["tokens"]), "perplexity": math.exp(min(loss, 50.0)),
                "tokens": int(tokens)}

    @torch.no_grad()
    def label_logits(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The next-token logits of the answer tokens: the positions the loss is computed on."""
        inputs, keep, target = _kept(batch)
        if supports_logits_to_keep(model):
            logits = model(**inputs, logits_to_keep=keep).logits
        else:
            logits = model(**inputs).logits[:, -keep:]
        mask = target != IGNORE
        return logits[:, :-1][mask].float(), target[mask]
