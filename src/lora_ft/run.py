"""A run folder (``output_dir``): the name of every file in it, starting or clearing one, and reading one back.

Training writes a run through ``RunFolder``; every later command (eval, merge, push, chat, predict) opens it with
``open_run`` and reads what it needs through ``Run``: the resolved recipe, the label map, the base model's source,
the adapter model as training evaluated it, and the merges written from it. No other module spells a run's file
names.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .errors import RunError
from .modeling.loading import load_model, resolve_source
from .recipe import Recipe, load_recipe

RUN_CONFIG = "run_config.yaml"
"""The fully resolved recipe: later commands need nothing retyped."""
RUN_INFO = "run_info.json"
METRICS = "metrics.jsonl"
RESULTS = "eval_results.json"
CURVES = "curves.png"
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

    def check_new(self, resume: str | None, overwrite: bool) -> None:
        """A folder that already holds a run is never trained into silently."""
        if resume is None and not overwrite and self.holds_run():
            raise RunError(f"output_dir {self.path} already holds a run; pass --resume latest to continue it, "
                           "--overwrite to replace it, or choose another output_dir")

    def clear(self) -> None:
        """``--overwrite``: remove the old run's outputs, so none of them (a checkpoint that ``--resume latest`` would
        pick, a stale adapter or report) is mistaken for the new run's. Other files in the folder stay."""
        for name in (CHECKPOINTS, ADAPTER, MERGED, HUB, GGUF_DIR):
            shutil.rmtree(self.path / name, ignore_errors=True)
        for name in (RUN_CONFIG, RUN_INFO, METRICS, RESULTS, CURVES, MERGE_REPORT, EXPORT_REPORT):
            (self.path / name).unlink(missing_ok=True)

    def start(self, recipe: Recipe, info: dict[str, Any], fresh: bool) -> None:
        """Write the resolved recipe and the run's facts; a fresh run starts a new metrics log."""
        self.path.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.metrics.unlink(missing_ok=True)
        (self.path / RUN_CONFIG).write_text(recipe.dump(), encoding="utf-8")
        self.write_json(RUN_INFO, info)

    def log(self, row: dict[str, Any]) -> None:
        """Append one row to ``metrics.jsonl``."""
        with self.metrics.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def write_json(self, name: str, value: Any) -> None:
        (self.path / name).write_text(json.dumps(value, indent=2), encoding="utf-8")

    def record(self, name: str, key: str, entry: Any) -> Path:
        """Add (or replace) one entry of a JSON report (``merge_report.json``, ``export_report.json``)."""
        report = self.read_json(name)
        report[key] = entry
        self.write_json(name, report)
        return self.path / name

    def read_json(self, name: str) -> Any:
        path = self.path / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text(encoding="utf-8").splitlines() if line.strip()]


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
    return Run(folder, load_recipe(folder / RUN_CONFIG), folder.read_json(RUN_INFO))


def default_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def load_run_tokenizer(run: Run) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the adapter: it carries the pad token and chat template training used."""
    return AutoTokenizer.from_pretrained(run.adapter_dir, trust_remote_code=run.recipe.model.trust_remote_code)


def load_adapter_model(run: Run, device: torch.device | str, tokenizer: PreTrainedTokenizerBase,
                       quant: str | None = None, compute_dtype: str | None = None) -> PeftModel:
    """Base loaded the way training loaded it (same quantization, same compute dtype, so the same rounded
    weights) with the run's adapter on top: the model ``lora-ft eval`` measures. ``quant``/``compute_dtype``
    override the run's choices (``quant="none"``: the original weights)."""
    cfg = run.recipe.model.model_copy(update={"name": run.source(), **({"quant": quant} if quant else {})})
    loaded = load_model(cfg, compute_dtype or run.compute_dtype, device, run.id2label, tokenizer)
    model = PeftModel.from_pretrained(loaded.model, str(run.adapter_dir))
    return model.eval()


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
