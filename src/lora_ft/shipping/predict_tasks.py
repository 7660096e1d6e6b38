"""``lora-ft predict`` for the encoder tasks beyond single-label classification: tags, several labels, scores.

Which task a model serves is read from its config, as a plain ``transformers`` load sees it: a
``*ForTokenClassification`` architecture tags words; ``problem_type: multi_label_classification`` gives every label
whose probability reaches its threshold (``label_thresholds``, chosen on validation; 0.5 where none is saved);
``problem_type: regression`` gives the score. The adapter model gets the same fields from its run
(``Objective.configure``), so adapter and merged model predict alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..data.cells import Where, as_list, check_columns, text_problem, words_problem
from ..errors import DataError, UsageError
from ..objectives.token_classification import split_words


def task_kind(config: Any, model: torch.nn.Module | None = None) -> str | None:
    """``tokens``, ``multilabel`` or ``regression`` for a model config (and the model, whose class says more than
    an adapter model's config: that is the base checkpoint's); None for single-label classification."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = [type(base).__name__] if base is not None else getattr(config, "architectures", None) or []
    if any(a.endswith("ForTokenClassification") for a in names):
        return "tokens"
    return {"multi_label_classification": "multilabel", "regression": "regression"}.get(
        getattr(config, "problem_type", None))


def entities(words: list[str], tags: list[str], offsets: list[tuple[int, int]] | None,
             text: str | None) -> list[dict[str, Any]]:
    """IOB2 ``tags`` of ``words`` as entity spans: label, the words ``[first, last]`` (inclusive), their text, and
    with ``offsets`` the character ``start``/``end`` in ``text``. An ``I-`` tag that does not continue an entity
    of its label starts one (seqeval's default reading)."""
    found: list[dict[str, Any]] = []
    for i, tag in enumerate(tags):
        kind, label = (tag[:2], tag[2:]) if tag[:2] in ("B-", "I-") else ("O", "")
        last = found[-1] if found else None
        if kind == "I-" and last is not None and last["label"] == label and last["last_word"] == i - 1:
            last["last_word"] = i
        elif kind in ("B-", "I-"):
            found.append({"label": label, "first_word": i, "last_word": i})
    for e in found:
        a, b = e["first_word"], e["last_word"]
        if offsets is not None and text is not None:
            e.update(start=offsets[a][0], end=offsets[b][1], text=text[offsets[a][0]:offsets[b][1]])
        else:
            e["text"] = " ".join(words[a:b + 1])
    return found


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def tag_rows(im, rows: list[dict[str, Any]], tokens_column: str) -> Iterator[dict[str, Any]]:
    """Each row with ``words``, ``tags`` (one per word, read at its first sub-word) and ``entities``."""
    id2label = {int(k): v for k, v in im.model.config.id2label.items()}
    inputs = []
    for row in rows:
        if tokens_column in row and row[tokens_column] is not None:
            inputs.append(([str(w) for w in as_list(row[tokens_column])], None, None))
        else:
            text = str(row[im.text_column])
            inputs.append((*split_words(text), text))
    enc = im.tokenizer([w for w, _, _ in inputs], is_split_into_words=True, padding=True, truncation=True,
                       max_length=im.max_length, return_tensors="pt")
    logits = im.model(**{k: v.to(_device(im.model)) for k, v in enc.items()}).logits.float().cpu()
    for i, (row, (words, offsets, text)) in enumerate(zip(rows, inputs, strict=True)):
        tags, seen = ["O"] * len(words), set()
        for position, w in enumerate(enc.word_ids(i)):
            if w is not None and w not in seen:
                seen.add(w)
                tags[w] = id2label[int(logits[i, position].argmax())]
        # Words past max_length were not seen by the model: they keep "O" and are counted.
        yield {**row, "words": words, "tags": tags, "entities": entities(words, tags, offsets, text),
               "unscored_words": len(words) - len(seen)}


def sequence_rows(im, rows: list[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
    """Each row with ``labels`` and ``probabilities`` (multi-label) or ``prediction``, the score (regression)."""
    columns = [c for c in (im.text_column, im.text_pair_column) if c]
    enc = im.tokenizer(*[[str(r[c]) for r in rows] for c in columns], padding=True, truncation=True,
                       max_length=im.max_length, return_tensors="pt")
    logits = im.model(**{k: v.to(_device(im.model)) for k, v in enc.items()}).logits.float().cpu()
    if kind == "regression":
        for row, score in zip(rows, logits[:, 0].tolist(), strict=True):
            yield {**row, "prediction": score}
        return
    config = im.model.config
    names = [config.id2label[j] for j in sorted(config.id2label, key=int)]
    saved = getattr(config, "label_thresholds", None) or {}
    cut = torch.tensor([float(saved.get(n, 0.5)) for n in names])
    probs = logits.sigmoid()
    for row, p in zip(rows, probs, strict=True):
        yield {**row, "labels": [n for n, on in zip(names, (p >= cut).tolist(), strict=True) if on],
               "probabilities": {n: round(float(x), 6) for n, x in zip(names, p, strict=True)}}


def check_task_columns(ds, kind: str, im, data_file: str, tokens_column: str) -> None:
    """The columns ``predict`` reads for ``kind``: each row's words or text for tags, the text column(s) otherwise."""
    where = Where("--data", data_file)
    if kind == "tokens" and tokens_column in ds.column_names:  # per row: its words, else its text
        texts = ds[im.text_column] if im.text_column in ds.column_names else [None] * len(ds)
        for i, (words, text) in enumerate(zip(ds[tokens_column], texts, strict=True)):
            column, problem = (tokens_column, words_problem(words)) if words is not None else \
                (im.text_column, text_problem(text) if text is not None else "is missing, and so are the words")
            if problem:
                raise DataError(f"{where.cell(i, column)} {problem}")
        return
    if kind == "tokens":
        need = [im.text_column]
    else:
        need = [c for c in (im.text_column, im.text_pair_column) if c]
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise UsageError(f"--data {data_file}: column(s) {missing} not found; columns present: {ds.column_names}"
                         + (f" (or give words in '{tokens_column}')" if kind == "tokens" else ""))
    check_columns(ds, {c: "text" for c in need}, where)


@torch.no_grad()
def predict_rows(im, ds, kind: str, batch_size: int, tokens_column: str) -> Iterator[dict[str, Any]]:
    """Every row of ``ds`` with the model's prediction for ``kind`` added, in order."""
    for start in range(0, len(ds), batch_size):
        rows = ds.select(range(start, min(start + batch_size, len(ds)))).to_list()
        yield from tag_rows(im, rows, tokens_column) if kind == "tokens" else sequence_rows(im, rows, kind)
