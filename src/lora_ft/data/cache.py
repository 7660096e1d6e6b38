"""One cache for the data preparation: each split's tokenized examples, their statistics and the cell checks, kept
on disk under a key of everything they depend on, so that the next run, a resume, a sweep's trials, the planner,
``inspect`` and ``validate`` reuse them.

Where: ``$LORA_FT_DATA_CACHE``, else ``$LORA_FT_HOME/data``, else ``~/.cache/lora_ft/data``. One folder per entry,
named by its key:

- a *prepared* entry (``<key>/``): the split's tokenized examples as the Arrow files the tokenizing ``map`` wrote
  (one per worker, read back memory-mapped: nothing is copied), and ``meta.json`` with their sizes and the split's
  statistics. Key: the file's content (SHA-256; a Hub dataset: its id, split and datasets' fingerprint), which rows
  of it (``validation_split`` and its seed, ``max_eval_examples``), the tokenizer (its serialized vocabulary and
  rules, special tokens, chat template), the data format, the objective (its class, data settings, label set and
  the source of the code that tokenizes), and this module's ``VERSION``;
- a *checked* marker (``checked/<key>.json``): the file's cells passed the objective's checks. Key: the file's
  content, the objective's class, the format and the columns it reads (no tokenizer: ``validate`` has none).

A changed key is a new entry. An entry that does not read back whole (a file missing or of another size, a
``meta.json`` that is not this key's, Arrow that does not load) is logged, deleted and rebuilt, never used. An
entry is written into a temporary folder and renamed into place, so a kill leaves either no entry or a whole one.
Nothing is ever evicted: ``rm -rf`` the folder to reclaim the space (the log names it when an entry is written).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from ..errors import first_line
from . import cells, chat, prepare

log = logging.getLogger(__name__)

VERSION = 1
"""Bumped when what an entry holds changes shape."""
ENV = "LORA_FT_DATA_CACHE"


def cache_root() -> Path:
    """The cache folder (see the module docstring)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    home = os.environ.get("LORA_FT_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "lora_ft") / "data"


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def file_identity(spec: str, ds: datasets.Dataset, local: bool) -> dict[str, Any]:
    """What a split's source is, by content: a local file's size and SHA-256, a Hub dataset's id and fingerprint.

    Args:
        spec: the file or Hub id the recipe names.
        ds: the split as read (its fingerprint identifies a Hub dataset's version).
        local: ``spec`` is a local file.
    """
    if not local:
        return {"hub": spec, "fingerprint": ds._fingerprint}
    path = Path(spec).expanduser()
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def tokenizer_identity(tok) -> str:
    """The tokenizer as it tokenizes: its serialized rules and vocabulary (fast tokenizers), special tokens, padding
    side and chat template; not where its files are."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # A call with truncation/padding leaves them set on the backend until the next call: per-call state, not a
        # rule (a classifier's tokenizer serialized differently after its first split, and no key ever matched).
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        rules = json.dumps(state, sort_keys=True)
    else:
        rules = json.dumps(tok.get_vocab(), sort_keys=True)
    return digest({"class": type(tok).__name__, "rules": hashlib.sha256(rules.encode()).hexdigest(),
                   "special": [str(t) for t in tok.all_special_tokens], "pad": tok.pad_token_id,
                   "eos": tok.eos_token_id, "bos": tok.bos_token_id, "side": tok.padding_side,
                   "template": tok.chat_template, "bos_added": getattr(tok, "add_bos_token", None),
                   "eos_added": getattr(tok, "add_eos_token", None)})


def code_identity(objective) -> str:
    """The source of the code that checks and tokenizes (this package's modules and the objective's), so that a
    changed rule never serves examples tokenized by the old one."""
    sources = [inspect.getsourcefile(m) for m in (cells, chat, prepare)]
    sources += sorted({inspect.getsourcefile(c) for c in type(objective).__mro__ if c.__module__.startswith("lora_ft")})
    h = hashlib.sha256()
    for source in sources:
        h.update(Path(source).read_bytes())
    return h.hexdigest()[:32]


# ------------------------------------------------------------------------------------------- checked markers
def checked_path(key: str) -> Path:
    return cache_root() / "checked" / f"{key}.json"


def was_checked(key: str) -> bool:
    """Whether this file's cells already passed these checks."""
    return checked_path(key).is_file()


def mark_checked(key: str, facts: dict[str, Any]) -> None:
    """Remember that a file's cells passed (best effort: a cache that cannot be written only costs time)."""
    path = checked_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(facts), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write the data cache %s (%s); the next run checks the file again", path, e.strerror)


# ------------------------------------------------------------------------------------------ prepared entries
def entry_path(key: str) -> Path:
    return cache_root() / key


def load_entry(key: str) -> tuple[datasets.Dataset, dict[str, Any]] | None:
    """The prepared split and its ``meta.json`` facts, or None (absent; or damaged: then logged and deleted)."""
    folder = entry_path(key)
    if not folder.is_dir():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("key") != key or meta.get("version") != VERSION:
            raise ValueError("its meta.json belongs to another entry")
        for name, size in meta["files"].items():
            actual = (folder / name).stat().st_size
            if actual != size:
                raise ValueError(f"{name} holds {actual} bytes, {size} were written")
        parts = [datasets.Dataset.from_file(str(folder / name)) for name in sorted(meta["files"])]
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if len(ds) != meta["rows"]:
            raise ValueError(f"{len(ds)} rows read back, {meta['rows']} were written")
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
        log.warning("the data cache %s is damaged (%s); preparing the split again", folder, first_line(e))
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return ds, meta


def write_entry(key: str, build, facts: dict[str, Any]) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Build a split into a temporary folder beside the entry and commit it by renaming; returns it read back.

    Args:
        key: the entry's key.
        build: ``build(folder) -> (dataset, stats)``: writes the split's Arrow files into ``folder`` (the tokenizing
            ``map``'s ``cache_file_name``) and returns the dataset and its statistics.
        facts: what the key was made of, kept in ``meta.json`` for people reading the folder.
    """
    folder = entry_path(key)
    tmp = folder.with_name(f".{key}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        ds, stats = build(tmp)
        files = {f.name: f.stat().st_size for f in tmp.iterdir() if f.suffix == ".arrow"}
        meta = {"key": key, "version": VERSION, "rows": len(ds), "files": files, "stats": stats, "made_of": facts}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
        _commit(tmp, key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared data cached in %s (reused while the file, tokenizer and data settings stay the same)", folder)
    loaded = load_entry(key)
    if loaded is None:  # written and damaged at once: a disk problem, reported by load_entry; still usable now
        raise OSError(f"the data cache {folder} could not be read back")
    return loaded


def _commit(tmp: Path, key: str) -> None:
    """Rename the written entry into place; where another process (a rank of the same run, a sweep's parallel
    trial) committed the same key first, keep its entry and drop ours: the two hold the same examples."""
    folder = entry_path(key)
    if folder.is_dir() and load_entry(key) is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        tmp.rename(folder)  # the commit point
    except OSError:  # committed by another process between the check and the rename
        if load_entry(key) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
