"""Rebuild the small example datasets under ``data/`` from their public sources.

Three datasets are written as JSON Lines (UTF-8, one object per line):

* ``data/docstrings``: chat-style SFT examples that ask for a one-line
  docstring summary of a function taken from the running interpreter's
  standard library (PSF License Agreement version 2).
* ``data/docstring_prefs``: preference pairs from the same examples: the
  real summary is chosen, the real summary of another function of the same
  split (of the same package where there is one) is rejected.
* ``data/docstring_pairs``: sentence-embedding pairs from the same examples:
  the summary (``anchor``, the query) and the function's code
  (``positive``, the passage it should retrieve).
* ``data/docstring_kto``: the same pairs unpaired for KTO: one row per pair,
  its chosen summary (``label: true``) or its rejected one (``label: false``),
  half and half (seeded).
* ``data/fortunes``: text classification of Debian ``fortunes`` cookies
  (``/usr/share/games/fortunes``; install the ``fortunes`` and
  ``fortunes-min`` packages first).

The output is deterministic for a given Python version and fortunes package
version.  Usage::

    python scripts/build_example_data.py [--out-dir data] [--seed 0] [--only docstrings preferences pairs ...]
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import random
import re
import sysconfig
import textwrap
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

LOG = logging.getLogger("build_example_data")

SPLITS = ("train", "validation", "test")
DATASETS = ("docstrings", "preferences", "pairs", "kto", "fortunes", "reference", "arithmetic")
MAX_DATASET_BYTES = 2 * 1024 * 1024

# --- docstrings -------------------------------------------------------------

PROMPT = "Write a one-line docstring summary for this Python function:\n\n```python\n{code}\n```"
SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "__pycache__", "encodings"}
)
BAD_WORDS = ("xxx", "todo", "deprecated", ">>>")
MIN_SUMMARY, MAX_SUMMARY = 10, 120
MAX_SOURCE_CHARS, MIN_SOURCE_LINES = 400, 2
DOC_TARGETS = {"train": 1200, "validation": 80, "test": 200}

# --- fortunes ---------------------------------------------------------------

FORTUNE_DIR = Path("/usr/share/games/fortunes")
FORTUNE_CATEGORIES = ("computers", "food", "law", "love")
MIN_TEXT, MAX_TEXT = 20, 300
MAX_TRAIN_TOTAL = 800
FORTUNE_FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}


@dataclass(frozen=True)
class DocExample:
    """One candidate docstring example."""

    module: str
    qualname: str
    name: str
    code: str
    summary: str

    def to_record(self) -> dict[str, object]:
        """Return the JSON record for this example."""
        return {
            "messages": [
                {"role": "user", "content": PROMPT.format(code=self.code)},
                {"role": "assistant", "content": self.summary},
            ],
            "source": f"{self.module}.{self.qualname}",
        }


def iter_stdlib_files(stdlib: Path) -> Iterator[tuple[str, Path]]:
    """Yield ``(module name, path)`` for stdlib sources, in sorted order."""
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-"))
        rel = Path(root).relative_to(stdlib)
        for fname in sorted(files):
            if not fname.endswith(".py") or fname.startswith("test_"):
                continue
            parts = [*rel.parts, fname[:-3]]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts:
                yield ".".join(parts), Path(root) / fname


def clean_summary(doc: str) -> str | None:
    """Return the docstring's summary line if it is one proper sentence, else None."""
    lines = doc.strip().splitlines()
    if not lines:
        return None
    summary = lines[0].strip()
    if len(lines) > 1 and lines[1].strip():
        return None  # summary continues on the next line
    if not MIN_SUMMARY <= len(summary) <= MAX_SUMMARY or not summary.endswith("."):
        return None
    if summary.endswith(("..", "e.g.", "i.e.", "etc.")) or not summary[0].isupper():
        return None
    lowered = summary.lower()
    if any(word in lowered for word in BAD_WORDS):
        return None
    if "->" in summary or "(self" in summary or re.search(r"[.!?]\s+[A-Z]", summary[:-1]):
        return None  # signature-like or more than one sentence
    return summary


def strip_docstring(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """Return the function's source without its docstring, dedented, or None."""
    doc, rest = node.body[0], node.body[1:]
    if not rest or doc.lineno == node.lineno or rest[0].lineno == doc.end_lineno:
        return None  # body would be empty, or docstring shares a line
    assert doc.end_lineno is not None and node.end_lineno is not None
    start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    head = lines[start - 1 : doc.lineno - 1]
    tail = lines[doc.end_lineno : node.end_lineno]
    while tail and not tail[0].strip():
        tail = tail[1:]
    code = textwrap.dedent("".join(head + tail)).rstrip()
    code = "\n".join(line.rstrip() for line in code.splitlines())
    try:
        ast.parse(code)
    except SyntaxError:
        return None
    return code


def iter_functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Yield ``(qualname, node)`` for top-level functions and methods of top-level classes."""
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, funcs):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, funcs):
                    yield f"{node.name}.{item.name}", item


def extract_examples(module: str, path: Path) -> list[DocExample]:
    """Return the candidate examples of one stdlib module."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
        LOG.debug("skipping %s: %s", path, exc)
        return []
    lines = source.splitlines(keepends=True)
    out = []
    for qualname, node in iter_functions(tree):
        doc = ast.get_docstring(node, clean=True)
        summary = clean_summary(doc) if doc else None
        if summary is None:
            continue
        code = strip_docstring(lines, node)
        if code is None:
            continue
        stripped = code.strip()
        if len(stripped) > MAX_SOURCE_CHARS or len(stripped.splitlines()) < MIN_SOURCE_LINES:
            continue
        out.append(DocExample(module, qualname, node.name, stripped, summary))
    return out


def build_docstrings(seed: int) -> dict[str, list[dict[str, object]]]:
    """Build the docstring SFT splits, split by module with no shared summaries."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    LOG.info("reading stdlib sources from %s", stdlib)
    seen_code: set[str] = set()
    seen_pair: set[tuple[str, str]] = set()
    by_module: dict[str, list[DocExample]] = {}
    for module, path in iter_stdlib_files(stdlib):
        for ex in extract_examples(module, path):
            if ex.code in seen_code or (ex.name, ex.summary) in seen_pair:
                continue
            seen_code.add(ex.code)
            seen_pair.add((ex.name, ex.summary))
            by_module.setdefault(module, []).append(ex)
    LOG.info("%d candidates from %d modules", sum(map(len, by_module.values())), len(by_module))

    rng = random.Random(seed)
    modules = sorted(by_module)
    rng.shuffle(modules)
    splits: dict[str, list[DocExample]] = {name: [] for name in SPLITS}
    used_summaries: set[str] = set()
    order = ("test", "validation", "train")  # small held-out splits first
    idx = 0
    for module in modules:
        while idx < len(order) and len(splits[order[idx]]) >= DOC_TARGETS[order[idx]]:
            idx += 1
        if idx == len(order):
            break
        split = order[idx]
        module_summaries: set[str] = set()
        for ex in by_module[module]:
            if len(splits[split]) >= DOC_TARGETS[split]:
                break
            if ex.summary in used_summaries:
                continue  # summary already in an earlier split
            splits[split].append(ex)
            module_summaries.add(ex.summary)
        used_summaries |= module_summaries
    result = {}
    for name in SPLITS:
        examples = splits[name]
        rng.shuffle(examples)
        result[name] = [ex.to_record() for ex in examples]
    return result


def build_preferences(docstrings: dict[str, list[dict]], seed: int) -> dict[str, list[dict[str, object]]]:
    """Preference pairs in TRL's conversational format from the docstring splits: the prompt and the real
    summary (chosen) of each example, and the real summary of a different function of the same split
    (rejected), from the same top-level package when the split has another summary there, so that the pair
    differs in content more than in style. No summary crosses a split."""
    rng = random.Random(f"preferences-{seed}")
    result = {}
    for split in SPLITS:
        records = docstrings[split]
        summaries = [r["messages"][1]["content"] for r in records]
        packages = [str(r["source"]).split(".")[0] for r in records]
        pairs = []
        for i, rec in enumerate(records):
            others = [j for j, s in enumerate(summaries) if s != summaries[i]]
            same = [j for j in others if packages[j] == packages[i]]
            j = rng.choice(same or others)
            pairs.append({"prompt": rec["messages"][:1], "chosen": rec["messages"][1:],
                          "rejected": records[j]["messages"][1:], "source": rec["source"],
                          "rejected_source": records[j]["source"]})
        result[split] = pairs
    return result


CODE = re.compile(r"```python\n(.*)\n```\Z", re.S)


def build_pairs(docstrings: dict[str, list[dict]]) -> dict[str, list[dict[str, object]]]:
    """Embedding pairs in sentence-transformers' column names from the docstring splits: the summary is the
    ``anchor`` (a query), the function's code (the prompt's code block) its ``positive``. The splits keep the
    docstrings' split by module, so no module, summary or function is in two splits."""
    result = {}
    for split in SPLITS:
        pairs = []
        for rec in docstrings[split]:
            code = CODE.search(rec["messages"][0]["content"])
            if code is None:
                raise SystemExit(f"docstrings/{split}: no code block in the prompt of {rec['source']}")
            pairs.append({"anchor": rec["messages"][1]["content"], "positive": code.group(1), "source": rec["source"]})
        result[split] = pairs
    return result


def build_kto(prefs: dict[str, list[dict]], seed: int) -> dict[str, list[dict[str, object]]]:
    """Unpaired feedback for KTO from the preference pairs: each pair gives one row, its prompt with the chosen
    summary (``label: true``) or the rejected one (``label: false``), half of each split's rows each way (a seeded
    permutation), so a prompt is rated once, as thumbs up/down data is collected."""
    rng = random.Random(f"kto-{seed}")
    result = {}
    for split in SPLITS:
        pairs = prefs[split]
        order = list(range(len(pairs)))
        rng.shuffle(order)
        desirable = set(order[: len(pairs) // 2])
        result[split] = [{"prompt": p["prompt"], "completion": p["chosen"] if i in desirable else p["rejected"],
                          "label": i in desirable, "source": p["source"]} for i, p in enumerate(pairs)]
    return result


def read_dataset(out_dir: Path, name: str) -> dict[str, list[dict]]:
    """A dataset's committed splits (the KTO rows are derived from the committed pairs unless those are rebuilt:
    rebuilding the docstrings needs the same CPython version)."""
    return {s: [json.loads(line) for line in (out_dir / name / f"{s}.jsonl").read_text("utf-8").splitlines()]
            for s in SPLITS}


# --- fortunes ---------------------------------------------------------------


def remove_overstrike(text: str) -> str:
    """Resolve backspace overstriking (``_\\bX`` underline, ``X\\bX`` bold)."""
    out_lines = []
    for line in text.split("\n"):
        buf: list[str] = []
        pos = 0
        for ch in line:
            if ch == "\b":
                pos = max(pos - 1, 0)
                continue
            if pos < len(buf):
                if ch != "_" or buf[pos] in " _":
                    buf[pos] = ch
            else:
                buf.append(ch)
            pos += 1
        out_lines.append("".join(buf))
    return "\n".join(out_lines)


def read_fortunes(path: Path) -> list[str]:
    """Return the whitespace-normalised fortunes of one fortune file."""
    raw = path.read_text(encoding="utf-8")
    entries: list[str] = []
    current: list[str] = []
    for line in raw.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    out = []
    for entry in entries:
        text = remove_overstrike(entry)
        text = "".join(ch if ch.isprintable() or ch.isspace() else " " for ch in text)
        text = " ".join(text.split())
        if text:
            out.append(text)
    return out


def build_fortunes(seed: int, categories: Iterable[str]) -> dict[str, list[dict[str, object]]]:
    """Build balanced fortune classification splits (per-class 70/10/20)."""
    categories = list(categories)
    texts: dict[str, list[str]] = {}
    owners: dict[str, set[str]] = {}
    for cat in categories:
        path = FORTUNE_DIR / cat
        if not path.is_file():
            raise SystemExit(f"{path} missing: apt-get install -y fortunes fortunes-min")
        kept: list[str] = []
        for text in read_fortunes(path):
            if MIN_TEXT <= len(text) <= MAX_TEXT and text not in kept:
                kept.append(text)
                owners.setdefault(text, set()).add(cat)
        texts[cat] = kept
    # Drop texts that occur in more than one category (ambiguous labels).
    for cat in categories:
        texts[cat] = [t for t in texts[cat] if len(owners[t]) == 1]
        LOG.info("fortunes/%s: %d usable entries", cat, len(texts[cat]))

    per_class_train_cap = MAX_TRAIN_TOTAL // len(categories)
    per_class = min(
        min(len(v) for v in texts.values()),
        int(per_class_train_cap / FORTUNE_FRACTIONS["train"]),
    )
    n_val = round(per_class * FORTUNE_FRACTIONS["validation"])
    n_test = round(per_class * FORTUNE_FRACTIONS["test"])
    n_train = per_class - n_val - n_test
    rng = random.Random(seed)
    splits: dict[str, list[dict[str, object]]] = {name: [] for name in SPLITS}
    for cat in categories:
        pool = sorted(texts[cat])
        rng.shuffle(pool)
        chunks = {
            "train": pool[:n_train],
            "validation": pool[n_train : n_train + n_val],
            "test": pool[n_train + n_val : per_class],
        }
        for name, chunk in chunks.items():
            splits[name].extend({"text": t, "label": cat} for t in chunk)
    for name in SPLITS:
        rng.shuffle(splits[name])
    return splits


# --- output -----------------------------------------------------------------


def write_jsonl(path: Path, records: list[dict[str, object]]) -> int:
    """Write ``records`` as JSON Lines and return the file size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path.stat().st_size


def write_dataset(out_dir: Path, name: str, splits: dict[str, list[dict[str, object]]]) -> None:
    """Write one dataset's splits, check its size, and print a summary."""
    total = 0
    for split in SPLITS:
        total += write_jsonl(out_dir / name / f"{split}.jsonl", splits[split])
    counts = ", ".join(f"{s}={len(splits[s])}" for s in SPLITS)
    print(f"{name}: {counts} ({total / 1024:.0f} KiB)")
    for split in SPLITS:
        labels = Counter(str(r["label"]) for r in splits[split] if "label" in r)
        if labels:
            print(f"  {split}: " + ", ".join(f"{k}={v}" for k, v in sorted(labels.items())))
    if total > MAX_DATASET_BYTES:
        raise SystemExit(f"{name} is {total} bytes, over the {MAX_DATASET_BYTES} byte limit")


REFERENCE_CATEGORIES = ("wisdom", "literature", "science", "people")
REFERENCE_OUT = Path(__file__).resolve().parent.parent / "src" / "lora_ft" / "resources" / "general_text.jsonl"


def build_reference_text(seed: int, n: int = 128) -> list[dict[str, object]]:
    """General English text for lora_ft's forgetting guard: fortunes from categories the classification
    dataset does not use, 80-400 characters, deduplicated, seeded sample."""
    texts = sorted({t for c in REFERENCE_CATEGORIES if (FORTUNE_DIR / c).is_file()
                    for t in read_fortunes(FORTUNE_DIR / c) if 80 <= len(t) <= 400})
    random.Random(seed).shuffle(texts)
    return [{"text": t} for t in texts[:n]]


ARITHMETIC_TEMPLATES = ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} + {b}.")
"""How the arithmetic prompts ask; the answer is always the sum (``answer``, an integer)."""


def build_arithmetic(seed: int) -> dict[str, list[dict[str, object]]]:
    """Small additions for GRPO with a checkable answer (``numeric_match``): the 144 pairs a + b (1-12 each) split
    80 / 32 / 32 so no held-out pair was trained on, each pair asked in every ``ARITHMETIC_TEMPLATES`` way in
    train and in one (seeded) way in validation and test."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(1, 13) for b in range(1, 13)]
    rng.shuffle(pairs)
    held = {"validation": pairs[80:112], "test": pairs[112:]}
    splits: dict[str, list[dict[str, object]]] = {
        "train": [{"prompt": t.format(a=a, b=b), "answer": a + b} for a, b in pairs[:80]
                  for t in ARITHMETIC_TEMPLATES]}
    rng.shuffle(splits["train"])
    for name, chosen in held.items():
        splits[name] = [{"prompt": rng.choice(ARITHMETIC_TEMPLATES).format(a=a, b=b), "answer": a + b}
                        for a, b in chosen]
    return splits


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and rebuild the datasets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent.parent / "data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--categories", nargs="+", default=list(FORTUNE_CATEGORIES))
    parser.add_argument("--only", nargs="+", choices=DATASETS, default=list(DATASETS),
                        help="rebuild only these (preferences are derived from the docstrings)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    prefs = None
    if {"docstrings", "preferences", "pairs"} & set(args.only):
        docstrings = build_docstrings(args.seed)
        if "docstrings" in args.only:
            write_dataset(args.out_dir, "docstrings", docstrings)
        if "preferences" in args.only:
            prefs = build_preferences(docstrings, args.seed)
            write_dataset(args.out_dir, "docstring_prefs", prefs)
        if "pairs" in args.only:
            write_dataset(args.out_dir, "docstring_pairs", build_pairs(docstrings))
    if "kto" in args.only:
        write_dataset(args.out_dir, "docstring_kto",
                      build_kto(prefs or read_dataset(args.out_dir, "docstring_prefs"), args.seed))
    if "fortunes" in args.only:
        write_dataset(args.out_dir, "fortunes", build_fortunes(args.seed, args.categories))
    if "arithmetic" in args.only:
        write_dataset(args.out_dir, "arithmetic", build_arithmetic(args.seed))
    if "reference" in args.only:
        REFERENCE_OUT.parent.mkdir(parents=True, exist_ok=True)
        LOG.info("reference text: %d bytes -> %s", write_jsonl(REFERENCE_OUT, build_reference_text(args.seed)),
                 REFERENCE_OUT)


if __name__ == "__main__":
    main()
