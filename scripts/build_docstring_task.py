"""Build a 12-class held-out classification task from the Python packages installed on this machine.

    python scripts/build_docstring_task.py [--out-dir ~/.cache/lora_ft/heldout/docstring-package] [--seed 0]

Each example is the first sentence of a function's or class's docstring (read with ``ast``, nothing imported) and
its label is the top-level package that defines it: ``torch``, ``transformers``, ``numpy``, ``scipy``, ``pandas``,
``sklearn``, ``sympy``, ``matplotlib``, ``networkx``, ``pip``, ``setuptools``, ``datasets``. Test folders are
skipped, sentences are deduplicated across packages (a sentence found in two packages is dropped), and each class
gets 125 train / 15 validation / 90 test examples (1,500 / 180 / 1,080): the shape of the engine comparison of
issue 24 (≥ 10 classes, ≥ 1.5k train, ≥ 1k test). The texts are those packages' own docstrings, under their
licences; the files are built locally for measurement and not shipped.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import random
import re
import sysconfig
from pathlib import Path

PACKAGES = ("torch", "transformers", "numpy", "scipy", "pandas", "sklearn", "sympy", "matplotlib", "networkx",
            "pip", "setuptools", "datasets")
COUNTS = {"train": 125, "validation": 15, "test": 90}
log = logging.getLogger("build_docstring_task")


def first_sentence(doc: str) -> str | None:
    """The docstring's first paragraph up to its first full stop, whitespace collapsed; None when too short or
    too long to be a sentence (8–40 words)."""
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    text = " ".join(para.split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    text = m.group(1) if m else text
    return text if 8 <= len(text.split()) <= 40 else None


def sentences(root: Path) -> set[str]:
    """Every first sentence of a function or class docstring in the package at ``root`` (tests skipped)."""
    out: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if any(p in ("tests", "test", "testing") for p in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                doc = ast.get_docstring(node)
                s = first_sentence(doc) if doc else None
                if s:
                    out.add(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default="~/.cache/lora_ft/heldout/docstring-package")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    site = Path(sysconfig.get_paths()["purelib"])
    found = {p: sentences(site / p) for p in PACKAGES}
    seen: dict[str, int] = {}
    for s in (s for v in found.values() for s in v):
        seen[s] = seen.get(s, 0) + 1
    rng = random.Random(a.seed)
    splits: dict[str, list[dict]] = {k: [] for k in COUNTS}
    for p in PACKAGES:
        own = sorted(s for s in found[p] if seen[s] == 1)
        need = sum(COUNTS.values())
        if len(own) < need:
            raise SystemExit(f"build_docstring_task: {p} has {len(own)} unique sentences, {need} needed")
        rng.shuffle(own)
        at = 0
        for split, n in COUNTS.items():
            splits[split] += [{"text": s, "label": p} for s in own[at : at + n]]
            at += n
    out = Path(a.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        rng.shuffle(rows)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        log.info("%s: %d examples", split, len(rows))


if __name__ == "__main__":
    main()
