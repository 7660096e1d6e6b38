"""Pure-function tests of scripts/build_heldout_tasks.py (no man, apropos or dpkg is run)."""

from __future__ import annotations

import importlib
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

RENDERED = """\
LS(1)                            User Commands                            LS(1)

NAME
       ls - list directory contents

SYNOPSIS
       ls [-a] [--all] [FILE]...

DESCRIPTION
       List information about the FILEs.  Combine flags like
       -al.

       -a, --all
              do not ignore entries starting with .

       --block-size=SIZE
              with -l, scale sizes by SIZE when printing them; see the non-
              graphic SIZE format below

       -B
       --ignore-backups
              do not list implied entries ending with ~

       -c     with -lt: sort by, and show, ctime; with -l: show ctime and
              sort by name

       -F, --classify[=WHEN]
              append indicator (one of */=>@|) to entries WHEN

              This second paragraph is not part of the entry.

EXAMPLES
       -a     an example, not an option entry
"""


@pytest.fixture
def build(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return importlib.import_module("build_heldout_tasks")


def test_option_parser_reads_each_tag_with_its_first_indented_paragraph_only_from_option_sections(build):
    assert build.parse_options(RENDERED) == [
        ("-a, --all", "do not ignore entries starting with ."),
        ("--block-size=SIZE", "with -l, scale sizes by SIZE when printing them; see the non-graphic SIZE format below"),
        ("--ignore-backups", "do not list implied entries ending with ~"),  # -B alone has no paragraph
        ("-c", "with -lt: sort by, and show, ctime; with -l: show ctime and sort by name"),
        ("-F, --classify[=WHEN]", "append indicator (one of */=>@|) to entries WHEN"),
    ]
    # Overstruck (bold) text rendered for a terminal reads the same once stripped.
    bold = RENDERED.replace("-a, --all", "".join(f"{c}\b{c}" for c in "-a, --all"))
    assert build.parse_options(bold) == build.parse_options(RENDERED)


def test_licence_paragraphs_are_split_on_blank_lines_and_paragraphs_shared_by_two_licences_are_dropped(build):
    shared = "This program is distributed in the hope that it will be useful, but WITHOUT ANY WARRANTY."
    convey = "You may convey verbatim copies of the Program's source code as you receive it."
    as_is = 'Covered Software is provided under this License on an "as is" basis, without warranty.'
    gpl = f"GPL\n\n{shared}\n\n{convey[:60]}\n   {convey[60:]}\n \n{shared}"  # a blank line may hold spaces
    mpl = f"{shared.upper()}\n\n{as_is}"
    paragraphs = {"GPL": build.license_paragraphs(gpl), "MPL": build.license_paragraphs(mpl)}
    assert paragraphs["GPL"] == [shared, convey]  # "GPL" is too short, the repeated paragraph is kept once
    assert build.drop_shared(paragraphs) == {"GPL": [convey], "MPL": [as_is]}


def test_stratified_split_puts_every_class_in_every_split_and_no_text_in_two_splits(build):
    by_label = {"big": [f"big text {i}" for i in range(50)], "small": [f"small text {i}" for i in range(12)],
                "tiny": [f"tiny text {i}" for i in range(4)]}
    splits = build.stratified_split(
        by_label, lambda n: build.proportional_counts(n, build.LICENSE_FRACTIONS, train_cap=30), random.Random(0))
    counts = {s: {lab: sum(r["label"] == lab for r in splits[s]) for lab in by_label} for s in build.SPLITS}
    assert counts == {"train": {"big": 30, "small": 9, "tiny": 2}, "validation": {"big": 5, "small": 1, "tiny": 1},
                      "test": {"big": 10, "small": 2, "tiny": 1}}
    texts = [r["text"] for s in build.SPLITS for r in splits[s]]
    assert len(texts) == len(set(texts)) == 61
    assert all(r["text"].startswith(r["label"]) for s in build.SPLITS for r in splits[s])
    build.check_disjoint("t", splits, lambda r: [r["text"]])
    with pytest.raises(SystemExit, match="'big text 0' is in both"):
        build.check_disjoint("t", {"train": [{"text": "big text 0"}], "validation": [],
                                   "test": [{"text": "Big  text 0."}]}, lambda r: [build.normalise(r["text"])])


def test_man_pairs_are_balanced_and_keep_each_name_and_description_inside_one_split(build, monkeypatch):
    lines = [f"cmd{i} (1)           - does thing number {i} well" for i in range(40)]
    lines += ["alias0 (1)  - does thing number 0 well", "openssl-x (1ssl) - an ssl subsection page",
              "gcloud_x (1) - (unknown subject)", "lib (3) - a library function we do not want"]
    parsed = list(build.parse_apropos(lines, build.GEN_SECTIONS))
    assert len(parsed) == 41 and ("openssl-x", "1ssl") not in {(n, s) for n, s, _ in parsed}
    pages = tuple(build.ManPage(n, s, d, Path(f"/man1/{n}.1.gz")) for n, s, d in parsed)
    monkeypatch.setattr(build, "man_index", lambda: pages)
    monkeypatch.setattr(build, "PAIR_CAPS", {"train": 40, "validation": 10, "test": 20})
    splits, used = build.build_man_pair(seed=0)
    assert {s: len(splits[s]) for s in build.SPLITS} == {"train": 40, "validation": 10, "test": 20}
    assert len(used) == 35 and len({p.description for p in used}) == 35  # alias0 duplicates cmd0's description
    names, descriptions = {}, {}
    for split in build.SPLITS:
        labels = [r["label"] for r in splits[split]]
        assert labels.count("match") == labels.count("mismatch")
        own = {r["text"]: r["text_pair"] for r in splits[split] if r["label"] == "match"}
        for r in splits[split]:
            assert names.setdefault(r["text"], split) == split
            assert descriptions.setdefault(r["text_pair"], split) == split
            if r["label"] == "mismatch":
                assert r["text_pair"] != own[r["text"]]
