"""Build the multi-label example data (``data/debian_tags``) from Debian's package index: a package's one-line
description, labelled with what its debtags say it is about.

Source: the ``Packages`` index of Debian 12 (bookworm) ``main``, amd64, as apt keeps it on this machine
(``/var/lib/apt/lists/*bookworm_main_binary-amd64_Packages.lz4``; ``--packages`` takes another copy, plain, ``.lz4``
or ``.xz``). Of every package with a ``Tag:`` field, the short description is the ``text`` and the ``label`` is the
list of these eight topics whose debtags it carries (an empty list: none of them):

==============  ===============================================================================
``game``        ``use::gameplaying``, ``game::*``
``audio``       ``works-with::audio``, ``sound::*``
``image``       ``works-with::image``, ``works-with-format::png`` / ``jpg``
``network``     ``network::server`` / ``client``, ``protocol::*``
``docs``        ``role::documentation``, ``devel::doc``
``library``     ``devel::library``, ``role::shared-lib``, ``role::devel-lib``
``commandline`` ``interface::commandline``
``graphical``   ``interface::graphical``, ``interface::x11``
==============  ===============================================================================

Descriptions are de-duplicated (the first package of a description keeps it), and of the descriptions whose only
topic is ``library`` (more than half of the index: one per ``lib*`` and ``lib*-dev`` package) 15% are kept, so that
no label is a majority and "predict the prior" scores nothing. The tags are the archive's own, not written for
this task: some are missing (a "C++ library to load and save OpenEXR images" is not tagged ``image``), so no model
is perfect on it. A TF-IDF + logistic regression baseline (one-vs-rest, C=10) reaches micro-F1 0.48 at 0.5 and
0.58 with a 0.3 threshold on the test split: the text carries the signal, and an encoder should do better.

The earlier multi-label example (``docstring_traits``: a docstring labelled with what its code does) was dropped:
on it the same baseline scored 0.60 = always predicting its majority label (``returns``), and lora_ft and the
``Trainer`` both learned only the priors (README, "Encoder tasks").

Deterministic for an index file and seed. Usage::

    python scripts/build_debtags_data.py [--packages FILE] [--out-dir data] [--seed 0]
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import lzma
import random
import subprocess
from pathlib import Path

LOG = logging.getLogger("build_debtags_data")
INDEX = "/var/lib/apt/lists/*_debian_dists_bookworm_main_binary-amd64_Packages*"
TOPICS = {
    "game": ("use::gameplaying", "game::"),
    "audio": ("works-with::audio", "sound::"),
    "image": ("works-with::image", "works-with-format::png", "works-with-format::jpg"),
    "network": ("network::server", "network::client", "protocol::"),
    "docs": ("role::documentation", "devel::doc"),
    "library": ("devel::library", "role::shared-lib", "role::devel-lib"),
    "commandline": ("interface::commandline",),
    "graphical": ("interface::graphical", "interface::x11"),
}
"""Each topic and the debtags that give it: a tag ending in ``::`` is a facet, any of whose tags counts."""
SIZES = {"train": 800, "validation": 200, "test": 400}
KEEP_LIBRARY_ONLY = 0.15


def read_index(path: Path) -> str:
    """The index's text; ``.lz4`` through the ``lz4`` tool (no Python binding is a dependency of lora_ft)."""
    if path.suffix == ".lz4":
        return subprocess.run(["lz4cat", str(path)], check=True, capture_output=True, text=True).stdout
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes()).decode()
    return path.read_text(encoding="utf-8")


def stanzas(text: str) -> list[dict[str, str]]:
    """The index's records as field → value, continuation lines joined to their field."""
    records = []
    for block in text.split("\n\n"):
        record: dict[str, str] = {}
        last = None
        for line in block.splitlines():
            if line.startswith(" ") and last is not None:
                record[last] += " " + line.strip()
            elif ":" in line:
                last, _, value = line.partition(":")
                record[last] = value.strip()
        if record:
            records.append(record)
    return records


def topics(tags: list[str]) -> list[str]:
    return sorted(name for name, marks in TOPICS.items()
                  if any(t == m or (m.endswith("::") and t.startswith(m)) for t in tags for m in marks))


def build(records: list[dict[str, str]], seed: int) -> dict[str, list[dict]]:
    labelled: dict[str, list[str]] = {}
    for r in records:
        text = r.get("Description", "").strip()
        if "Tag" in r and text and text not in labelled:
            labelled[text] = topics([t.strip() for t in r["Tag"].split(",") if t.strip()])
    rows = [{"text": text, "label": label} for text, label in labelled.items()]
    rng = random.Random(seed)
    rng.shuffle(rows)
    rows = [r for r in rows if r["label"] != ["library"] or rng.random() < KEEP_LIBRARY_ONLY]
    out, start = {}, 0
    for split, n in SIZES.items():
        out[split] = rows[start:start + n]
        start += n
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--packages", type=Path, default=None, help=f"the Packages index (default: {INDEX})")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent.parent / "data")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    index = args.packages or next(iter(sorted(glob.glob(INDEX))), None)
    if index is None:
        raise SystemExit(f"no Debian package index at {INDEX}: run `apt-get update`, or give --packages FILE")
    folder = args.out_dir / "debian_tags"
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in build(stanzas(read_index(Path(index))), args.seed).items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                              encoding="utf-8")
        LOG.info("debian_tags/%s: %d examples", split, len(rows))


if __name__ == "__main__":
    main()
