"""``lora-ft compare``: finished (or unfinished) runs side by side, to evaluate and iterate.

What their recipes changed, how far each trained, every metric of every split before and after training (the
union over the runs: whatever metrics the objective or the generation evaluation wrote, blank where a run lacks
one), the first generated samples of the same prompts next to each other, and the runs' loss curves overlaid in
one figure; printed as text and written as Markdown.

It only reads. Runs are opened through ``run.py``, and no run lock is taken, not even for a moment: a reader must
never make a training that starts at the same time refuse. A run that another command is writing now is named in a
warning and compared as it is at that moment: its JSON reports are replaced whole (``storage.write_text``), and the
last line of its JSON-lines files, perhaps half-appended, is left out (``storage.read_rows``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RunError, UsageError
from ..lock import live_holder
from ..recipe.compare import changes, describe_changes, flatten
from ..run import LOCK, OUTPUTS, RESULTS, RUN_CONFIG, SAMPLES, SAMPLES_MD, Run, open_run
from ..storage import read_rows, write_file, write_text

log = logging.getLogger(__name__)

REPORT = "compare.md"
FIGURE = "curves.png"
SAME_IN_EVERY_RUN = {"output_dir"}
"""Recipe keys left out of the differences: every run has its own output_dir."""


@dataclass
class Table:
    """A titled table of strings; ``notes`` are lines printed under it."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


@dataclass
class Sample:
    """One prompt with its reference and the answers to it: the base model's (once when every run's base gave the
    same answer, else one per run), then each run's."""

    prompt: str
    reference: str
    answers: list[tuple[str, str]]


@dataclass
class RunView:
    """One run as read for the comparison.

    Args:
        label: the run's column name (``run_labels``).
        run: the run's folder, resolved recipe and run_info.json.
        results: eval_results.json, None while the run has not finished.
        metrics: the rows of metrics.jsonl.
        samples: the rows of samples.jsonl, None where the run has none.
        writer: the process writing into the run now (``lock.describe``'s words), None when none is.
    """

    label: str
    run: Run
    results: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    samples: list[dict[str, str]] | None
    writer: str | None


@dataclass
class Comparison:
    """What ``lora-ft compare`` prints (``text``) and writes (``markdown``, and the figure of ``build_figure``)."""

    runs: list[RunView]
    tables: list[Table]
    samples: list[Sample]
    notes: list[str]
    report: Path | None = None
    figure: Path | None = None

    def text(self) -> str:
        parts = ["runs: " + ", ".join(f"{v.label} = {v.run.dir}" for v in self.runs)]
        parts += [f"note: {n}" for n in self.notes]
        for t in self.tables:
            parts += ["", *_text_table(t), *t.notes]
        if self.samples:
            parts += ["", f"samples (the first {len(self.samples)} prompts)"]
            margin = len(f"[{len(self.samples)}] ")
            for i, s in enumerate(self.samples, 1):
                rows = [("prompt", s.prompt), ("reference", s.reference), *s.answers]
                width = max(len(who) for who, _ in rows) + 2
                for j, (who, text) in enumerate(rows):
                    lead = (f"[{i}] " if j == 0 else "").ljust(margin)
                    parts.append(lead + _indented(f"{who}:".ljust(width) + text, margin + width))
        return "\n".join(parts) + "\n"

    def markdown(self) -> str:
        parts = ["# Run comparison", "", *(f"- **{v.label}**: `{v.run.dir}`" for v in self.runs)]
        parts += ["", *(f"> {n}" for n in self.notes)] if self.notes else []
        for t in self.tables:
            parts += ["", f"## {t.title}", "", *_markdown_table(t.header, t.rows)]
            parts += ["", *(f"{n}  " for n in t.notes)] if t.notes else []
        parts += ["", "## Loss curves", "", f"![training and validation loss of every run]({FIGURE})"]
        if self.samples:
            parts += ["", f"## Samples (the first {len(self.samples)} prompts)"]
            for i, s in enumerate(self.samples, 1):
                rows = [["prompt", s.prompt], ["reference", s.reference], *map(list, s.answers)]
                parts += ["", *_markdown_table(["", f"sample {i}"], rows)]
        return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ reading
def compare_runs(run_dirs: list[Path], out: Path | None, samples: int = 3) -> Comparison:
    """Read the runs and compare them; with ``out``, write ``out/compare.md`` and ``out/curves.png`` there.

    Args:
        run_dirs: two or more run folders (``output_dir``), each given once.
        out: the folder for the report and the figure (created; other files in it stay), None to write nothing.
        samples: how many of the first prompts of samples.jsonl to set side by side (0: none).
    """
    paths = [Path(p) for p in run_dirs]
    if len(paths) < 2:
        raise UsageError(f"compare: give at least two run folders to compare (got {len(paths)}: "
                         f"{', '.join(map(str, paths)) or 'none'})")
    _check_distinct(paths)
    views = [_load(p, label) for p, label in zip(paths, run_labels(paths), strict=True)]
    if out is not None:
        check_out(Path(out), views)
    shown, sample_notes = align_samples(views, samples)
    comparison = Comparison(views, [recipe_table(views), progress_table(views), metrics_table(views)], shown,
                            [*_run_notes(views), *sample_notes])
    if out is not None:
        write_report(comparison, Path(out))
    return comparison


def run_labels(paths: list[Path]) -> list[str]:
    """Each run's column name: its folder's name, with as many parent folders as it takes to tell the runs apart
    (``a/run`` and ``b/run``)."""
    parts = [p.resolve().parts for p in paths]
    for k in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]  # only for paths that are the same folder, which _check_distinct refuses


def default_out(run_dirs: list[Path]) -> Path:
    """``compare-<A>-vs-<B>`` in the current directory (the runs' labels, characters other than letters, digits,
    ``.``, ``_`` and ``-`` as ``_``); ``compare-<A>-and-<N>-more`` when that name would pass 100 characters."""
    names = [re.sub(r"[^A-Za-z0-9._-]+", "_", label) for label in run_labels([Path(p) for p in run_dirs])]
    name = "compare-" + "-vs-".join(names)
    return Path(name if len(name) <= 100 else f"compare-{names[0][:60]}-and-{len(names) - 1}-more")


def _check_distinct(paths: list[Path]) -> None:
    seen: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            same = f"{p} is given twice" if str(seen[key]) == str(p) else f"{seen[key]} and {p} are the same folder"
            raise UsageError(f"compare: {same}; give each run once")
        seen[key] = p


def _load(path: Path, label: str) -> RunView:
    run = open_run(path, need_adapter=False)
    writer = live_holder(run.folder / LOCK)
    if writer:
        log.warning("%s is being written now by %s: compared as it is at this moment", run.dir, writer)
    return RunView(label, run, _read_results(run), run.folder.read_metrics(), _read_samples(run), writer)


def _read_results(run: Run) -> dict[str, Any] | None:
    path = run.folder / RESULTS
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunError(f"{path} is not JSON ({e.msg}); evaluate the run again (lora-ft eval) or delete the "
                       "file") from None
    if not isinstance(results, dict):
        raise RunError(f"{path}: expected {{\"before\": ..., \"after\": ...}}; evaluate the run again or delete it")
    return results


def _read_samples(run: Run) -> list[dict[str, str]] | None:
    """samples.jsonl's rows with every field a string (a missing reference or answer is an empty one)."""
    path = run.folder / SAMPLES
    if not path.is_file():
        return None
    rows = []
    for n, row in enumerate(read_rows(path), 1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise RunError(f"{path}: row {n} has no 'prompt' text; each row is {{\"prompt\", \"reference\", "
                           "\"before\", \"after\"}: repair or delete the file")
        rows.append({k: "" if row.get(k) is None else str(row[k]) for k in ("prompt", "reference", "before",
                                                                            "after")})
    return rows


def check_out(out: Path, views: list[RunView]) -> None:
    """Refuse an ``--out`` that is a file, a run folder (its own curves.png would be replaced) or lies among a
    run's outputs (``--overwrite`` of that run would delete the report)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"compare: --out {out} is a file; give a folder for {REPORT} and {FIGURE}")
    target = out.resolve()
    if (out / RUN_CONFIG).is_file():
        raise UsageError(f"compare: --out {out} is a run folder, whose {FIGURE} is the run's own; choose another "
                         "folder")
    for v in views:
        owned = [v.run.dir.resolve() / name for name in OUTPUTS]
        if target == v.run.dir.resolve() or any(target == o or o in target.parents for o in owned):
            raise UsageError(f"compare: --out {out} lies among the outputs of run {v.run.dir}, which training "
                             "writes and --overwrite replaces; choose another folder")


def _run_notes(views: list[RunView]) -> list[str]:
    notes = []
    for v in views:
        if v.writer:
            notes.append(f"{v.label} is being written now by {v.writer}: compared as it is at this moment; compare "
                         "again once it has finished")
        if v.results is None:
            notes.append(f"{v.label} has no {RESULTS} (training has not finished): compared as far as it got, its "
                         "before/after cells are blank")
    return notes


# ------------------------------------------------------------------------------------------------ tables
def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def _recipe_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def recipe_table(views: list[RunView]) -> Table:
    """Every recipe value (resolved, as in run_config.yaml) in which some run differs from the first one."""
    first = views[0].run.recipe
    diffs = {v.label: {k: d for k, d in changes(first, v.run.recipe).items() if k not in SAME_IN_EVERY_RUN}
             for v in views[1:]}
    keys = sorted({k for diff in diffs.values() for k in diff})
    values = [flatten(v.run.recipe.model_dump(mode="json")) for v in views]
    rows = [[k, *(_recipe_value(d[k]) if k in d else "(none)" for d in values)] for k in keys]
    notes = [f"{label} against {views[0].label}: {describe_changes(diff, list(diff))}"
             for label, diff in diffs.items() if diff]
    return Table("recipe differences", ["key", *(v.label for v in views)], rows,
                 notes or ["the recipes are the same (apart from output_dir)"])


def progress_table(views: list[RunView]) -> Table:
    """How far each run got: finished or not, best step, steps done, why it stopped early."""
    def steps(v: RunView) -> str:
        if v.run.info.get("steps_done") is not None:
            return _cell(v.run.info["steps_done"])
        logged = [r["step"] for r in v.metrics if "split" not in r and "step" in r]
        return f"{max(logged)} (logged so far)" if logged else "0"

    def status(v: RunView) -> str:
        return "being written" if v.writer else "finished" if v.results is not None else "unfinished"

    rows = [["status", *map(status, views)],
            ["best step", *(_cell(v.run.info.get("best_step")) for v in views)],
            ["steps done", *map(steps, views)],
            ["stopped early", *(v.run.info.get("stopped") or ("no" if v.results is not None else "")
                                for v in views)]]
    return Table("training", ["", *(v.label for v in views)], rows)


def split_results(results: dict[str, Any] | None) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """eval_results.json as split → (metrics before, metrics after); the forgetting guard's as split
    ``forgetting``."""
    if not results:
        return {}
    before, after = results.get("before") or {}, results.get("after") or {}
    out = {s: (before.get(s) or {}, after.get(s) or {}) for s in [*before, *after]}
    if isinstance(results.get("forgetting"), dict):
        out["forgetting"] = (results["forgetting"].get("before") or {}, results["forgetting"].get("after") or {})
    return out


def metrics_table(views: list[RunView]) -> Table:
    """``before → after`` of every metric of every split any run has (blank where a run lacks it), in the order
    the runs first list them."""
    per_run = [split_results(v.results) for v in views]
    keys: dict[tuple[str, str], None] = {}  # ordered set
    for splits in per_run:
        for split, (before, after) in splits.items():
            keys.update(dict.fromkeys((split, m) for m in [*before, *after]))
    rows = []
    for split, metric in keys:
        cells = []
        for splits in per_run:
            before, after = splits.get(split, ({}, {}))
            b, a = _cell(before.get(metric)), _cell(after.get(metric))
            cells.append(f"{b or '-'} → {a or '-'}" if b or a else "")
        rows.append([split, metric, *cells])
    return Table("metrics (before → after training)", ["split", "metric", *(v.label for v in views)], rows)


def align_samples(views: list[RunView], n: int) -> tuple[list[Sample], list[str]]:
    """The first ``n`` prompts (with their references) that every run with samples.jsonl has, in the first such
    run's order, each with every run's answers; notes where a run has no samples or the prompts differ. Samples
    are matched by prompt and reference, never by position: runs on different data are not set side by side."""
    if n <= 0:
        return [], []
    have = [v for v in views if v.samples is not None]
    notes = [f"{v.label} has no {SAMPLES}" for v in views if v.samples is None]
    if not have:
        return [], notes
    # reversed: the first row of a prompt that occurs twice wins
    index = [{(s["prompt"], s["reference"]): s for s in reversed(v.samples)} for v in have]
    keys = list(dict.fromkeys((s["prompt"], s["reference"]) for s in have[0].samples))
    shared = [k for k in keys if all(k in i for i in index)][:n]
    if not shared:
        return [], [*notes, "the runs' samples share no prompt (generated from different data?): not set side "
                            f"by side; see each run's {SAMPLES_MD}"]
    if shared != keys[:n]:
        notes.append(f"the runs' first prompts differ: shown are the first {len(shared)} prompts they all have")
    out = []
    for key in shared:
        befores = [(v.label, i[key]["before"]) for v, i in zip(have, index, strict=True)]
        if len({text for _, text in befores}) == 1:
            answers = [("before training", befores[0][1])]
        else:
            answers = [(f"before training ({label})", text) for label, text in befores]
        answers += [(v.label, i[key]["after"]) for v, i in zip(have, index, strict=True)]
        out.append(Sample(key[0], key[1], answers))
    return out, notes


def _text_table(t: Table) -> list[str]:
    rows = [t.header, *t.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(t.header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return [t.title, line(t.header), "  ".join("-" * w for w in widths), *map(line, t.rows)]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda c: c.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    return ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(esc, r)) + " |" for r in rows)]


def _indented(text: str, indent: int) -> str:
    """Continuation lines of a multi-line answer under its first line."""
    return text.replace("\n", "\n" + " " * indent)


# ------------------------------------------------------------------------------------------------ figure
def loss_curves(rows: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, training loss) and (step, validation loss) points of metrics.jsonl's rows. A validation row marked
    ``final`` is the restored best adapter's score logged at the last step, not a point of the curve."""
    train = [(r["step"], r["loss"]) for r in rows if "split" not in r and "loss" in r]
    val = [(r["step"], r["loss"]) for r in rows
           if r.get("split") == "validation" and "loss" in r and not r.get("final")]
    return train, val


def build_figure(views: list[RunView]):
    """Two panels, training loss and validation loss over optimizer steps, one colour per run (returns a
    ``matplotlib.figure.Figure``)."""
    # Heavy (fonts, backends): imported only when a comparison draws. A bare Figure needs neither pyplot's global
    # state nor a display.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    train_ax, val_ax = fig.subplots(1, 2, sharey=True)
    for i, v in enumerate(views):
        train, val = loss_curves(v.metrics)
        if train:
            train_ax.plot(*zip(*train, strict=True), color=f"C{i % 10}", alpha=0.8, label=v.label)
        if val:
            val_ax.plot(*zip(*val, strict=True), "o-", color=f"C{i % 10}", label=v.label)
    for ax, title in ((train_ax, "training loss"), (val_ax, "validation loss")):
        ax.set(xlabel="optimizer step", title=title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    train_ax.set_ylabel("loss")
    fig.tight_layout()
    return fig


def write_report(comparison: Comparison, out: Path) -> None:
    """``out/curves.png`` then ``out/compare.md`` (which shows it), each replaced whole (``storage.write_file``):
    an interrupted compare leaves each file either as it was or new."""
    out.mkdir(parents=True, exist_ok=True)
    fig = build_figure(comparison.runs)
    write_file(out / FIGURE, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    write_text(out / REPORT, comparison.markdown())
    comparison.report, comparison.figure = out / REPORT, out / FIGURE
