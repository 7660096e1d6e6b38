"""``lora-ft push``: the Hugging Face Hub folder of a run (adapter or merged model, model card) and its upload.

The only module that talks to the Hub. The token is never handled here beyond asking
``huggingface_hub.get_token()`` whether one exists (``HF_TOKEN``, ``hf auth login``, ...): the upload itself
resolves it the library's usual way, and nothing we write or log contains it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_token

from ..errors import PublishError, RunError, UsageError
from ..recipe import Recipe, looks_local
from ..run import (
    CURVES,
    EXPORT_REPORT,
    HUB,
    MERGE_MARKER,
    MERGE_REPORT,
    RESULTS,
    SAMPLES,
    SAMPLES_MD,
    Run,
    RunFolder,
    is_merge_of,
    merge_owner,
    merged_folder,
    open_run,
    saved_merges,
)
from ..storage import write_folder
from .card import RECIPE_FILE, base_license, base_model_id, build_card, build_gguf_card, check_repo_id
from .export import latest_export, write_modelfile

log = logging.getLogger(__name__)

# Not uploaded: peft's own auto-generated README (replaced by our card) and the merge marker (local bookkeeping
# that names a local path).
SKIP_FILES = {"README.md", MERGE_MARKER}
# Weight files are not scanned for the token (gigabytes, and binary tensors cannot hold it by accident).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def _merge_entry(run: Run, merged_dir: Path) -> dict[str, Any] | None:
    """The report entry of the merge that wrote ``merged_dir`` last."""
    entries = [e for e in saved_merges(run) if Path(e["out"]).resolve() == merged_dir.resolve()]
    return entries[-1] if entries else None


# ------------------------------------------------------------------------------------- no local paths
def _local(value: str | None) -> bool:
    return bool(value) and not value.startswith("example:") and (looks_local(value) or Path(value).exists())


def _public(value: str | None, replacement: str | None = None) -> str | None:
    """A local path as published: ``replacement`` (a Hub id) or its last component; anything else as it is."""
    return (replacement or Path(value).name) if _local(value) else value


def public_recipe(recipe: Recipe, base_id: str | None) -> Recipe:
    """The recipe as published: local paths (data files, the base's folder or .gguf file, output_dir) become file
    names, or the base's Hub id; the Hub has no use for this machine's paths, and they say things about it."""
    d, f = recipe.data, recipe.forgetting
    gguf = recipe.model.name.endswith(".gguf")  # the card names the GGUF file: keep its name
    return recipe.model_copy(update={
        "model": recipe.model.model_copy(update={"name": _public(recipe.model.name, None if gguf else base_id)}),
        "data": d.model_copy(update={k: _public(getattr(d, k)) for k in ("train", "validation", "test")}),
        "forgetting": f.model_copy(update={"reference": _public(f.reference)}),
        "output_dir": Path(recipe.output_dir).name})


def _local_paths(run: Run) -> set[str]:
    """The absolute local paths a published file must not contain: the run's folder, the base model's, the data's."""
    r = run.recipe
    values = [str(run.dir), run.info.get("source"), r.model.name, r.data.train, r.data.validation, r.data.test,
              r.forgetting.reference]
    paths = {str(Path(v).expanduser().resolve()) for v in values if _local(v)}
    return paths | {str(Path(p).parent) for p in paths if Path(p).is_file() or Path(p).suffix}


def _assert_no_local_paths(folder: Path, paths: set[str]) -> None:
    """Last line of defence, as for the token: no text file about to be published names a local path."""
    needles = [p.encode() for p in sorted(paths, key=len, reverse=True) if len(p) > 1]
    for f in sorted(folder.rglob("*")):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
            data = f.read_bytes()
            found = next((n.decode() for n in needles if n in data), None)
            if found:
                raise PublishError(f"{f} contains the local path {found}; remove it from the recipe or the files "
                                   "before publishing")



# ------------------------------------------------------------------------------------------ the folder
def _place(src: Path, dst: Path) -> None:
    """Weights are hard-linked when possible (a merged model can be gigabytes; they are written once, never
    edited in place); everything else is copied, so that later edits in the run (``merge_report.json`` is
    rewritten by every merge) do not reach the snapshot."""
    if src.name.endswith(WEIGHT_SUFFIXES):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem: copy
    shutil.copy2(src, dst)


def _merged_source(run: Run, merged_dir: str | Path | None) -> tuple[Path, dict[str, Any] | None]:
    """The merged folder to push (``--merged-dir``, else ``merged_folder``), refused unless it is a merge of this
    run, and the report entry of the merge that wrote it."""
    merged_path = Path(merged_dir) if merged_dir else merged_folder(run)
    if not (merged_path / "config.json").is_file():
        raise RunError(f"{merged_path} holds no merged model; run 'lora-ft merge {run.dir}' first, or name "
                       "the folder of a merge written with --out: --merged-dir DIR")
    if not is_merge_of(run, merged_path):
        owner = merge_owner(merged_path)
        raise RunError(f"{merged_path} is not a merge of {run.dir} ("
                       + (f"it was merged from {owner}" if owner else "no lora_ft merge marker: e.g. a base model")
                       + f"); push a folder written by 'lora-ft merge {run.dir} [--out DIR]'")
    merge_entry = _merge_entry(run, merged_path)
    if merge_entry is None:
        log.warning("%s has no entry for %s: the card shows no merge fidelity", MERGE_REPORT, merged_path)
    return merged_path, merge_entry


def build_hub_folder(run_dir: str | Path, repo_id: str, merged: bool = False, base_model: str | None = None,
                     merged_dir: str | Path | None = None, gguf: str | Path | None = None) -> Path:
    """Write ``RUN_DIR/hub``: exactly what ``push`` uploads (rebuilt from scratch each time). ``merged_dir``
    (implies ``merged``) names the merged folder; by default ``run.merged_folder`` finds it. ``gguf``: a GGUF
    export instead (``"latest"``: the latest passing one in ``export_report.json``), with its Modelfile."""
    check_repo_id(repo_id)
    merged = merged or merged_dir is not None
    run = open_run(run_dir)
    gguf_entry = None
    if gguf is not None:
        if merged:
            raise UsageError("--gguf and --merged/--merged-dir push different things: choose one")
        gguf_entry = latest_export(run, None if gguf == "latest" else gguf)
    base_id = base_model_id(run, base_model)
    if base_id is None:
        log.warning("the base model %s has no known Hub id: the card has no base_model (pass --base-model ID)",
                    run.recipe.model.name)
    merged_path, merge_entry = _merged_source(run, merged_dir) if merged else (None, None)
    license_ = base_license(run, base_id)
    public = dataclasses.replace(run, recipe=public_recipe(run.recipe, base_id),
                                 info={**run.info, "source": _public(run.info.get("source"), base_id)})

    def write(tmp: Path) -> None:
        source = merged_path if merged else run.adapter_dir
        files = [Path(gguf_entry["out"])] if gguf_entry else sorted(source.iterdir())
        for f in files:
            if f.is_file() and f.name not in SKIP_FILES:
                _place(f, tmp / f.name)
            elif f.is_dir() and merged:  # an embedding model's sentence-transformers modules (1_Pooling/, ...)
                shutil.copytree(f, tmp / f.name)
        if gguf_entry:  # written for this file: the Modelfile beside the export may name a later one
            write_modelfile(run, files[0].name, tmp)
        elif not merged:
            # peft stored the local path training used; on the Hub, AutoPeftModel* must find the base by its id.
            cfg = json.loads((tmp / "adapter_config.json").read_text())
            cfg["base_model_name_or_path"] = base_id or public.recipe.model.name
            (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name in (CURVES, RESULTS, SAMPLES, SAMPLES_MD):
            if (run.dir / name).is_file():
                _place(run.dir / name, tmp / name)
        reports = (MERGE_REPORT,) if merged and merge_entry is not None else (EXPORT_REPORT,) if gguf_entry else ()
        for name in reports:  # with file names where the run's report has local paths
            report = {k: {**e, "out": Path(e["out"]).name} if isinstance(e, dict) and e.get("out") else e
                      for k, e in run.folder.read_json(name).items()}
            (tmp / name).write_text(json.dumps(report, indent=2), encoding="utf-8")
        (tmp / RECIPE_FILE).write_text(public.recipe.dump(), encoding="utf-8")
        card = build_gguf_card(public, repo_id, base_id, license_, gguf_entry) if gguf_entry \
            else build_card(public, repo_id, merged, base_id, license_, merge_entry)
        card.save(tmp / "README.md")

    # Built aside and renamed in: stale files of an earlier build are never uploaded, and a signal or a full disk
    # leaves the previous folder as it was.
    folder = run.dir / HUB
    write_folder(folder, write, retry="free disk space and run lora-ft push again")
    _assert_no_local_paths(folder, _local_paths(run))
    log.info("Hub folder for %s written to %s", repo_id, folder)
    return folder


def _assert_no_token(folder: Path, token: str) -> None:
    """Last line of defence before an upload: a token pasted into a recipe (e.g. a system prompt) or a
    config must not be published."""
    needle = token.encode()
    for f in folder.rglob("*"):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and needle in f.read_bytes():
            raise PublishError(f"{f} contains your Hugging Face token; remove it before pushing")


def push(run_dir: str | Path, repo_id: str, merged: bool = False, private: bool = False, dry_run: bool = False,
         base_model: str | None = None, merged_dir: str | Path | None = None,
         gguf: str | Path | None = None) -> dict[str, Any]:
    """Build the Hub folder and (unless ``dry_run``) upload it to ``repo_id``."""
    merged = merged or merged_dir is not None
    with RunFolder(run_dir).lock():  # no training or merge rewrites the run while it is packed and uploaded
        return _push(run_dir, repo_id, merged, private, dry_run, base_model, merged_dir, gguf)


def _push(run_dir: str | Path, repo_id: str, merged: bool, private: bool, dry_run: bool, base_model: str | None,
          merged_dir: str | Path | None, gguf: str | Path | None = None) -> dict[str, Any]:
    folder = build_hub_folder(run_dir, repo_id, merged, base_model, merged_dir, gguf)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    result: dict[str, Any] = {"repo": repo_id, "folder": str(folder), "files": files, "uploaded": False}
    if dry_run:
        log.info("dry run: nothing uploaded")
        return result
    token = get_token()
    if not token:
        raise UsageError("no Hugging Face token found: set HF_TOKEN or run 'hf auth login', then push again "
                          "(--dry-run builds the folder without one)")
    _assert_no_token(folder, token)
    what = "GGUF" if gguf is not None else "merged model" if merged else "adapter"
    api = HfApi()  # resolves the token itself, the usual way; we never pass it around
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                                   commit_message=f"lora_ft: {what} "
                                                  f"from {Path(run_dir).name}")
    except Exception as e:  # HTTP, network and auth errors alike: one line, never the token
        msg = (str(e).splitlines() or [type(e).__name__])[0].replace(token, "***")
        raise PublishError(f"upload to {repo_id} failed: {msg}") from None
    result.update(uploaded=True, url=str(url), commit=str(getattr(commit, "commit_url", commit)),
                  time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    log.info("pushed %s to %s", folder, result["commit"])
    return result
