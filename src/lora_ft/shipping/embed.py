"""``lora-ft predict`` on an embedding run: each row's embedding, or each pair's similarity and the file's retrieval
metrics.

A file with the run's anchor and positive columns (its data format) gets, per row, ``similarity`` (the cosine of
the pair's embeddings) and, in the summary, the retrieval metrics lora_ft evaluates with (every anchor ranked
against all the file's positives: ``recall@k``, ``mrr``). Any other file needs the text column
(``data.text_column``, default ``text``) and gets each text's ``embedding``, as the model's own pooling makes it
(what ``SentenceTransformer.encode`` returns for the merged folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

import torch
from transformers import PreTrainedTokenizerBase

from ..data.cells import Where, check_columns
from ..data.reading import read_split
from ..errors import UsageError
from ..modeling.pooling import Pooling, pool
from ..objectives.embedding import Embedding
from ..recipe import DataConfig


@torch.no_grad()
def embed_texts(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pooling: Pooling, texts: list[str],
                max_length: int | None, batch_size: int = 32) -> torch.Tensor:
    """The embeddings of ``texts`` (fp32, on the CPU), in batches of ``batch_size``."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        out.append(pool(model(**enc).last_hidden_state.float(), enc["attention_mask"], pooling).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def predict_embeddings(im, data_file: str, out: str | Path, batch_size: int = 32) -> dict[str, Any]:
    """``predict_file`` for an embedding model (``im``: an ``infer.InferenceModel`` with its ``pooling``).

    Args:
        im: the loaded model, tokenizer and the run's column names.
        data_file: pairs in the run's columns, or texts in its text column.
        out: the jsonl written, row by row as read, with ``similarity`` or ``embedding`` added.
        batch_size: texts per forward pass.
    """
    ds = read_split(data_file, "predict", "--data")
    cfg = im.data or DataConfig()
    pairs = cfg.anchor_column in ds.column_names and cfg.positive_column in ds.column_names
    need = [cfg.anchor_column, cfg.positive_column] if pairs else [im.text_column]
    if not pairs and im.text_column not in ds.column_names:
        raise UsageError(f"--data {data_file}: give pairs in columns '{cfg.anchor_column}' and "
                         f"'{cfg.positive_column}', or texts in column '{im.text_column}'; columns present: "
                         f"{ds.column_names}")
    check_columns(ds, {c: "text" for c in need}, Where("--data", data_file))
    vectors = [embed_texts(im.model, im.tokenizer, im.pooling, [str(t) for t in ds[c]], im.max_length, batch_size)
               for c in need]
    summary: dict[str, Any] = {"examples": len(ds), "predictions": str(out)}
    if pairs:
        sims = torch.nn.functional.cosine_similarity(vectors[0], vectors[1]).tolist()
        extra = [{"similarity": round(s, 6)} for s in sims]
        metrics = Embedding(cfg, im.tokenizer).summarize({"anchor": vectors[0], "positive": vectors[1]})
        summary |= {k: v for k, v in metrics.items() if k != "examples"}
    else:
        extra = [{"embedding": [round(x, 6) for x in v]} for v in vectors[0].tolist()]
    _write(out, (row | e for row, e in zip(ds, extra, strict=True)))
    return summary


def _write(out: str | Path, rows) -> None:
    """Rows as jsonl, renamed into place at the end: never a half-written file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            _lines(f, rows)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _lines(f: IO[str], rows) -> None:
    for row in rows:
        f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
