"""Build five small held-out benchmark tasks from text installed on this Debian machine.

The tasks check ``lora_ft``'s default hyper-parameters on data nobody tuned them for.  Each task is a folder
with ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` (UTF-8 JSON Lines) and a ``LICENSE-NOTE.md``:

* ``man-section`` (classification, 6 classes): a man page's one-line description (the ``apropos`` text after
  `` - ``, the page name removed) -> its section: ``1`` user commands, ``2`` system calls, ``3`` library
  calls, ``5`` file formats, ``7`` miscellanea, ``8`` administration.  Balanced, at most 110/20/50 per class.
* ``license-clause`` (classification): a paragraph of a licence text in ``/usr/share/common-licenses`` -> the
  licence's name.  Stratified ~70/10/20, at most 80 train paragraphs per class.
* ``man-pair`` (text-pair classification): a command name and a one-line description -> ``match`` (its own
  page's) or ``mismatch`` (another page's, drawn with the seed).  Balanced, at most 600/100/200.
* ``whatis`` (generation, prompt/completion): "What does the `NAME` command (section N) do?" -> the page's
  one-line description.  At most 240/40/120.
* ``man-options`` (generation, chat ``messages``): "In `CMD`, what does the option `-x, --long` do?" -> the
  option's description paragraph from the rendered page.  At most 240/40/120, at most 3 options per command.

Only English pages under ``/usr/share/man/manN`` are used, never the localised sub-folders.  Texts are
deduplicated (normalised) before splitting; no text, name or prompt appears in two splits of a task.

Usage::

    python scripts/build_heldout_tasks.py [--out-dir DIR] [--seed 0] [--only man-section whatis ...] [-v]

The default output folder is ``~/.cache/lora_ft/heldout``.  Needs ``man-db`` (``man``, ``apropos``) with an
up-to-date index (``mandb``) and the ``base-files`` licence texts.

Sources and licences (the files are built locally for measurement only and never redistributed):

* man pages: each page is under the licence of the package that ships it, see
  ``/usr/share/doc/<package>/copyright``; every man task's ``LICENSE-NOTE.md`` lists the packages used.
* ``/usr/share/common-licenses``: the licence texts themselves, whose verbatim copying is permitted.

Debian package descriptions, the Python standard library's docstrings and ``/usr/share/games/fortunes`` are
never used (the latter two are the project's shipped examples).  The sets depend on which packages (and which
versions) are installed on the machine, so the script logs a short SHA-256 of every file it writes: a results
table can then say which build it measured.

(Over 450 lines on purpose: five readers of machine text, each beside its selection rules and licence note, in one
standalone script that ``scripts/bench_defaults.py`` and a user can run without the package.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

LOG = logging.getLogger("build_heldout_tasks")

SPLITS = ("train", "validation", "test")
TASKS = ("man-section", "license-clause", "man-pair", "whatis", "man-options")
DEFAULT_OUT = Path("~/.cache/lora_ft/heldout")
HASH_CHARS = 16

# --- man page index ---------------------------------------------------------

MAN_ROOT = Path("/usr/share/man")
SECTION_NAMES = {"1": "user commands", "2": "system calls", "3": "library calls", "5": "file formats",
                 "7": "miscellanea", "8": "system administration"}
PAGE_SUFFIXES = (".gz", "", ".xz", ".bz2", ".zst")
MIN_DESC, MAX_DESC = 8, 200
APROPOS_LINE = re.compile(r"^(?P<name>\S+) \((?P<section>[^)\s]+)\)\s+- (?P<desc>.*)$")
MAN_ENV = {"LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "LANGUAGE": "", "MANWIDTH": "100", "COLUMNS": "100",
           "MANPAGER": "cat", "PAGER": "cat"}

# --- task sizes -------------------------------------------------------------

SECTION_CAPS = {"train": 110, "validation": 20, "test": 50}  # per class
MIN_SECTION_PAGES = 60  # a section with fewer usable descriptions is dropped
MIN_SECTION_CLASSES = 4
PAIR_CAPS = {"train": 600, "validation": 100, "test": 200}  # examples (half match, half mismatch)
WHATIS_CAPS = {"train": 240, "validation": 40, "test": 120}
OPTION_CAPS = {"train": 240, "validation": 40, "test": 120}
GEN_SECTIONS = ("1", "8")

# --- licences ---------------------------------------------------------------

LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSES = ("Apache-2.0", "Artistic", "GFDL-1.3", "GPL-2", "GPL-3", "LGPL-2.1", "MPL-2.0", "BSD", "CC0-1.0")
MIN_PARAGRAPH, MAX_PARAGRAPH = 60, 600
MIN_LICENSE_PARAGRAPHS = 12
LICENSE_FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}
LICENSE_TRAIN_CAP = 80

# --- man options ------------------------------------------------------------

MAX_RENDER_PAGES = 400
RENDER_BUDGET_S = 150.0
RENDER_TIMEOUT_S = 10.0
MIN_OPTION_DESC, MAX_OPTION_DESC = 15, 300
MAX_OPTIONS_PER_COMMAND = 3
MAX_TAG_CHARS = 50
DESC_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789(\"'“")  # not ": ..."
OPTION_PROMPT = "In `{command}`, what does the option `{tag}` do?"
WHATIS_PROMPT = "What does the `{name}` command (section {section}) do? Answer in one line.\n"
TAG_LINE = re.compile(r"^(?P<indent> +)(?P<tag>-\S.*?)(?: {2,}(?P<rest>\S.*))?$")
TAG_PART = re.compile(r"^--?[A-Za-z0-9?#@][^\s,]*(?: [^\s-]\S*)?$")
DASHES = str.maketrans({"\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2212": "-"})
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
OVERSTRIKE = re.compile("[^\x08\n]\x08")  # a character and the backspace that strikes it

Record = dict[str, object]
Splits = dict[str, list[Record]]
T = TypeVar("T")


class SourceMissing(SystemExit):
    """A source the task needs is not installed: the message says what to install."""


def normalise(text: str) -> str:
    """The dedup key of a text: whitespace collapsed, case folded, trailing full stop dropped."""
    return " ".join(text.split()).casefold().rstrip(".").rstrip()


def collapse(text: str) -> str:
    """Collapse runs of whitespace to single spaces."""
    return " ".join(text.split())


# --- man page index ---------------------------------------------------------


@dataclass(frozen=True)
class ManPage:
    """One entry of the man page index: an English page with its own file under /usr/share/man/manN."""

    name: str
    section: str
    description: str
    path: Path


def require_tool(tool: str, package: str) -> str:
    """Return the path of ``tool``, or fail naming the Debian package to install."""
    found = shutil.which(tool)
    if found is None:
        raise SourceMissing(f"`{tool}` is not installed: apt-get install -y {package}")
    return found


def page_file(name: str, section: str, root: Path = MAN_ROOT) -> Path | None:
    """The page's own file ``root/manS/NAME.S[.gz]`` (an existing file or working symlink), else None."""
    if "/" in name:
        return None
    for suffix in PAGE_SUFFIXES:
        path = root / f"man{section}" / f"{name}.{section}{suffix}"
        if path.is_file():
            return path
    return None


def parse_apropos(lines: Iterable[str], sections: Iterable[str]) -> Iterator[tuple[str, str, str]]:
    """Yield ``(name, section, description)`` of ``apropos`` lines in exactly one of ``sections``.

    Subsections (``1ssl``, ``3perl``, ...) are not the plain section and are skipped, as are pages without a
    real description (``(unknown subject)``) and descriptions shorter than 8 or longer than 200 characters."""
    wanted = set(sections)
    for line in lines:
        m = APROPOS_LINE.match(line.rstrip("\n"))
        if m is None or m["section"] not in wanted:
            continue
        desc = collapse(m["desc"])
        if "unknown subject" in desc.casefold() or not MIN_DESC <= len(desc) <= MAX_DESC:
            continue
        if not re.search(r"[A-Za-z]{3}", desc):
            continue
        yield m["name"], m["section"], desc


@lru_cache(maxsize=1)
def man_index() -> tuple[ManPage, ...]:
    """All English pages of sections 1, 2, 3, 5, 7 and 8 that have a description and their own file."""
    apropos = require_tool("apropos", "man-db")
    if not MAN_ROOT.is_dir():
        raise SourceMissing(f"{MAN_ROOT} does not exist: no man pages are installed")
    cmd = [apropos, "-l", "-M", str(MAN_ROOT), "-L", "C", "-s", ",".join(SECTION_NAMES), "."]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MAN_ENV}, timeout=120)
    if not result.stdout.strip():
        raise SourceMissing(f"`{' '.join(cmd)}` found no pages ({result.stderr.strip() or 'empty output'}): "
                            "install man pages (apt-get install -y man-db manpages manpages-dev) and run `mandb`")
    pages = []
    no_file = 0
    for name, section, desc in parse_apropos(result.stdout.splitlines(), SECTION_NAMES):
        path = page_file(name, section)
        if path is None:
            no_file += 1  # an alias named only in another page's NAME line
            continue
        pages.append(ManPage(name, section, desc, path))
    pages.sort(key=lambda p: (p.section, p.name))
    LOG.info("man index: %d English pages with a description and their own file (%d aliases without one)",
             len(pages), no_file)
    LOG.debug("man index per section: %s", dict(sorted(Counter(p.section for p in pages).items())))
    return tuple(pages)


def unique_pages(pages: Iterable[ManPage]) -> list[ManPage]:
    """Keep the first page of each name and of each normalised description (``pages`` in a fixed order)."""
    seen_names: set[str] = set()
    seen_desc: set[str] = set()
    out = []
    for page in pages:
        key = normalise(page.description)
        if page.name in seen_names or key in seen_desc:
            continue
        seen_names.add(page.name)
        seen_desc.add(key)
        out.append(page)
    return out


def packages_of(paths: Iterable[Path]) -> Counter[str]:
    """Count the Debian packages that ship ``paths`` (``dpkg-query -S``; package names only)."""
    dpkg = shutil.which("dpkg-query")
    files = sorted({str(p.resolve()) for p in paths})
    counts: Counter[str] = Counter()
    if dpkg is None or not files:
        return counts
    owner: dict[str, str] = {}
    for start in range(0, len(files), 500):
        result = subprocess.run([dpkg, "-S", *files[start : start + 500]], capture_output=True, text=True,
                                env={**os.environ, **MAN_ENV}, timeout=120)
        for line in result.stdout.splitlines():
            m = re.match(r"^(.+?): (/.+)$", line)
            if m and not line.startswith("diversion by"):
                owner[m[2]] = m[1].split(",")[0].split(":")[0].strip()
    for f in files:
        counts[owner.get(f, "(no package)")] += 1
    return counts


# --- splitting --------------------------------------------------------------


def stratified_split(by_label: dict[str, Sequence[str]], counts: Callable[[int], dict[str, int]],
                     rng: random.Random) -> Splits:
    """Split each class's texts (sorted, then shuffled) into ``counts(n)`` train/validation/test examples.

    The texts must already be deduplicated across classes; a text listed twice in a class is used once."""
    splits: Splits = {s: [] for s in SPLITS}
    for label in sorted(by_label):
        pool = sorted(set(by_label[label]))
        rng.shuffle(pool)
        sizes = counts(len(pool))
        start = 0
        for split in ("test", "validation", "train"):
            chunk = pool[start : start + sizes[split]]
            start += sizes[split]
            splits[split].extend({"text": t, "label": label} for t in chunk)
    for split in SPLITS:
        rng.shuffle(splits[split])
    return splits


def proportional_counts(n: int, fractions: dict[str, float], train_cap: int | None = None) -> dict[str, int]:
    """Split ``n`` by ``fractions`` with at least one validation and one test example (n >= 3)."""
    n_val = max(1, round(n * fractions["validation"]))
    n_test = max(1, round(n * fractions["test"]))
    n_train = n - n_val - n_test
    if train_cap is not None:
        n_train = min(n_train, train_cap)
    return {"train": n_train, "validation": n_val, "test": n_test}


def fill_splits(groups: Iterable[Sequence[T]], caps: dict[str, int]) -> dict[str, list[T]]:
    """Put whole groups (in the given order) into test, then validation, then train, up to ``caps`` items.

    A group that does not fit entirely is cut to the room left; a group never spans two splits."""
    splits: dict[str, list[T]] = {s: [] for s in SPLITS}
    order = ["test", "validation", "train"]
    for group in groups:
        while order and len(splits[order[0]]) >= caps[order[0]]:
            order.pop(0)
        if not order:
            break
        room = caps[order[0]] - len(splits[order[0]])
        splits[order[0]].extend(group[:room])
    return splits


def check_disjoint(task: str, splits: Splits, key: Callable[[Record], Iterable[str]]) -> None:
    """Fail if a key (text, name, prompt) occurs in two splits."""
    owner: dict[str, str] = {}
    for split in SPLITS:
        for rec in splits[split]:
            for k in set(key(rec)):
                if owner.setdefault(k, split) != split:
                    raise SystemExit(f"{task}: {k!r} is in both {owner[k]} and {split}")


# --- task 1: man-section ----------------------------------------------------


def build_man_section(seed: int) -> tuple[Splits, list[ManPage], list[str]]:
    """Description -> section, balanced over the sections that have enough pages."""
    owners: dict[str, set[str]] = {}
    first: dict[str, ManPage] = {}
    for page in man_index():
        key = normalise(page.description)
        owners.setdefault(key, set()).add(page.section)
        first.setdefault(key, page)
    by_label: dict[str, list[str]] = {s: [] for s in SECTION_NAMES}
    ambiguous = 0
    for key, sections in owners.items():
        if len(sections) > 1:
            ambiguous += 1
            continue
        page = first[key]
        by_label[page.section].append(page.description)
    LOG.info("man-section: %d distinct descriptions dropped as they occur in more than one section", ambiguous)
    notes = []
    for section in list(by_label):
        n = len(by_label[section])
        LOG.info("man-section: section %s (%s): %d usable descriptions", section, SECTION_NAMES[section], n)
        if n < MIN_SECTION_PAGES:
            note = f"section {section} dropped: only {n} usable descriptions (< {MIN_SECTION_PAGES})"
            LOG.warning("man-section: %s", note)
            notes.append(note)
            del by_label[section]
    if len(by_label) < MIN_SECTION_CLASSES:
        raise SourceMissing(f"man-section: only {len(by_label)} sections have enough pages "
                            f"(need {MIN_SECTION_CLASSES}): install more man pages (manpages, manpages-dev)")
    full = sum(SECTION_CAPS.values())
    per_class = min(full, *(len(v) for v in by_label.values()))

    def counts(_n: int) -> dict[str, int]:
        if per_class == full:
            return dict(SECTION_CAPS)
        sizes = {s: int(per_class * SECTION_CAPS[s] / full) for s in ("validation", "test")}
        return {"train": per_class - sizes["validation"] - sizes["test"], **sizes}

    splits = stratified_split(by_label, counts, random.Random(f"man-section-{seed}"))
    used = {rec["text"] for recs in splits.values() for rec in recs}
    pages = [first[normalise(t)] for t in sorted(str(u) for u in used)]
    return splits, pages, notes


# --- task 2: license-clause -------------------------------------------------


def license_paragraphs(text: str) -> list[str]:
    """Paragraphs (split on blank lines, whitespace collapsed) of 60-600 characters, first occurrence only."""
    out: list[str] = []
    for block in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        para = collapse(block)
        if MIN_PARAGRAPH <= len(para) <= MAX_PARAGRAPH and para not in out:
            out.append(para)
    return out


def drop_shared(paragraphs: dict[str, list[str]]) -> dict[str, list[str]]:
    """Drop every paragraph whose normalised text occurs under more than one label (shared boilerplate)."""
    owners: dict[str, set[str]] = {}
    for label, paras in paragraphs.items():
        for p in paras:
            owners.setdefault(normalise(p), set()).add(label)
    out: dict[str, list[str]] = {}
    for label, paras in paragraphs.items():
        seen: set[str] = set()
        kept = []
        for p in paras:
            key = normalise(p)
            if len(owners[key]) == 1 and key not in seen:
                seen.add(key)
                kept.append(p)
        out[label] = kept
    return out


def build_license_clause(seed: int) -> tuple[Splits, list[str]]:
    """Licence paragraph -> licence name, stratified ~70/10/20."""
    if not LICENSE_DIR.is_dir():
        raise SourceMissing(f"{LICENSE_DIR} does not exist: apt-get install -y base-files")
    raw: dict[str, list[str]] = {}
    notes = []
    for name in LICENSES:
        path = LICENSE_DIR / name
        if not path.is_file():
            note = f"{name} dropped: {path} is missing"
            LOG.warning("license-clause: %s", note)
            notes.append(note)
            continue
        raw[name] = license_paragraphs(path.read_text(encoding="utf-8", errors="replace"))
    paragraphs = drop_shared(raw)
    for name in list(paragraphs):
        n, shared = len(paragraphs[name]), len(raw[name]) - len(paragraphs[name])
        LOG.info("license-clause: %s: %d paragraphs of %d-%d characters (%d shared with another licence dropped)",
                 name, n, MIN_PARAGRAPH, MAX_PARAGRAPH, shared)
        if n < MIN_LICENSE_PARAGRAPHS:
            note = f"{name} dropped: only {n} usable paragraphs (< {MIN_LICENSE_PARAGRAPHS})"
            LOG.warning("license-clause: %s", note)
            notes.append(note)
            del paragraphs[name]
    if len(paragraphs) < 2:
        raise SourceMissing(f"license-clause: only {len(paragraphs)} licences in {LICENSE_DIR} give enough text")
    splits = stratified_split(paragraphs, lambda n: proportional_counts(n, LICENSE_FRACTIONS, LICENSE_TRAIN_CAP),
                              random.Random(f"license-clause-{seed}"))
    return splits, notes


# --- tasks 3 and 4: man-pair, whatis ----------------------------------------


def command_pages(seed: int, task: str) -> list[ManPage]:
    """Section 1 and 8 pages, one per name and per description, shuffled with the task's seed."""
    pages = unique_pages(p for p in man_index() if p.section in GEN_SECTIONS)
    random.Random(f"{task}-{seed}").shuffle(pages)
    return pages


def build_man_pair(seed: int) -> tuple[Splits, list[ManPage]]:
    """(name, description) -> match / mismatch; each name once with its own and once with another description."""
    rng = random.Random(f"man-pair-pairs-{seed}")
    pages = command_pages(seed, "man-pair")
    name_caps = {s: c // 2 for s, c in PAIR_CAPS.items()}
    by_split = fill_splits([[p] for p in pages], name_caps)
    splits: Splits = {}
    used: list[ManPage] = []
    for split in SPLITS:
        chosen = by_split[split]
        used.extend(chosen)
        order = list(range(len(chosen)))
        rng.shuffle(order)
        records: list[Record] = []
        for i, idx in enumerate(order):
            page = chosen[idx]
            other = chosen[order[(i + 1) % len(order)]]  # a random derangement: every description is used once
            records.append({"text": page.name, "text_pair": page.description, "label": "match"})
            records.append({"text": page.name, "text_pair": other.description, "label": "mismatch"})
        rng.shuffle(records)
        splits[split] = records
    return splits, used


def build_whatis(seed: int) -> tuple[Splits, list[ManPage]]:
    """Name and section -> the page's one-line description (prompt/completion)."""
    by_split = fill_splits([[p] for p in command_pages(seed, "whatis")], WHATIS_CAPS)
    splits: Splits = {
        split: [{"prompt": WHATIS_PROMPT.format(name=p.name, section=p.section), "completion": " " + p.description}
                for p in pages] for split, pages in by_split.items()}
    return splits, [p for pages in by_split.values() for p in pages]


# --- task 5: man-options ----------------------------------------------------


def strip_formatting(text: str) -> str:
    """Remove backspace overstriking (what ``col -b`` does) and ANSI escapes from rendered man output."""
    text = ANSI.sub("", text)
    while OVERSTRIKE.search(text):
        text = OVERSTRIKE.sub("", text)
    return text.replace("\x08", "")


def is_option_tag(tag: str) -> bool:
    """True for ``-x``, ``--long``, ``-x, --long=ARG``, ``-f FILE``, ``--color[=WHEN]``, ... (every part)."""
    if len(tag) > MAX_TAG_CHARS:
        return False
    return all(TAG_PART.match(part) for part in re.split(r",\s+", tag))


def join_lines(lines: Sequence[str]) -> str:
    """Join wrapped lines: a word broken after a hyphen is rejoined, other breaks become one space."""
    out = ""
    for line in (x.strip() for x in lines):
        if not out:
            out = line
        elif out.endswith("\u2010"):  # groff's own hyphenation: drop the hyphen
            out = out[:-1] + line
        elif re.search(r"[A-Za-z]-$", out) and line[:1].isalpha():
            out += line
        else:
            out += " " + line
    return collapse(out.translate(DASHES))


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def parse_options(rendered: str) -> list[tuple[str, str]]:
    """``(tag, description)`` of the option entries of a rendered page's OPTIONS / DESCRIPTION sections.

    An entry is an indented line starting with ``-x`` or ``--long`` (the tag, optionally followed on the same
    line, after two or more spaces, by the start of the description) and its description paragraph: the
    following lines indented deeper than the tag, up to a blank line."""
    lines = strip_formatting(rendered).expandtabs().splitlines()
    entries: list[tuple[str, str]] = []
    heading = ""
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        i += 1
        if line and not line[0].isspace():
            heading = line.strip().upper()
            continue
        if "OPTION" not in heading and heading != "DESCRIPTION":
            continue
        m = TAG_LINE.match(line.translate(DASHES))  # the translation keeps every character's position
        if m is None or not is_option_tag(m["tag"].strip()):
            continue
        tag_indent = len(m["indent"])
        if m["rest"]:
            body_indent = m.start("rest")
            body = [line[body_indent:]]
            while i < len(lines) and lines[i].strip() and indent_of(lines[i]) == body_indent:
                body.append(lines[i])
                i += 1
        else:
            body = []
            while i < len(lines) and lines[i].strip() and indent_of(lines[i]) > tag_indent:
                body.append(lines[i])
                i += 1
        if body:
            entries.append((m["tag"].strip(), join_lines(body)))
    return entries


def render_page(path: Path, man: str = "man") -> str | None:
    """The page rendered as plain text at 100 columns without hyphenation or justification, or None."""
    cmd = [man, "--nh", "--nj", "-P", "cat", "-l", str(path)]
    try:
        result = subprocess.run(cmd, capture_output=True, env={**os.environ, **MAN_ENV}, timeout=RENDER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        LOG.debug("man-options: %s took over %.0f s, skipped", path, RENDER_TIMEOUT_S)
        return None
    if result.returncode != 0 or not result.stdout:
        LOG.debug("man-options: %s failed to render (rc=%d)", path, result.returncode)
        return None
    return result.stdout.decode("utf-8", errors="replace")


def build_man_options(seed: int) -> tuple[Splits, list[ManPage], list[str]]:
    """Command and option tag -> the option's description, from rendered section-1 pages."""
    man = require_tool("man", "man-db")
    notes: list[str] = []
    candidates: list[ManPage] = []
    seen_files: set[Path] = set()
    for page in unique_pages(p for p in man_index() if p.section == "1"):
        real = page.path.resolve()
        if real not in seen_files and not page.name.startswith("gcloud"):
            seen_files.add(real)
            candidates.append(page)
    random.Random(f"man-options-{seed}").shuffle(candidates)
    start = time.monotonic()
    parsed: list[tuple[ManPage, list[tuple[str, str]]]] = []
    seen_text: set[str] = set()
    rendered = 0
    for page in candidates[:MAX_RENDER_PAGES]:
        if time.monotonic() - start > RENDER_BUDGET_S:
            note = (f"rendering stopped after {RENDER_BUDGET_S:.0f} s at {rendered} pages: the set depends on the "
                    "machine's speed")
            LOG.warning("man-options: %s", note)
            notes.append(note)
            break
        text = render_page(page.path, man)
        rendered += 1
        if text is None:
            continue
        digest = hashlib.sha256(text.split("\n", 1)[-1].encode()).hexdigest()
        if digest in seen_text:
            continue  # the same page under another name
        seen_text.add(digest)
        entries = parse_options(text)
        if entries:
            parsed.append((page, entries))
    LOG.info("man-options: rendered %d pages in %.1f s, %d with option entries (%d entries)", rendered,
             time.monotonic() - start, len(parsed), sum(len(e) for _, e in parsed))
    # Descriptions found in more than one command (--help, --version boilerplate) are dropped.
    owners = Counter(key for _, entries in parsed for key in {normalise(d) for _, d in entries})
    groups: list[list[tuple[ManPage, Record]]] = []
    for page, entries in parsed:
        keep, seen = [], set()
        for tag, desc in entries:
            key = normalise(desc)
            if MIN_OPTION_DESC <= len(desc) <= MAX_OPTION_DESC and owners[key] == 1 and key not in seen \
                    and desc[0] in DESC_START and tag not in {t for t, _ in keep}:
                seen.add(key)
                keep.append((tag, desc))
        if not keep:
            continue
        picked = sorted(random.Random(f"man-options-{seed}-{page.name}").sample(
            range(len(keep)), min(MAX_OPTIONS_PER_COMMAND, len(keep))))
        groups.append([
            (page, {"messages": [{"role": "user", "content": OPTION_PROMPT.format(command=page.name, tag=keep[j][0])},
                                 {"role": "assistant", "content": keep[j][1]}]}) for j in picked])
    by_split = fill_splits(groups, OPTION_CAPS)
    splits: Splits = {split: [rec for _, rec in items] for split, items in by_split.items()}
    commands = {split: {page.name for page, _ in items} for split, items in by_split.items()}
    if commands["train"] & commands["validation"] or commands["train"] & commands["test"] \
            or commands["validation"] & commands["test"]:
        raise SystemExit("man-options: a command is in two splits")
    used = list({page.name: page for items in by_split.values() for page, _ in items}.values())
    total = sum(len(v) for v in splits.values())
    if total < sum(OPTION_CAPS.values()):
        LOG.warning("man-options: only %d of %d examples", total, sum(OPTION_CAPS.values()))
    return splits, used, notes


# --- output -----------------------------------------------------------------


def write_jsonl(path: Path, records: list[Record]) -> str:
    """Write ``records`` as JSON Lines and return the file's SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records).encode("utf-8")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def texts_of(rec: Record) -> tuple[str, str]:
    """The (input, target) texts of a record, whatever its format."""
    if "messages" in rec:
        msgs: list[dict[str, str]] = rec["messages"]  # type: ignore[assignment]
        return msgs[0]["content"], msgs[-1]["content"]
    if "prompt" in rec:
        return str(rec["prompt"]), str(rec["completion"])
    if "text_pair" in rec:
        return str(rec["text"]), str(rec["text_pair"])
    return str(rec["text"]), ""


def mean(values: Sequence[int]) -> float:
    return sum(values) / len(values) if values else 0.0


def log_splits(task: str, splits: Splits) -> None:
    """Log examples, classes (with counts) or mean characters, per split."""
    for split in SPLITS:
        recs = splits[split]
        pairs = [texts_of(r) for r in recs]
        inputs, targets = [a for a, _ in pairs], [b for _, b in pairs]
        if recs and "label" in recs[0]:
            labels = Counter(str(r["label"]) for r in recs)
            classes = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
            extra = f", mean text {mean([len(t) for t in inputs]):.0f} chars"
            if "text_pair" in recs[0]:
                extra += f", mean text_pair {mean([len(t) for t in targets]):.0f} chars"
            LOG.info("%s/%s: %d examples, %d classes (%s)%s", task, split, len(recs), len(labels), classes, extra)
        else:
            LOG.info("%s/%s: %d examples, mean prompt %.0f chars, mean answer %.0f chars", task, split, len(recs),
                     mean([len(t) for t in inputs]), mean([len(t) for t in targets]))


LICENCE_TEXT = {
    "man": ("Debian man pages under `/usr/share/man/manN` (English pages only), read with `man-db`'s "
            "`apropos`{render}.", "Each page is under the licence of the package that ships it; see "
            "`/usr/share/doc/<package>/copyright` for each package listed below."),
    "license-clause": ("The licence texts in `/usr/share/common-licenses` (Debian package `base-files`).",
                       "The licence texts themselves: their verbatim copying (and distribution) is permitted; "
                       "changing them is not. Paragraphs are whitespace-normalised here."),
}


def write_task(out_dir: Path, task: str, splits: Splits, seed: int, source: str, licence: str,
               notes: Sequence[str] = (), packages: Counter[str] | None = None) -> None:
    """Write one task's splits and LICENSE-NOTE.md, and log the counts and a short SHA-256 per file."""
    check_disjoint(task, splits, lambda r: [normalise(texts_of(r)[0])])
    folder = out_dir / task
    hashes = {}
    for split in SPLITS:
        hashes[split] = write_jsonl(folder / f"{split}.jsonl", splits[split])
    log_splits(task, splits)
    for split in SPLITS:
        LOG.info("%s/%s.jsonl sha256 %s", task, split, hashes[split][:HASH_CHARS])
    lines = [f"# {task}: licence note", "",
             "Built locally by `scripts/build_heldout_tasks.py` (lora_ft) for measurement only. These files are "
             "never redistributed: rebuild them on the machine that measures.", "",
             f"- **Source:** {source}", f"- **Licence:** {licence}", f"- **Seed:** {seed}",
             "- **Machine dependence:** the contents depend on the packages (and versions) installed here.", "",
             "| split | examples | sha256 |", "|---|---:|---|"]
    lines += [f"| {s} | {len(splits[s])} | `{hashes[s]}` |" for s in SPLITS]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if packages:
        lines += ["", "## Packages whose pages were used (pages per package)", ""]
        lines += [f"- `{pkg}`: {n}" for pkg, n in sorted(packages.items())]
    (folder / "LICENSE-NOTE.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build(task: str, out_dir: Path, seed: int) -> None:
    """Build and write one task."""
    start = time.monotonic()
    man_source, man_licence = LICENCE_TEXT["man"]
    if task == "license-clause":
        splits, notes = build_license_clause(seed)
        write_task(out_dir, task, splits, seed, *LICENCE_TEXT["license-clause"], notes=notes)
    else:
        render = ""
        if task == "man-section":
            splits, pages, notes = build_man_section(seed)
        elif task == "man-pair":
            (splits, pages), notes = build_man_pair(seed), []
            check_disjoint(task, splits, lambda r: [normalise(str(r["text_pair"]))])
        elif task == "whatis":
            (splits, pages), notes = build_whatis(seed), []
            check_disjoint(task, splits, lambda r: [normalise(str(r["completion"]))])
        else:
            splits, pages, notes = build_man_options(seed)
            render = ", rendered with `MANWIDTH=100 man --nh --nj -P cat -l FILE` (section-1 pages)"
        write_task(out_dir, task, splits, seed, man_source.format(render=render), man_licence, notes,
                   packages_of(p.path for p in pages))
    LOG.info("%s: built in %.1f s -> %s", task, time.monotonic() - start, out_dir / task)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and build the tasks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=TASKS, default=list(TASKS), metavar="NAME",
                        help=f"build only these tasks (of {', '.join(TASKS)})")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    out_dir = args.out_dir.expanduser()
    start = time.monotonic()
    for task in TASKS:
        if task in args.only:
            build(task, out_dir, args.seed)
    LOG.info("built %d tasks in %.1f s", len(args.only), time.monotonic() - start)


if __name__ == "__main__":
    main()
