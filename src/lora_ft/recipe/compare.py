"""Which values differ between two recipes (a resumed run against its checkpoint, a sweep trial against its folder)."""

from __future__ import annotations

from typing import Any

from .schema import Recipe


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"lora": {"r": 8}}`` → ``{"lora.r": 8}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changes(old: Recipe, new: Recipe) -> dict[str, tuple[Any, Any]]:
    """Dotted key → (old value, new value) for every value that differs."""
    a, b = flatten(old.model_dump(mode="json")), flatten(new.model_dump(mode="json"))
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def describe_changes(diff: dict[str, tuple[Any, Any]], keys: list[str]) -> str:
    """``lora.r 8 → 16, lora.alpha 16 → 32`` for ``keys`` of ``diff``."""
    return ", ".join(f"{k} {diff[k][0]!r} → {diff[k][1]!r}" for k in keys)
