"""Loading the base model and its tokenizer: source resolution, quantization, task heads, pad token.

(About 490 lines: every way a load can fail is turned into one line here, next to the load it guards; reading a
checkpoint tensor by tensor is in ``lazy_weights.py``, the examples and GGUF conversion in ``examples.py``.)
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.auto_factory import _get_model_class
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.utils import cached_file

from ..errors import LoraFtError, RecipeError, first_line
from ..recipe import ModelConfig, looks_local
from .chat_template import fit_embeddings, template_token_ids, use_chat_template
from .examples import convert_gguf, example_path, gguf_cache_dir
from .lazy_weights import as_if_from, read_tensor_by_tensor

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_source(name: str) -> str:
    """``example:X`` / ``*.gguf`` / folder / Hub id → something ``from_pretrained`` accepts."""
    if name.startswith("example:"):
        return str(example_path(name.removeprefix("example:")))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise RecipeError(f"model.name: GGUF file not found: {name}")
        return str(convert_gguf(path, gguf_cache_dir(path)))
    if path.exists():
        if not (path / "config.json").is_file():
            raise RecipeError(f"model.name: {name} has no config.json; point it at a model folder or .gguf file")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise RecipeError(f"model.name: {name} does not exist; give a local folder, a .gguf file or a Hub id")
    return name  # a Hub id: from_pretrained downloads (or reads the local HF cache)


def _cannot_load(source: str, err: Exception, revision: str | None = None) -> RecipeError:
    return _broken_source(source, revision) or RecipeError(
        f"model.name: cannot load '{source}' ({first_line(err)}); check the name, or the network and HF_HUB_OFFLINE "
        "for Hub ids")


READ_ERRORS = (OSError, ValueError, KeyError, SafetensorError)
"""What transformers and safetensors raise on a model folder's damaged file: a missing shard (OSError), JSON that
does not parse (``json.JSONDecodeError``, a ValueError; transformers rewraps config.json's as OSError), an index
without its ``weight_map`` (KeyError), a safetensors file cut short (``SafetensorError``)."""


def damaged_file(folder: str | Path) -> tuple[Path, str] | None:
    """The first file of a model or adapter folder that cannot be read, and what is wrong with it; None if none.

    Checks what another program wrote and an interrupted download or copy breaks: every ``*.json`` parses (config,
    tokenizer, index), every shard an index names exists, every ``*.safetensors`` header is whole and its tensors
    cover the file exactly (safetensors' own check: a file cut short fails it). Reads headers only, never weights.

    Args:
        folder: the folder to check (a local model, a Hub cache snapshot, an adapter, a merged model).
    """
    folder = Path(folder)
    for path in sorted(folder.glob("*.json")):
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            return path, f"is not valid JSON ({first_line(e)})"
        if path.name.endswith(".index.json"):
            shards = value.get("weight_map") if isinstance(value, dict) else None
            if not isinstance(shards, dict):
                return path, "has no weight_map"
            missing = sorted(s for s in set(shards.values()) if not (folder / s).is_file())
            if missing:
                return folder / missing[0], f"is missing ({path.name} names it)"
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except SafetensorError as e:
            return path, f"is cut short or corrupt ({first_line(e).removeprefix('Error while deserializing ')})"
        except OSError as e:  # a symlink into the Hub cache whose blob is gone
            return path, f"cannot be read ({e.strerror or first_line(e)})"
    return None


def check_folder(folder: str | Path, field: str, fix: str, error: type[LoraFtError] = RecipeError) -> None:
    """Raise ``error`` with one line naming the damaged file of ``folder`` (``damaged_file``), ``field`` (what
    names the folder: ``model.name``, a run's adapter) and ``fix``; nothing when every file reads."""
    found = damaged_file(folder)
    if found is not None:
        raise error(f"{field}: {found[0]} {found[1]}; {fix}")


def _refetch(path: Path) -> str:
    """How to get a damaged model file again: from the Hub, the repo's cache folder goes; else the folder's source."""
    repo = next((p for p in Path(path).parents if p.name.startswith("models--")), None)
    if repo is not None:  # deleting one snapshot file is not enough: its blob would be linked again
        return f"delete {repo} to download the model again"
    return "download or save the model again (an interrupted download or copy leaves such files)"


def _broken_source(source: str, revision: str | None = None) -> RecipeError | None:
    """After a load of ``source`` failed: the one-line error naming its damaged file, or None when every file
    reads (the failure was something else). A Hub id is checked in its local cache, never downloaded."""
    folder: Path | None = Path(source) if Path(source).is_dir() else None
    if folder is None and not looks_local(source):
        config = _weights_file(source, "config.json", revision, False)
        folder = Path(config).parent if config else None
    found = damaged_file(folder) if folder is not None else None
    if found is None:
        return None
    return RecipeError(f"model.name: {found[0]} {found[1]}; {_refetch(found[0])}")


@functools.cache
def _warn_once(source: str) -> None:
    log.warning("model.trust_remote_code is on: code from %s will run on this machine", source)


def _other_owner(source: str) -> str | None:
    """The owner of a local folder when it is not the current user (a run or model someone else made)."""
    try:
        uid = Path(source).stat().st_uid
    except OSError:
        return None
    if uid == os.getuid():
        return None
    try:
        import pwd  # optional: Unix only

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return f"uid {uid}"


def warn_remote_code(source: str) -> None:
    """Before a call that may run code shipped with ``source``: once per source and process, and every time when
    ``source`` is a folder someone else made (its code is theirs, not the model author's that was trusted)."""
    owner = _other_owner(source)
    if owner is None:
        _warn_once(source)
    else:
        log.warning("model.trust_remote_code is on: code from %s, a folder made by %s (not by you), will run on this "
                    "machine", source, owner)


def remote_code(trust: bool, source: str | Path) -> dict[str, Any]:
    """The ``trust_remote_code`` argument of every ``from_pretrained``/``from_config`` call for ``source`` (model,
    tokenizer, config, the planner's meta model, a run's adapter or merged folder), with the warning above."""
    if trust:
        warn_remote_code(str(source))
    return {"trust_remote_code": trust}


def position_limit(config) -> tuple[int | None, bool]:
    """(the longest sequence the model's positions cover, whether running past it fails).

    Learned absolute positions (BERT, GPT-2, OPT) are a table: a longer sequence indexes past it (a size mismatch
    or an IndexError after loading), so the limit is hard. Rotary positions (Llama, Qwen, Mistral, ...) are computed,
    so a longer sequence runs; ``max_position_embeddings`` is then the context the model was trained for (quality
    drops past it unless RoPE scaling extends it): a soft limit. RoBERTa-style models start positions after the
    padding index, which costs ``pad_token_id + 1`` entries of the table."""
    limit = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                  if isinstance(getattr(config, k, None), int)), None)
    if limit is None:
        return None, False
    rotary = any(getattr(config, k, None) for k in ("rope_parameters", "rope_theta", "rope_scaling")) \
        or getattr(config, "position_embedding_type", None) == "rotary"
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer",
                                              "data2vec-text"):
        limit -= (config.pad_token_id or 0) + 1
    return limit, not rotary


def max_length_problem(config, max_length: int, source: str) -> tuple[str | None, str | None]:
    """(error, warning) for ``data.max_length`` against the model's position limit (``position_limit``)."""
    limit, hard = position_limit(config)
    if limit is None or max_length <= limit:
        return None, None
    if hard:
        return (f"data.max_length {max_length} exceeds the {limit} positions of {source} (learned position embeddings "
                f"cannot go further): set data.max_length to at most {limit}"), None
    return None, (f"data.max_length {max_length} exceeds the {limit}-token context {source} was trained with (rotary "
                  "positions run past it, but quality usually drops)")


def check_max_length(config, max_length: int, source: str) -> None:
    """Raise (learned positions) or warn (rotary positions) when ``max_length`` exceeds the model's limit."""
    error, warning = max_length_problem(config, max_length, source)
    if error:
        raise RecipeError(error)
    if warning:
        log.warning(warning)


def load_tokenizer(source: str, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision, **remote_code(cfg.trust_remote_code, source))
    except READ_ERRORS as e:  # transformers reports missing repos/files (and offline mode) as OSError
        raise _cannot_load(source, e, cfg.revision) from None
    if cfg.chat_template is not None:
        use_chat_template(tok, cfg.chat_template, cfg.trust_remote_code)
    if tok.pad_token is None:
        # Reusing an existing token avoids resizing (and, when quantized, re-quantizing) the embeddings.
        # pad == eos is safe here because labels are built from our own masks, never from pad ids, so the
        # real EOS at the end of every answer keeps its loss.
        tok.pad_token = tok.unk_token or tok.eos_token
        if tok.pad_token is None:
            raise RecipeError(f"model.name: tokenizer of {source} has no pad, unk or eos token to pad with")
    return tok


AUTO_CLASSES = {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification,
                "embedding": AutoModel, "reward": AutoModelForSequenceClassification,
                "regression": AutoModelForSequenceClassification,
                "token_classification": AutoModelForTokenClassification}
"""``reward``: a decoder with a new one-label head (``score``), as TRL's ``RewardTrainer`` builds its model."""
LABEL_TASKS = ("sequence_classification", "regression", "token_classification")
"""Tasks whose new head has one output per label of the training data (regression: one, named by its column)."""
HEAD_TASKS = (*LABEL_TASKS, "reward")
"""Tasks whose head is new: created by the auto class, kept unquantized and trained in full with the adapter."""


def auto_class(task: str) -> type:
    """The transformers auto class of ``model.task`` (which head the model gets)."""
    return AUTO_CLASSES[task]


def load_config(source: str, cfg: ModelConfig):
    """The model's ``config.json`` (and nothing else) as transformers reads it."""
    try:
        return AutoConfig.from_pretrained(source, revision=cfg.revision, **remote_code(cfg.trust_remote_code, source))
    except READ_ERRORS as e:  # transformers reports missing repos/files (and offline mode) as OSError
        raise _cannot_load(source, e, cfg.revision) from None


def _weights_file(source: str, filename: str, revision: str | None, fetch: bool) -> str | None:
    """``filename`` of a local folder or Hub repo, through transformers' own file resolution; None if absent."""
    try:
        return cached_file(source, filename, revision=revision, local_files_only=not fetch,
                           _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError) as e:  # gated/private repo, bad revision: from_pretrained reports it properly
        log.debug("cannot resolve %s of %s: %s", filename, source, first_line(e))
        return None


def _checkpoint_keys(source: str, revision: str | None = None, fetch: bool = False) -> set[str] | None:
    """Tensor names stored in a checkpoint (read from the index or the safetensors header only), or None.

    ``source`` is a local folder or a Hub id. The small index file is always resolved; a single
    ``model.safetensors`` only when ``fetch`` (from_pretrained downloads it next anyway) or already cached,
    so predicting memory from the config (plan) never downloads weights.
    """
    index = _weights_file(source, "model.safetensors.index.json", revision, True)
    single = None if index else _weights_file(source, "model.safetensors", revision, fetch)
    try:
        if index:
            return set(json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"])
        if single:
            with safe_open(single, "pt") as f:
                return set(f.keys())
    except READ_ERRORS as e:
        raise _broken_source(str(Path(index or single).parent)) or e from None
    return None


def new_head_modules(config, task: str, source: str, revision: str | None = None,
                     fetch: bool = False, trust_remote_code: bool = False) -> tuple[list[str], list[str]]:
    """Modules the task model creates that the checkpoint lacks (e.g. BERT's ``classifier``).

    The checkpoint's tensor names come from its index or safetensors header (local folder or Hub id, see
    ``_checkpoint_keys``); without them, every module outside the backbone counts as new.

    Also returns the modules transformers keeps unquantized by default (output embeddings, tied weights),
    because passing our own skip list to bitsandbytes replaces that default. Built on the meta device, so
    nothing is allocated. These heads are freshly initialised: they must stay
    in full precision (bitsandbytes would quantize them and peft's ``modules_to_save`` then fails on the
    quantized copy) and they are trained and saved with the adapter.
    """
    with torch.device("meta"):
        model = auto_class(task).from_config(config, **remote_code(trust_remote_code, source))
    keep_full = get_keys_to_not_convert(model)
    if task not in HEAD_TASKS:
        return [], keep_full
    prefix = model.base_model_prefix
    stored = _checkpoint_keys(source, revision, fetch)
    heads = []
    for name, module in model.named_modules():
        # Every parameter below the module, not only its own: RoBERTa's `classifier` holds none itself (its
        # `dense` and `out_proj` do), and naming those two instead made peft wrap `classifier.dense` *and* the
        # `classifier` it adds for classifiers, nested wrappers whose adapter could not be loaded back (KeyError
        # in set_peft_model_state_dict, at the end of every RoBERTa/ELECTRA/XLM-R classification run).
        keys = [f"{name}.{p}" for p, _ in module.named_parameters()] if name else []
        if not keys:
            continue
        if stored is None:  # names unknown (.bin-only checkpoint): every module outside the backbone is new
            is_new = name.split(".")[0] != prefix
        else:
            is_new = not any(k in stored or k.removeprefix(prefix + ".") in stored for k in keys)
        if is_new:
            heads.append(name)
    # Keep the top-most names only ("classifier", not "classifier.dense" as well).
    top = [h for h in heads if not any(h.startswith(o + ".") for o in heads if o != h)]
    return top, keep_full


def _safetensors_files(source: str, revision: str | None = None) -> list[Path] | None:
    """The checkpoint's safetensors files (every shard its index names, or the single file); None when it has
    none, or one is missing (``from_pretrained`` then reports it its own way)."""
    index = _weights_file(source, "model.safetensors.index.json", revision, True)
    if index:
        try:
            names = sorted(set(json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"].values()))
        except READ_ERRORS:
            return None
        files = [Path(index).parent / n for n in names]
    else:
        single = _weights_file(source, "model.safetensors", revision, True)
        files = [Path(single)] if single else []
    return files if files and all(f.is_file() for f in files) else None


def quantization_config(cfg: ModelConfig, compute: torch.dtype, skip: list[str]) -> BitsAndBytesConfig | None:
    if cfg.quant == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RecipeError(f"model.quant {cfg.quant} needs bitsandbytes: pip install bitsandbytes "
                          "(or set model.quant: none)") from None
    except Exception as e:  # noqa: BLE001 - a build for another device can fail on import in many ways
        raise _bnb_unsupported(cfg.quant, e) from None
    if cfg.quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=cfg.double_quant,
        # Stored in the compute dtype so FSDP can flatten quantized and plain parameters together.
        bnb_4bit_quant_storage=compute if compute != torch.float32 else torch.uint8,
        llm_int8_skip_modules=skip,
    )


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    head_modules: list[str]
    compute_dtype: torch.dtype
    weight_files: list[Path] | None = None
    """The checkpoint's safetensors files, resolved for a quantized load (what ``lora.init: loftq`` reads)."""
    token_rows: list[int] = field(default_factory=list)
    """Token ids whose embedding rows train with the adapter (``model.chat_template``'s special tokens)."""


def _configure_head(config, task: str, id2label: dict[int, str] | None, tokenizer: PreTrainedTokenizerBase) -> None:
    """The model config for ``task``'s head: one output per label (``LABEL_TASKS``; regression: one, named by its
    column), or the reward model's one scalar; the pad token the batches are padded with."""
    if task in LABEL_TASKS:
        if not id2label:
            raise RecipeError(f"{task} needs labels; none were found in the training data")
        config.num_labels = len(id2label)
        config.id2label = {int(i): str(n) for i, n in id2label.items()}
        config.label2id = {str(n): int(i) for i, n in id2label.items()}
        if task == "regression":
            config.problem_type = "regression"
    elif task == "reward":  # one scalar per sequence: what AutoModelForSequenceClassification(num_labels=1) is
        config.num_labels, config.id2label, config.label2id = 1, {0: "reward"}, {"reward": 0}
        # The head reads each sequence's last token that is not the config's pad token: batches are padded with
        # the tokenizer's, so the two must agree (the merged folder keeps it).
        config.pad_token_id = tokenizer.pad_token_id
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id


def load_model(
    cfg: ModelConfig,
    compute_dtype: str,
    device: torch.device | str = "cpu",
    id2label: dict[int, str] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> LoadedModel:
    """Load the base model for ``cfg.task``, quantized as asked, on ``device``."""
    source = resolve_source(cfg.name)
    tokenizer = tokenizer or load_tokenizer(source, cfg)
    config = load_config(source, cfg)
    kwargs = dict(revision=cfg.revision, **remote_code(cfg.trust_remote_code, source))
    _configure_head(config, cfg.task, id2label, tokenizer)
    # fetch: the weights file is resolved here, then found in the cache by from_pretrained (no second download).
    heads, keep_full = new_head_modules(config, cfg.task, source, cfg.revision, fetch=True,
                                        trust_remote_code=cfg.trust_remote_code)
    compute = DTYPES[compute_dtype]
    quant = quantization_config(cfg, compute, sorted(set(heads) | set(keep_full)))
    # Quantized layers compute in `compute`; unquantized models load in fp32 and use autocast for speed,
    # because LoRA weights and optimizer state should stay fp32 either way.
    dtype = compute if quant is not None else torch.float32
    device_map = {"": device} if quant is not None else None
    # Quantized: the checkpoint is read tensor by tensor (see lazy_weights.py), not mapped whole.
    # transformers takes a state dict only instead of the folder (the config says what to build).
    files = _safetensors_files(source, cfg.revision) if quant is not None else None
    lazy = read_tensor_by_tensor(files) if files and not cfg.trust_remote_code else None
    try:
        # (the auto classes need a folder to look for remote code in: the concrete class is asked directly)
        cls = _get_model_class(config, auto_class(cfg.task)._model_mapping) if lazy else auto_class(cfg.task)
        model = cls.from_pretrained(
            None if lazy else source, config=config, dtype=dtype, quantization_config=quant, device_map=device_map,
            **({"state_dict": lazy} if lazy else {}), **kwargs
        )
        if lazy:
            as_if_from(model, source, cfg.revision)
    except Exception as e:
        if quant is not None and _from_bitsandbytes(e):
            raise _bnb_unsupported(cfg.quant, e) from None
        broken = _broken_source(source, cfg.revision) if isinstance(e, READ_ERRORS) else None
        if broken is not None:
            raise broken from None
        raise
    if quant is None:
        model.to(device)
    else:
        _keep_cpu_weights_trainable(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    rows = []
    if cfg.chat_template is not None:
        fit_embeddings(model, tokenizer)
        rows = template_token_ids(tokenizer)
    return LoadedModel(model, tokenizer, source, heads, compute, files, rows)


def _bnb_unsupported(quant: str, err: Exception) -> RecipeError:
    return RecipeError(f"model.quant {quant}: bitsandbytes cannot run here ({first_line(err)}); install a "
                       "bitsandbytes build for this device, or set model.quant: none")


def _from_bitsandbytes(err: BaseException) -> bool:
    """Whether an error was raised inside bitsandbytes, or by transformers about it: its environment checks, or
    the weight conversions of a quantized load (transformers collects their errors and raises its own)."""
    tb = err.__traceback__
    while tb is not None:
        if f"{os.sep}bitsandbytes{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return "bitsandbytes" in str(err) or "automatic conversion of the weights" in str(err)


def _keep_cpu_weights_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from re-packing 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit.forward`` re-packs the weight in place the first
    time it runs in eval mode without gradients (lora_ft's evaluation before training), and its backward does not
    understand that layout: measured on a tiny NF4 Llama, the LoRA gradients after one evaluation differed from
    the correct ones by up to 2.3 (the loss itself stayed right), and the stored weights no longer matched the
    checkpoint. The flag is per layer instance; on other CPUs and on GPUs it is already off.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def is_quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
