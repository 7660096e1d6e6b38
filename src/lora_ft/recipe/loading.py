"""Reading a recipe: YAML → overrides (``--set``) → paths relative to the recipe → schema, every problem at once.

A recipe's problems are collected by pydantic and reported in one ``RecipeError`` line, each with its dotted
location and, for unknown keys, a did-you-mean.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import RecipeError, did_you_mean
from .schema import SECTIONS, Recipe

PATH_FIELDS = ("train", "validation", "test")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


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


def _resolve_paths(data: dict[str, Any], base: Path, keys: tuple[str, ...]) -> None:
    """Relative data paths in a recipe file are relative to that file, so recipes run from anywhere."""
    for key in keys:
        value = data.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
            data[key] = str((base / value).resolve())


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raise one ``RecipeError`` listing every problem."""
    try:
        return _load_recipe(path, overrides)
    except RecursionError:  # yaml and pydantic recurse per nesting level: "[[[[...]]]]" would escape as-is
        raise RecipeError(f"{path or 'recipe'}: nested too deeply to be a recipe (sections hold keys and "
                          "values, a few levels deep)") from None


def _load_recipe(path: str | Path | None, overrides: list[str] | None) -> Recipe:
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
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
        if isinstance(tree.get("data"), dict):
            _resolve_paths(tree["data"], path.parent, PATH_FIELDS)
        if isinstance(tree.get("forgetting"), dict):
            _resolve_paths(tree["forgetting"], path.parent, ("reference",))
        if isinstance(tree.get("lora"), dict):
            _resolve_paths(tree["lora"], path.parent, ("init_from",))
        if isinstance(tree.get("model"), dict):
            name = tree["model"].get("name")
            if isinstance(name, str) and name.endswith(".gguf") and (path.parent / name).exists():
                tree["model"]["name"] = str((path.parent / name).resolve())
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    for section in SECTIONS:
        if section in tree and not isinstance(tree[section], dict):
            raise RecipeError(f"{section}: must be a mapping of keys, got {tree[section]!r}")
    try:
        return Recipe.model_validate(tree)
    except ValidationError as e:
        lines = [_format_error(err) for err in e.errors()]
        source = str(path) if path else "recipe"
        raise RecipeError(f"{source}: {len(lines)} problem(s): " + "; ".join(lines)) from None
