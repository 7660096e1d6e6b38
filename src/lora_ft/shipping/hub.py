"""``lora-ft push``: the Hugging Face Hub folder of a run (adapter or merged model, model card) and its upload.

The only module that talks to the Hub. The token is never handled here beyond asking
``huggingface_hub.get_token()`` whether one exists (``HF_TOKEN``, ``hf auth login``, ...): the upload itself
resolves it the library's usual way, and nothing we write or log contains it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_token

from ..errors import PublishError, RunError, UsageError
from ..run import (
    CURVES,
    EXPORT_REPORT,
    HUB,
    MERGE_MARKER,
    MERGE_REPORT,
    RESULTS,
    Run,
    merged_folder,
    open_run,
    saved_merges,
)
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


def build_hub_folder(run_dir: str | Path, repo_id: str, merged: bool = False, base_model: str | None = None,
                     merged_dir: str | Path | None = None, gguf: str | Path | None = None) -> Path:
    """Write ``RUN_DIR/hub``: exactly what ``push`` uploads (rebuilt from scratch each time). ``merged_dir``
    (implies ``merged``) names the merged folder; by default ``run.merged_folder`` finds it. ``gguf``: a GGUF
    export instead (``"latest"``: the latest passing one in ``export_report.json``), with its Modelfile."""
    check_repo_id(repo_id)
    merged = merged or merged_dir is not None
    run = open_run(run_dir)
    if gguf is not None:
        if merged:
            raise UsageError("--gguf and --merged/--merged-dir push different things: choose one")
        gguf_entry = latest_export(run, None if gguf == "latest" else gguf)
    base_id = base_model_id(run, base_model)
    if base_id is None:
        log.warning("the base model %s has no known Hub id: the card has no base_model (pass --base-model ID)",
                    run.recipe.model.name)
    merged_path = Path(merged_dir) if merged_dir else merged_folder(run)
    if merged and not (merged_path / "config.json").is_file():
        raise RunError(f"{merged_path} holds no merged model; run 'lora-ft merge {run.dir}' first, or name "
                          "the folder of a merge written with --out: --merged-dir DIR")
    merge_entry = _merge_entry(run, merged_path) if merged else None
    if merged and merge_entry is None:
        log.warning("%s has no entry for %s: the card shows no merge fidelity", MERGE_REPORT, merged_path)

    folder = run.dir / HUB
    shutil.rmtree(folder, ignore_errors=True)  # stale files from an earlier build would be uploaded too
    folder.mkdir(parents=True)
    source = merged_path if merged else run.adapter_dir
    files = [Path(gguf_entry["out"])] if gguf is not None else sorted(source.iterdir())
    for f in files:
        if f.is_file() and f.name not in SKIP_FILES:
            _place(f, folder / f.name)
    if gguf is not None:  # written for this file: the Modelfile beside the export may name a later one
        write_modelfile(run, files[0].name, folder)
    elif not merged and base_id:
        # peft stored the local path training used; on the Hub, AutoPeftModel* must find the base by its id.
        cfg_path = folder / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_id
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in (CURVES, RESULTS) + ((MERGE_REPORT,) if merged else ()) + ((EXPORT_REPORT,) if gguf else ()):
        if (run.dir / name).is_file():
            _place(run.dir / name, folder / name)
    (folder / RECIPE_FILE).write_text(run.recipe.dump(), encoding="utf-8")
    if gguf is not None:
        card = build_gguf_card(run, repo_id, base_id, base_license(run, base_id), gguf_entry)
    else:
        card = build_card(run, repo_id, merged, base_id, base_license(run, base_id), merge_entry)
    card.save(folder / "README.md")
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
