"""Reading a recipe: YAML → overrides (``--set``) → paths relative to the recipe → schema, every problem at once.

A recipe's problems are collected by pydantic and reported in one ``RecipeError`` line, each with its dotted
location and, for unknown keys, a did-you-mean; a key given twice in one mapping is listed with them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import RecipeError, did_you_mean
from .schema import SECTIONS, Recipe

PATH_FIELDS = {"data": ("train", "validation", "test"), "forgetting": ("reference",), "lora": ("init_from",)}
"""Recipe fields that name data files (or Hub dataset ids), and the run or adapter folder training starts from."""
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
FILE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".txt", ".tsv", ".xlsx", ".xls", ".arrow", ".gz", ".zip",
                 ".bz2", ".xz", ".zst", ".yaml", ".yml", ".md", ".gguf"}
"""Suffixes that make a name a file, never a Hub id (ids such as ``teknium/OpenHermes-2.5`` have dots)."""


def looks_local(name: str) -> bool:
    """Whether a model or data name is a local path by its form alone (``./``, ``../``, ``/``, ``~``, more than one
    ``/``, or a file suffix) rather than a Hub id (``owner/name`` or ``name``)."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or Path(name).suffix.lower() in FILE_SUFFIXES)


def _section_at(path: list[str]) -> type[BaseModel] | None:
    """The schema class at a dotted location (``["data", "augment"]`` → AugmentConfig)."""
    model: type[BaseModel] = Recipe
    for key in path:
        field = model.model_fields.get(key)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _format_error(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc) or "recipe"
    if err["type"] == "extra_forbidden":
        parent = _section_at(loc[:-1])
        hint = did_you_mean(loc[-1], list(parent.model_fields)) if parent else ""
        return f"{where}: unknown key{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith(where + "."):  # a section's rule that names its own field ("lora.init: ...")
        return msg
    if err["type"] != "value_error" and "input" in err and not isinstance(err["input"], dict):
        msg += f" (got {err['input']!r})"
    return f"{where}: {msg}"


def _repeated_keys(node: yaml.Node, where: str = "", seen: set[int] | None = None) -> list[str]:
    """Keys a mapping of the composed YAML gives more than once, each as one problem naming the key and its lines.

    YAML loaders keep the last value silently; a recipe with ``lora:`` (or ``r:`` in one section) twice is a paste
    accident, not a choice. Read from the node tree (not a SafeLoader that raises) so the repeats are listed with
    the recipe's other problems and each one's dotted place is known. A merge key (``<<: *base``) is not a repeat:
    overriding merged keys is what it is for. ``seen`` stops at a node already walked (aliases can make cycles).

    Args:
        node: a composed node (``yaml.SafeLoader.get_single_node``).
        where: the dotted place of ``node`` ("" at the top).
        seen: ids of the nodes already walked.
    """
    seen = set() if seen is None else seen
    if id(node) in seen:
        return []
    seen.add(id(node))
    problems: list[str] = []
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _repeated_keys(item, f"{where}[{i}]", seen)
    if not isinstance(node, yaml.MappingNode):
        return problems
    lines: dict[str, list[int]] = {}
    inner: list[str] = []
    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
            dotted = f"{where}.{key.value}" if where else key.value
            lines.setdefault(dotted, []).append(key.start_mark.line + 1)
            inner += _repeated_keys(value, dotted, seen)
    for dotted, at in lines.items():
        if len(at) > 1:
            times = "twice" if len(at) == 2 else f"{len(at)} times"
            listed = ", ".join(map(str, at[:-1])) + f" and {at[-1]}"
            problems.append(f"{dotted}: given {times} (lines {listed}); YAML would keep the last silently, so remove "
                            "all but one")
    return problems + inner


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {dotted}: '{k}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.lr=1e-4"]`` → ``[("train.lr", 0.0001)]``; values are parsed as YAML scalars/lists."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set '{item}': write it as section.key=value, e.g. --set train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string; on a command line it is a number
        parsed.append((key.strip(), value))
    return parsed


def _local(value: str, base: Path) -> str:
    """A relative local path made absolute against ``base`` (``~`` expanded)."""
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _resolve_paths(tree: dict[str, Any], base: Path) -> None:
    """Relative paths in a recipe are relative to the recipe's folder, whether written in the file or given with
    ``--set`` (so a recipe runs from anywhere, and both spellings mean the same file). A name that is not a path
    by its form (``owner/name``) is resolved only when it exists there; otherwise it stays a Hub id."""
    for section, keys in PATH_FIELDS.items():
        values = tree.get(section)
        for key in keys if isinstance(values, dict) else ():
            value = values.get(key)
            if isinstance(value, str) and value.strip() and (looks_local(value) or (base / value).exists()):
                values[key] = _local(value, base)
    model = tree.get("model")
    name = model.get("name") if isinstance(model, dict) else None
    if isinstance(name, str) and not name.startswith("example:") and (looks_local(name) or (base / name).exists()):
        model["name"] = _local(name, base)
    if isinstance(tree.get("output_dir"), str):  # relative to the current directory, as a command's output is
        tree["output_dir"] = str(Path(tree["output_dir"]).expanduser()) if tree["output_dir"].strip() else ""


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raise one ``RecipeError`` listing every problem."""
    try:
        return _load_recipe(path, overrides)
    except RecursionError:  # yaml and pydantic recurse per nesting level: "[[[[...]]]]" would escape as-is
        raise RecipeError(f"{path or 'recipe'}: nested too deeply to be a recipe (sections hold keys and "
                          "values, a few levels deep)") from None


def _load_recipe(path: str | Path | None, overrides: list[str] | None) -> Recipe:
    tree: dict[str, Any] = {}
    repeated: list[str] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
            try:
                node = loader.get_single_node()
                repeated = _repeated_keys(node) if node is not None else []
                loaded = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise RecipeError(f"{path}: malformed YAML{where}: {problem}") from None
        except UnicodeDecodeError:
            raise RecipeError(f"{path}: not a UTF-8 text file") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of sections (model, lora, data, train)")
        tree = loaded
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    _resolve_paths(tree, path.parent if path is not None else Path.cwd())
    for section in SECTIONS:
        if section in tree and not isinstance(tree[section], dict):
            raise RecipeError(f"{section}: must be a mapping of keys, got {tree[section]!r}")
    lines = list(repeated)
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as e:
        lines += [_format_error(err) for err in e.errors()]
    if lines:
        source = str(path) if path else "recipe"
        raise RecipeError(f"{source}: {len(lines)} problem(s): " + "; ".join(lines)) from None
    return recipe
