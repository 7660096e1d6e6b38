"""Task data: reading splits, detecting formats, tokenizing with label masks, length-grouped batches.

This module never imports model code: it needs only a tokenizer.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from .config import DataConfig, RecipeError, first_line

log = logging.getLogger(__name__)

IGNORE = -100
READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
CHAT_FORMATS = ("messages", "prompt_completion", "alpaca")


# ----------------------------------------------------------------------------------------------- reading
def read_split(spec: str, split: str) -> datasets.Dataset:
    """A local jsonl/json/csv/parquet file, or a Hub dataset id (its split named ``split``)."""
    path = Path(spec).expanduser()
    if path.suffix.lower() in READERS or path.exists():
        if not path.is_file():
            raise RecipeError(f"data.{split}: file not found: {spec}")
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise RecipeError(f"data.{split}: cannot read '{path.suffix}' files; use .jsonl, .json, .csv or .parquet")
        if path.stat().st_size == 0:
            raise RecipeError(f"data.{split}: {spec} holds no examples")
        try:
            ds = datasets.load_dataset(reader, data_files=str(path), split="train")
        except Exception as e:  # datasets wraps parser errors in several exception types
            cause = first_line(e.__cause__ or e)
            raise RecipeError(f"data.{split}: cannot parse {spec} as {reader}: {cause}") from None
    else:
        try:
            ds = datasets.load_dataset(spec, split=split)
        except Exception as e:
            raise RecipeError(f"data.{split}: '{spec}' is neither a local file nor a loadable Hub dataset "
                              f"({first_line(e)})") from None
    if len(ds) == 0:
        raise RecipeError(f"data.{split}: {spec} holds no examples")
    return ds


def detect_format(columns: list[str], task: str, cfg: DataConfig, split: str) -> str:
    def need(*cols: str | None) -> None:
        missing = [c for c in cols if c and c not in columns]
        if missing:
            raise RecipeError(f"data.{split}: column(s) {missing} not found; columns present: {columns} "
                              f"(set data.*_column to rename)")

    fmt = cfg.format
    if fmt == "auto":
        if task == "sequence_classification":
            fmt = "classification"
        elif cfg.messages_column in columns:
            fmt = "messages"
        elif cfg.prompt_column in columns and cfg.completion_column in columns:
            fmt = "prompt_completion"
        elif cfg.instruction_column in columns and cfg.output_column in columns:
            fmt = "alpaca"
        elif cfg.text_column in columns:
            fmt = "text"
        else:
            raise RecipeError(f"data.{split}: cannot tell the data format from the columns {columns}; "
                              "set data.format and the column names")
    need(*{
        "classification": (cfg.text_column, cfg.text_pair_column, cfg.label_column),
        "messages": (cfg.messages_column,),
        "prompt_completion": (cfg.prompt_column, cfg.completion_column),
        "alpaca": (cfg.instruction_column, cfg.output_column),
        "text": (cfg.text_column,),
    }[fmt])
    return fmt


# ------------------------------------------------------------------------------------------ causal LM
def to_messages(row: dict[str, Any], fmt: str, cfg: DataConfig) -> list[dict[str, str]]:
    if fmt == "messages":
        messages = [{"role": m["role"], "content": m["content"]} for m in row[cfg.messages_column]]
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": str(row[cfg.prompt_column])},
                    {"role": "assistant", "content": str(row[cfg.completion_column])}]
    else:  # alpaca
        extra = row.get(cfg.input_column) or ""
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
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
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
    labels = [
        t if train_on_prompt or any(s <= start < e for s, e in spans) else IGNORE
        for t, (start, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return {"input_ids": enc["input_ids"], "labels": labels}


def encode_plain(tok: PreTrainedTokenizerBase, prompt: str, answer: str) -> dict:
    """Prompt/answer without a chat template: loss on the answer and the EOS."""
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return {"input_ids": p + a, "labels": [IGNORE] * len(p) + a}


def encode_text(tok: PreTrainedTokenizerBase, text: str) -> dict:
    ids = tok(text, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def encode_causal(row: dict, fmt: str, tok: PreTrainedTokenizerBase, cfg: DataConfig) -> dict:
    if fmt == "text":
        out = encode_text(tok, str(row[cfg.text_column]))
    elif tok.chat_template:
        out = encode_chat(tok, to_messages(row, fmt, cfg), cfg.train_on_prompt)
    elif fmt == "messages":
        raise RecipeError("the tokenizer has no chat template, so 'messages' data cannot be rendered; use a "
                          "chat model, or data.format prompt_completion/text")
    else:
        m = to_messages(row, fmt, cfg)
        out = encode_plain(tok, "\n".join(x["content"] for x in m[:-1]) + "\n", m[-1]["content"])
    n = len(out["input_ids"])
    truncated = n > cfg.max_length
    if truncated:
        out = {k: v[: cfg.max_length] for k, v in out.items()}
    out["truncated"] = truncated
    out["n_label_tokens"] = sum(t != IGNORE for t in out["labels"][1:])  # position 0 predicts nothing
    return out


# ------------------------------------------------------------------------------------- classification
def label_names(ds: datasets.Dataset, column: str) -> list[str]:
    """Sorted label names: numerically when the labels are numbers (so 2 < 10), else alphabetically."""
    values = set(ds[column])
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def encode_classification(row: dict, tok: PreTrainedTokenizerBase, cfg: DataConfig, label2id: dict) -> dict:
    args = [str(row[cfg.text_column])]
    if cfg.text_pair_column:
        args.append(str(row[cfg.text_pair_column]))
    full = tok(*args)["input_ids"]
    enc = tok(*args, truncation=True, max_length=cfg.max_length)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            **({"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {}),
            "labels": label2id[str(row[cfg.label_column])], "truncated": len(full) > len(enc["input_ids"])}


# ---------------------------------------------------------------------------------------------- splits
@dataclass
class TaskData:
    """Tokenized splits ready for batching, with what was learned from the training split."""

    splits: dict[str, datasets.Dataset]
    format: str
    id2label: dict[int, str] | None = None
    stats: dict[str, dict[str, int]] = field(default_factory=dict)


def prepare_data(
    cfg: DataConfig, task: str, tok: PreTrainedTokenizerBase, seed: int, need_train: bool = True,
    extra: dict[str, str] | None = None, id2label: dict[int, str] | None = None,
) -> TaskData:
    """Read every split named in ``cfg`` (plus ``extra`` name→file), validate and tokenize them.

    ``id2label``: a trained classifier's label set (evaluation); otherwise it is read from ``train``.
    """
    raw: dict[str, datasets.Dataset] = {}
    if need_train:
        if not cfg.train:
            raise RecipeError("data.train: no training data given (set data.train to a file or Hub dataset)")
        raw["train"] = read_split(cfg.train, "train")
    if cfg.validation:
        raw["validation"] = read_split(cfg.validation, "validation")
    elif cfg.validation_split and "train" in raw:
        n = len(raw["train"])
        n_val = math.ceil(cfg.validation_split * n)  # how datasets' train_test_split rounds a fraction
        if n - n_val < 1 or n_val < 1:
            raise RecipeError(f"data.validation_split {cfg.validation_split} of {n} training example(s) leaves "
                              f"{n - n_val} to train on; lower it or give data.validation")
        parts = raw["train"].train_test_split(test_size=cfg.validation_split, seed=seed)
        raw["train"], raw["validation"] = parts["train"], parts["test"]
    if cfg.test:
        raw["test"] = read_split(cfg.test, "test")
    for name, spec in (extra or {}).items():
        raw[name] = read_split(spec, name)
    formats = {name: detect_format(ds.column_names, task, cfg, name) for name, ds in raw.items()}
    fmt = formats.get("train") or next(iter(formats.values()))
    if cfg.max_eval_examples:
        raw = {n: ds.select(range(min(len(ds), cfg.max_eval_examples))) if n != "train" else ds
               for n, ds in raw.items()}
    return _tokenize(raw, formats, fmt, cfg, task, tok, id2label)


def _tokenize(raw, formats, fmt, cfg, task, tok, id2label=None) -> TaskData:
    data = TaskData({}, fmt, id2label)
    if task == "sequence_classification":
        if data.id2label is None:
            source = raw.get("train") or next(iter(raw.values()))
            data.id2label = dict(enumerate(label_names(source, cfg.label_column)))
        label2id = {n: i for i, n in data.id2label.items()}
        for name, ds in raw.items():
            unseen = sorted({str(v) for v in ds[cfg.label_column]} - set(label2id))
            if unseen:
                raise RecipeError(f"data.{name}: label(s) {unseen[:10]} never occur in the training data "
                                  f"(known: {sorted(label2id)[:20]})")
    for name, ds in raw.items():
        if task == "sequence_classification":
            fn = lambda row: encode_classification(row, tok, cfg, label2id)  # noqa: E731
        else:
            fn = lambda row, f=formats[name]: encode_causal(row, f, tok, cfg)  # noqa: E731
        enc = ds.map(fn, remove_columns=ds.column_names, desc=f"tokenizing {name}")
        total = len(enc)
        truncated = sum(enc["truncated"])
        if task == "causal_lm":
            enc = enc.filter(lambda r: r["n_label_tokens"] > 0)
        dropped = total - len(enc)
        if len(enc) == 0:
            raise RecipeError(f"data.{name}: every example lost its answer to truncation at data.max_length="
                              f"{cfg.max_length}; raise max_length")
        enc = enc.remove_columns([c for c in ("truncated", "n_label_tokens") if c in enc.column_names])
        lengths = [len(x) for x in enc["input_ids"]]
        data.stats[name] = {"examples": len(enc), "truncated": truncated, "dropped": dropped,
                            "tokens": sum(lengths), "max_tokens": max(lengths)}
        if truncated:
            log.warning("data.%s: %d of %d examples were longer than max_length=%d and were truncated%s",
                        name, truncated, total, cfg.max_length,
                        f"; {dropped} lost every answer token and were dropped" if dropped else "")
        if name == "train":  # a stable example id, so augmentation can be seeded per example
            enc = enc.add_column("idx", list(range(len(enc))))
        data.splits[name] = enc.with_format(None)
    return data


# -------------------------------------------------------------------------------------------- batching
CAUSAL_WINDOW = 64
"""Batches per length-sorted window for causal LMs (as transformers' ``group_by_length``)."""
CLASSIFIER_WINDOW = 4
"""Batches per window for classifiers: on the fortunes data (MiniLM tokens, batch 16, 8 epochs) padding falls
from 55% of the computed tokens (shuffled) to 27%, and every batch still holds at least 3 of the 4 labels
(as when shuffled). Wider windows pad less but, where length correlates with the label, give batches of
fewer labels (8: 17%, some batches of 2 labels)."""


class LengthGroupedBatches:
    """Batches of similar length, so little compute goes to padding.

    Training: shuffle with (seed, epoch), sort within windows of ``window`` batches by length, shuffle the
    batches (like transformers' ``group_by_length``); ``window=0`` only shuffles. Evaluation: sorted longest
    first. Indices, not data, so Accelerate can shard it across processes.
    """

    def __init__(self, lengths: list[int], batch_size: int, shuffle: bool, seed: int = 0,
                 window: int = CAUSAL_WINDOW):
        self.lengths, self.batch_size, self.shuffle, self.seed = lengths, batch_size, shuffle, seed
        self.window = window
        self.epoch = 0

    @staticmethod
    def window_for(group_by_length: str | bool, causal: bool) -> int:
        """Batches per length-sorted window that ``data.group_by_length`` asks for; 0 = shuffle only.

        ``auto`` groups classifiers too, but within small windows: batches then still mix labels (length can
        correlate with the label, and single-class batches make training erratic) at half the padding.
        """
        if group_by_length == "auto":
            return CAUSAL_WINDOW if causal else CLASSIFIER_WINDOW
        return CAUSAL_WINDOW if group_by_length else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        if not self.shuffle:
            order.sort(key=lambda i: -self.lengths[i])
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        rng.shuffle(order)
        span = self.batch_size * max(self.window, 1)
        out = []
        for start in range(0, len(order), span):
            chunk = order[start : start + span]
            if self.window:
                chunk.sort(key=lambda i: -self.lengths[i])
            out += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(out)
        # The one short batch goes last: accelerate shards batches pairwise across processes and would
        # drop a short batch (and its partner) found in the middle.
        out.sort(key=lambda b: len(b) < self.batch_size)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


@dataclass
class Collator:
    """Pads a list of tokenized examples into a batch.

    Causal LM batches are padded on the left, with explicit position ids, so every answer ends at the
    right edge: ``logits_to_keep`` then asks the model for the logits of the last K positions only
    (those that carry loss), instead of a (batch × length × vocabulary) tensor.
    """

    pad_id: int
    causal: bool
    augment: Callable[[dict], dict] | None = None
    """Training only: an example → example transform (see ``craft.Augmenter``)."""

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        if self.augment:
            rows = [self.augment(r) for r in rows]
        width = max(len(r["input_ids"]) for r in rows)
        n = len(rows)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        if not self.causal:
            types = torch.zeros((n, width), dtype=torch.long)
            for i, r in enumerate(rows):
                k = len(r["input_ids"])
                ids[i, :k], mask[i, :k] = torch.tensor(r["input_ids"]), 1
                if "token_type_ids" in r:
                    types[i, :k] = torch.tensor(r["token_type_ids"])
            batch = {"input_ids": ids, "attention_mask": mask,
                     "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long)}
            if "token_type_ids" in rows[0]:
                batch["token_type_ids"] = types
            return batch
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
