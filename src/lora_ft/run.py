"""A run folder (``output_dir``): the name of every file in it, starting or clearing one, and reading one back.

Training writes a run through ``RunFolder``; every later command (eval, merge, push, chat, predict) opens it with
``open_run`` and reads what it needs through ``Run``: the resolved recipe, the label map, the base model's source,
the adapter model as training evaluated it, and the merges written from it. No other module spells a run's file
names. (About 450 lines: a run's starting adapter, ``lora.init_from``, is checked here against the run it came
from, next to the files it is read from.)
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .errors import RecipeError, RunError, first_line
from .lock import RunLock
from .modeling.loading import check_folder, load_model, remote_code, resolve_source
from .recipe import Recipe, load_recipe, looks_local
from .recipe.defaults import sources_comment
from .storage import cut_short, read_rows, write_folder, write_text

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.yaml"
"""The fully resolved recipe: later commands need nothing retyped."""
RUN_INFO = "run_info.json"
METRICS = "metrics.jsonl"
RESULTS = "eval_results.json"
CURVES = "curves.png"
SAMPLES = "samples.jsonl"
"""The generation evaluation's answers: one object per example (prompt, reference, before, after, …)."""
SAMPLES_MD = "samples.md"
"""The same as a readable table, with the generated metrics before and after training."""
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
MERGED = "merged"
HUB = "hub"
MERGE_REPORT = "merge_report.json"
EXPORT_REPORT = "export_report.json"
GGUF_DIR = "gguf"
"""``lora-ft export --format gguf`` writes its files (and the Ollama Modelfile) here unless told otherwise."""
MERGE_MARKER = "lora_ft_merge.json"
"""Written into every merged folder: ``merge --out`` only ever replaces a folder carrying this run's marker."""
START_ADAPTER = "start_adapter"
"""With ``lora.init_from``: a copy of the adapter training started from (a preference objective's reference)."""
OBJECTIVE_CACHE = "objective_cache.safetensors"
"""What the objective computed from the starting model before training (reference log-probs), for a resume."""
LOCK = ".lora_ft.lock"
"""The run lock (``lock.py``): one command at a time writes into a run folder."""
REPLACED = ".lora_ft.replaced"
"""``--overwrite``: the old run's outputs wait here until the new run has saved something of its own."""
OUTPUTS = (CHECKPOINTS, ADAPTER, MERGED, HUB, START_ADAPTER, RUN_CONFIG, RUN_INFO, METRICS, RESULTS, CURVES,
           SAMPLES, SAMPLES_MD, MERGE_REPORT, GGUF_DIR, EXPORT_REPORT)
"""What belongs to a run (``--overwrite`` replaces these; other files in the folder stay). ``OBJECTIVE_CACHE`` is
not: it is keyed by the data and the starting model, and the new run has just written its own there."""


RETRAIN = "restore it from a copy, or train the run again with --overwrite"
FIXES = {
    RUN_CONFIG: f"restore it (every checkpoint in {CHECKPOINTS}/ keeps a copy), or train the run again with "
                "--overwrite",
    RESULTS: "delete it (training's final evaluation; lora-ft eval measures the run again)",
    MERGE_REPORT: "delete it (it only records earlier merges; the next merge writes a new one)",
    EXPORT_REPORT: "delete it (it only records earlier exports; the next export writes a new one)",
}
"""What to do about a run file that does not read (a crash of an older version while writing it, a damaged
copy): the one line of ``damaged`` ends with it; files not named here take ``RETRAIN``."""


def damaged(path: Path, problem: str) -> RunError:
    """The error for a run file that does not read: the file, what is wrong, and what to do about it."""
    return RunError(f"{path} {problem}; {FIXES.get(path.name, RETRAIN)}")


def run_config_cut(text: str, parsed: bool = False) -> str | None:
    """How a ``run_config.yaml`` lost its end, or None when it is whole: ``Recipe.dump`` writes every key, and
    ``output_dir`` (the last field, in every version) last, so a cut on a line end shows by its absence.
    ``parsed``: the text is known to parse, so a missing ``output_dir`` is a cut (not garbage)."""
    if cut_short(text):
        return "its last line is unfinished"
    if parsed and not re.search(r"^output_dir:", text, re.MULTILINE):
        return "it ends before output_dir, the last key a run writes"
    return None


def read_run_config(path: Path) -> Recipe:
    """A run's (or a checkpoint's) ``run_config.yaml``: cut short, malformed YAML, or keys this version does not
    know, are a ``damaged`` run file, not a recipe to edit."""
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    if run_config_cut(text):
        raise damaged(path, f"is cut short ({run_config_cut(text)})")
    try:
        recipe = load_recipe(path)
    except RecipeError as e:
        raise damaged(path, "cannot be read back as this run's recipe (" + str(e).removeprefix(f"{path}: ") + ")") \
            from None
    if run_config_cut(text, parsed=True):
        raise damaged(path, f"is cut short ({run_config_cut(text, parsed=True)})")
    return recipe


def labels_of(info: dict[str, Any]) -> dict[int, str] | None:
    """The label map of ``run_info.json`` (JSON keys are strings; class ids are ints)."""
    labels = info.get("id2label")
    return {int(k): v for k, v in labels.items()} if labels else None


class RunFolder:
    """The files of one run by name, and what training does to the folder as a whole."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    def holds_run(self) -> bool:
        return (self.path / RUN_CONFIG).exists()

    def lock(self) -> RunLock:
        """The run lock (acquire it, or use it as a context manager)."""
        return RunLock(self.path / LOCK, f"output_dir {self.path}")

    def check_location(self, recipe: Recipe) -> None:
        """Refuse an output_dir a run must not write into: the current directory or one above it (a run's files,
        and what ``--overwrite`` replaces, would mix with everything there), a file, the base model's folder or a
        folder inside it, or a folder whose run outputs hold one of the recipe's inputs."""
        here, cwd = self.path.resolve(), Path.cwd().resolve()
        if here == cwd or here in cwd.parents:
            where = "the current directory" if here == cwd else f"a parent of the current directory ({cwd})"
            raise RecipeError(f"output_dir {str(self.path)!r} is {where}: a run writes adapter/, checkpoints/, "
                              "metrics.jsonl... there and --overwrite replaces them; give the run a folder of its own, "
                              "e.g. runs/my-run")
        if self.path.exists() and not self.path.is_dir():
            raise RecipeError(f"output_dir {self.path} is a file; give the run a folder of its own")
        d = recipe.data
        inputs = {"model.name": recipe.model.name, "data.train": d.train, "data.validation": d.validation,
                  "data.test": d.test, "forgetting.reference": recipe.forgetting.reference}
        owned = [here / name for name in OUTPUTS]
        for field, value in inputs.items():
            if not value or not (looks_local(value) or Path(value).expanduser().exists()):
                continue  # a Hub id or an example
            path = Path(value).expanduser().resolve()
            if field == "model.name" and (here == path or path in here.parents):
                raise RecipeError(f"output_dir {self.path} is inside the base model's folder {value}: choose a "
                                  "folder of its own for the run")
            if any(path == o or o in path.parents for o in owned):
                raise RecipeError(f"{field} {value} lies among the outputs of output_dir {self.path}, which a run "
                                  "writes and --overwrite replaces: move it, or choose another output_dir")

    def check_new(self, resume: str | None, overwrite: bool) -> None:
        """A folder that already holds a run is never trained into silently."""
        if resume is None and not overwrite and self.holds_run():
            raise RunError(f"output_dir {self.path} already holds a run; pass --resume latest to continue it, "
                           "--overwrite to replace it, or choose another output_dir")

    # ------------------------------------------------------------------ --overwrite: the old run waits aside
    @property
    def aside(self) -> Path:
        return self.path / REPLACED

    def set_aside(self) -> None:
        """``--overwrite``: move the old run's outputs aside (renames, no copies), so none of them (a checkpoint that
        ``--resume latest`` would pick, a stale adapter or report) is mistaken for the new run's, and nothing of
        the old run is lost before the new one has saved something (``drop_aside``, ``restore_aside``)."""
        shutil.rmtree(self.aside, ignore_errors=True)
        present = [n for n in OUTPUTS if (self.path / n).exists()]
        if present:
            self.aside.mkdir()
            for name in present:
                (self.path / name).rename(self.aside / name)

    def drop_aside(self) -> None:
        """The new run saved its first checkpoint or its adapter: the old run is deleted."""
        if self.aside.exists():
            shutil.rmtree(self.aside)
            log.info("--overwrite: the previous run in %s was deleted (the new run has saved its own)", self.path)

    def restore_aside(self) -> None:
        """The new run ended before saving anything: its files go, the old run comes back as it was."""
        if not self.aside.exists():
            return
        for name in OUTPUTS:
            new = self.path / name
            if new.is_dir():
                shutil.rmtree(new)
            else:
                new.unlink(missing_ok=True)
        for old in self.aside.iterdir():
            old.rename(self.path / old.name)
        self.aside.rmdir()
        log.warning("--overwrite: the new run saved nothing, so the previous run in %s was put back", self.path)

    def recover_aside(self) -> None:
        """After a kill while an old run waited aside: the new run's checkpoint or adapter, if it saved one, wins;
        otherwise the old run comes back."""
        if self.aside.exists():
            saved = self.adapter.exists() or any(self.checkpoints.glob("step-*"))
            self.drop_aside() if saved else self.restore_aside()

    def start(self, recipe: Recipe, info: dict[str, Any], fresh: bool) -> None:
        """Write the resolved recipe and the run's facts; a fresh run starts a new metrics log."""
        self.path.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.metrics.unlink(missing_ok=True)
        else:
            self._drop_unfinished_row()
        resolved = info.get("resolved")
        write_text(self.path / RUN_CONFIG, recipe.dump() + (sources_comment(resolved) if resolved else ""))
        self.write_json(RUN_INFO, info)

    def _drop_unfinished_row(self) -> None:
        """Before a resumed run appends: cut a last row a kill left unfinished, or the next row would be glued to
        it (``read_rows`` skips only an unfinished *last* line)."""
        if self.metrics.is_file():
            data = self.metrics.read_bytes()
            if data and not data.endswith(b"\n"):
                write_text(self.metrics, data[:data.rfind(b"\n") + 1].decode("utf-8", errors="replace"))

    def log(self, row: dict[str, Any]) -> None:
        """Append one row to ``metrics.jsonl``."""
        with self.metrics.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def keep_start_adapter(self, adapter: str | Path) -> None:
        """A copy of the adapter training starts from (``lora.init_from``): the reference later commands score
        against, wherever the original goes."""
        write_folder(self.path / START_ADAPTER, lambda tmp: shutil.copytree(adapter, tmp, dirs_exist_ok=True),
                     "free disk space and train again")

    def write_json(self, name: str, value: Any) -> None:
        write_text(self.path / name, json.dumps(value, indent=2))

    def write_samples(self, jsonl: str, markdown: str) -> None:
        write_text(self.path / SAMPLES, jsonl)
        write_text(self.path / SAMPLES_MD, markdown)

    def read_samples(self) -> list[dict[str, Any]]:
        """The rows of ``samples.jsonl`` (none when the run did not generate)."""
        return read_rows(self.path / SAMPLES)

    def record(self, name: str, key: str, entry: Any) -> Path:
        """Add (or replace) one entry of a JSON report (``merge_report.json``, ``export_report.json``)."""
        report = self.read_json(name)
        report[key] = entry
        self.write_json(name, report)
        return self.path / name

    def read_json(self, name: str) -> Any:
        """A JSON file of the run ({} when absent); one that does not parse is a ``damaged`` run file."""
        path = self.path / name
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise damaged(path, f"is not valid JSON ({first_line(e)})") from None

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_rows(self.metrics)

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` with ``rows`` (a resumed run drops the rows of an abandoned continuation)."""
        write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))


@dataclass
class Run:
    """A training run read back from its folder, without re-typing anything."""

    folder: RunFolder
    recipe: Recipe
    info: dict[str, Any]

    @property
    def dir(self) -> Path:
        return self.folder.path

    @property
    def adapter_dir(self) -> Path:
        return self.folder.adapter

    @property
    def start_adapter(self) -> Path | None:
        """The adapter training started from (``lora.init_from``), None for a fresh adapter."""
        folder = self.folder / START_ADAPTER
        return folder if (folder / "adapter_config.json").is_file() else None

    @property
    def causal(self) -> bool:
        return self.recipe.model.task == "causal_lm"

    @property
    def id2label(self) -> dict[int, str] | None:
        return labels_of(self.info)

    @property
    def compute_dtype(self) -> str:
        return self.info.get("compute_dtype") or "fp32"

    @property
    def quantized(self) -> bool:
        return self.recipe.model.quant != "none"

    def source(self) -> str:
        """The base model as training loaded it; re-resolved from the recipe when that folder is gone
        (e.g. a run copied to another machine)."""
        src = self.info.get("source")
        if src and (Path(src).is_dir() or not Path(src).is_absolute()):
            return src
        return resolve_source(self.recipe.model.name)


def open_run(run_dir: str | Path, need_adapter: bool = True) -> Run:
    """The run in ``run_dir``; ``need_adapter``: refuse a run that has not saved its adapter yet."""
    folder = RunFolder(run_dir)
    if not (folder / RUN_CONFIG).is_file():
        raise RunError(f"{folder.path} is not a lora_ft run (no {RUN_CONFIG}); give the output_dir of a run")
    if need_adapter and not (folder.adapter / "adapter_config.json").is_file():
        raise RunError(f"{folder.path} has no trained adapter ({ADAPTER}/adapter_config.json); finish training first")
    if need_adapter:
        check_folder(folder.adapter, "the run's adapter", RETRAIN, RunError)
    if (folder / START_ADAPTER).is_dir():
        check_folder(folder / START_ADAPTER, "the run's copy of lora.init_from", RETRAIN, RunError)
    return Run(folder, read_run_config(folder / RUN_CONFIG), folder.read_json(RUN_INFO))


# The adapter_config.json keys of the lora section's shape fields.
_ADAPTER_SHAPE = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
                  "use_dora": "use_dora", "use_rslora": "use_rslora"}


def start_adapter_dir(init_from: str | Path) -> Path:
    """``lora.init_from`` → the adapter folder: the folder itself, or a run's ``adapter``."""
    path = Path(init_from).expanduser()
    for folder in (path, path / ADAPTER):
        if (folder / "adapter_config.json").is_file():
            return folder
    raise RunError(f"lora.init_from {init_from}: neither an adapter folder nor a run with a trained adapter "
                   f"(no adapter_config.json there or in {ADAPTER}/); give a run's output_dir or an adapter folder")


def adopt_start_adapter(recipe: Recipe) -> Recipe:
    """With ``lora.init_from``: the recipe with the starting adapter's folder resolved and its shape (r, alpha,
    dropout, targets, DoRA, rsLoRA) as the lora section's values, so ``run_config.yaml`` says what trains. A shape
    value the recipe sets itself must agree with the adapter's; a run given as ``init_from`` must be of the same
    base model."""
    lora = recipe.lora
    if lora.init_from is None:
        return recipe
    folder = start_adapter_dir(lora.init_from)
    check_folder(folder, "lora.init_from", "point lora.init_from at an intact adapter or run")
    if folder.parent / ADAPTER == folder and (folder.parent / RUN_CONFIG).is_file():
        other = read_run_config(folder.parent / RUN_CONFIG).model
        if (other.name, other.task) != (recipe.model.name, recipe.model.task):
            raise RecipeError(f"lora.init_from {lora.init_from}: that run trained {other.name} ({other.task}), "
                              f"not model.name {recipe.model.name} ({recipe.model.task})")
        if other.chat_template != recipe.model.chat_template:  # another vocabulary, other trained token rows
            raise RecipeError(f"lora.init_from {lora.init_from}: that run used model.chat_template "
                              f"{other.chat_template}, not {recipe.model.chat_template}: set the same template")
    saved = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if saved.get("trainable_token_indices") and recipe.model.chat_template is None:
        raise RecipeError(f"lora.init_from {lora.init_from}: the adapter trained the rows of a chat template's "
                          "tokens: set model.chat_template to the template it was trained with")
    shape = {field: saved[key] for field, key in _ADAPTER_SHAPE.items() if saved.get(key) is not None}
    if isinstance(shape.get("target_modules"), list | set | tuple):
        shape["target_modules"] = sorted(shape["target_modules"])
    clashes = [f"lora.{f} {getattr(lora, f)!r} (the adapter has {v!r})" for f, v in shape.items()
               if f in lora.model_fields_set and getattr(lora, f) not in (v, "auto")]
    if clashes:
        raise RecipeError(f"lora.init_from {lora.init_from}: " + "; ".join(clashes) + ": the starting adapter's "
                          "shape is kept, remove these from the recipe")
    return recipe.model_copy(update={"lora": lora.model_copy(update={**shape, "init_from": str(folder.resolve())})})


def default_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def load_run_tokenizer(run: Run) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the adapter: it carries the pad token and chat template training used."""
    return AutoTokenizer.from_pretrained(run.adapter_dir, **remote_code(run.recipe.model.trust_remote_code,
                                                                        run.adapter_dir))


def load_adapter_model(run: Run, device: torch.device | str, tokenizer: PreTrainedTokenizerBase,
                       quant: str | None = None, compute_dtype: str | None = None) -> PeftModel:
    """Base loaded the way training loaded it (same quantization, same compute dtype, so the same rounded
    weights) with the run's adapter on top: the model ``lora-ft eval`` measures. ``quant``/``compute_dtype``
    override the run's choices (``quant="none"``: the original weights)."""
    cfg = run.recipe.model.model_copy(update={"name": run.source(), **({"quant": quant} if quant else {})})
    loaded = load_model(cfg, compute_dtype or run.compute_dtype, device, run.id2label, tokenizer)
    model = PeftModel.from_pretrained(loaded.model, str(run.adapter_dir))
    return model.eval()


def merge_owner(folder: Path) -> str | None:
    """The run folder named by a merged folder's ``MERGE_MARKER`` (None: no readable marker)."""
    try:
        owner = json.loads((Path(folder) / MERGE_MARKER).read_text(encoding="utf-8")).get("run_dir")
    except (OSError, ValueError, AttributeError):
        return None
    return owner if isinstance(owner, str) else None


def is_merge_of(run: Run, folder: Path) -> bool:
    """Whether ``folder`` holds a merged model this run wrote: its marker names the run, or (merges made before
    markers existed) it has no marker but ``merge_report.json`` records a merge saved there."""
    owner = merge_owner(folder)
    if owner is not None:
        return Path(owner).resolve() == run.dir.resolve()
    folder = Path(folder)
    return (folder / "config.json").is_file() and not (folder / RUN_CONFIG).exists() \
        and str(folder.resolve()) in {str(Path(e["out"]).resolve()) for e in saved_merges(run)}


def saved_merges(run: Run) -> list[dict[str, Any]]:
    """The saved merges recorded in ``merge_report.json``, oldest first."""
    entries = run.folder.read_json(MERGE_REPORT).values()
    return sorted((e for e in entries if isinstance(e, dict) and e.get("saved") and e.get("out")),
                  key=lambda e: e.get("written", ""))


def merged_folder(run: Run) -> Path:
    """Where ``--merged`` finds the merged model: ``RUN_DIR/merged``, else the folder of the latest passing
    merge written elsewhere (``merge --out DIR``), as recorded in ``merge_report.json``."""
    default = run.dir / MERGED
    if default.exists():
        return default
    # Only the last merge saved into a folder describes what it holds now (a later --force may have replaced it).
    latest = {str(Path(e["out"]).resolve()): e for e in saved_merges(run)}
    passing = [e for e in latest.values() if e.get("passed") and (Path(e["out"]) / "config.json").is_file()]
    return Path(max(passing, key=lambda e: e.get("written", ""))["out"]) if passing else default
