"""Sentence embeddings the way the model's own sentence-transformers configuration makes them.

A sentence-transformers model folder describes its pipeline in ``modules.json`` (Transformer → Pooling →
optionally Normalize) and its pooling in ``1_Pooling/config.json`` (``pooling_mode_mean_tokens: true`` and its
siblings, or ``pooling_mode: "mean"`` in sentence-transformers ≥ 6). ``read_pooling`` reads both, so an
embedding run trains the embedding the model is used with (all-MiniLM-L6-v2: mean pooling, then L2
normalisation); a plain encoder without them gets what ``SentenceTransformer`` itself builds for one: mean pooling,
no normalisation. ``pool`` computes that embedding from the encoder's token states exactly as the library's
``Pooling`` module does, and ``write_sentence_transformers_files`` describes it in a merged model folder so that
``SentenceTransformer(folder)`` rebuilds the same pipeline. The files are written in the classic layout that
every sentence-transformers release since 2.0 reads (``sentence_transformers.models.*`` module names, the
``pooling_mode_*_tokens`` keys), not 6.x's renamed one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import cached_file

from ..errors import RecipeError, first_line

log = logging.getLogger(__name__)

MODES = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
         "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens", "lasttoken": "pooling_mode_lasttoken"}
"""The pooling modes supported (sentence-transformers' names) → their classic config keys."""
KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")
"""The modules of a pipeline lora_ft can train and rebuild; a Dense projection or a CLIP model is refused."""


@dataclass(frozen=True)
class Pooling:
    """How token states become one sentence embedding.

    Args:
        mode: one of ``MODES``.
        normalize: L2-normalise the pooled vector (a ``Normalize`` module follows the pooling).
        source: where it was read from, for the log ("default" for a model without sentence-transformers files).
    """

    mode: str = "mean"
    normalize: bool = False
    source: str = "default"


def _file(source: str, name: str, revision: str | None) -> Path | None:
    """``name`` of a local folder or Hub repo (None if the model has none), resolved as transformers does."""
    try:
        path = cached_file(source, name, revision=revision, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError) as e:  # gated repo, bad revision: the model load reports it properly
        log.debug("cannot resolve %s of %s: %s", name, source, first_line(e))
        return None
    return Path(path) if path else None


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecipeError(f"model.name: {path} is not readable JSON ({first_line(e)}); restore the model's "
                          "sentence-transformers files or download the model again") from None


def _mode(config: dict, where: Path) -> str:
    """The one pooling mode of a ``1_Pooling/config.json`` (either layout)."""
    if isinstance(config.get("pooling_mode"), str):
        modes = [config["pooling_mode"]]
    else:
        legacy = {key: mode for mode, key in MODES.items()} | {"pooling_mode_weightedmean_tokens": "weightedmean"}
        modes = [legacy.get(k, k) for k, on in config.items() if k.startswith("pooling_mode_") and on is True]
    if len(modes) != 1 or modes[0] not in MODES:
        raise RecipeError(f"model.name: {where} pools by {modes or 'nothing'}; lora_ft trains exactly one of "
                          f"{', '.join(MODES)} (a model that concatenates several poolings is not supported)")
    return modes[0]


def read_pooling(source: str, revision: str | None = None) -> Pooling:
    """The pooling of the model at ``source`` (a folder or Hub id) from its ``modules.json``; ``Pooling()`` (mean,
    not normalised, as ``SentenceTransformer`` builds for a plain encoder) when it has none."""
    modules_file = _file(source, "modules.json", revision)
    if modules_file is None:
        log.info("%s has no sentence-transformers modules.json: mean pooling without normalisation", source)
        return Pooling()
    modules = _json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise RecipeError(f"model.name: {modules_file} is not a list of modules with a 'type' each")
    kinds = [str(m["type"]).rsplit(".", 1)[-1] for m in modules]
    unknown = [k for k in kinds if k not in KNOWN_MODULES]
    if unknown or kinds[:2] != ["Transformer", "Pooling"]:
        raise RecipeError(f"model.name: {modules_file} lists modules {kinds}; lora_ft trains the pipeline "
                          "Transformer → Pooling (→ Normalize) only")
    pooling_dir = next(m.get("path", "") for m in modules if str(m["type"]).endswith("Pooling"))
    config_file = _file(source, f"{pooling_dir}/config.json" if pooling_dir else "config.json", revision)
    if config_file is None:
        raise RecipeError(f"model.name: {source} lists a Pooling module in modules.json but has no "
                          f"{pooling_dir}/config.json")
    config = _json(config_file)
    if not isinstance(config, dict):
        raise RecipeError(f"model.name: {config_file} is not a JSON object")
    pooling = Pooling(_mode(config, config_file), "Normalize" in kinds, str(modules_file.parent))
    log.info("pooling read from %s: %s%s", pooling.source, pooling.mode, ", normalised" if pooling.normalize else "")
    return pooling


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """One embedding per row of right-padded token states ``hidden`` [batch, tokens, dim] under ``mask``
    [batch, tokens], computed as sentence-transformers' ``Pooling`` (and ``Normalize``) modules do."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling.mode == "cls":
        out = hidden[:, 0]
    elif pooling.mode == "max":
        out = hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
    elif pooling.mode == "lasttoken":
        last = (mask.sum(1) - 1).clamp(min=0)
        out = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    else:
        total = (hidden * m).sum(1, dtype=torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16)
                                 else hidden.dtype)
        count = m.sum(1, dtype=total.dtype).clamp(min=1e-9)
        out = (total / (count if pooling.mode == "mean" else count.sqrt())).to(hidden.dtype)
    # sentence-transformers' Normalize is F.normalize(p=2, dim=1), eps 1e-12.
    return torch.nn.functional.normalize(out, p=2, dim=1) if pooling.normalize else out


def write_sentence_transformers_files(folder: Path, pooling: Pooling, dimension: int, max_length: int) -> None:
    """The files that make ``SentenceTransformer(folder)`` rebuild ``pooling`` on the model saved in ``folder``.

    Args:
        folder: a saved transformers model folder (config, weights, tokenizer).
        pooling: the pooling the model was trained and evaluated with.
        dimension: the encoder's hidden size (the pooled embedding's).
        max_length: the longest input it was trained on (``data.max_length``): sentence-transformers truncates there.
    """
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    config = {"word_embedding_dimension": dimension} | {key: mode == pooling.mode for mode, key in MODES.items()}
    files = {"modules.json": modules, "1_Pooling/config.json": config,
             "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False},
             "config_sentence_transformers.json": {"similarity_fn_name": "cosine"}}
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
