"""The run folder: a run is never trained into twice, --overwrite replaces only what is a run's (and only once
the new run saved something), and a saved run reads back with its recipe, labels and merges."""

import json
import shutil

import pytest
from conftest import make_recipe

from lora_ft.errors import RunError
from lora_ft.run import (
    MERGE_REPORT,
    REPLACED,
    RUN_INFO,
    RunFolder,
    labels_of,
    merged_folder,
    open_run,
    read_jsonl,
)


def _fake_run(tmp_path, tiny_llama, chat_data, info=None):
    recipe = make_recipe(tiny_llama, chat_data, tmp_path / "run")
    folder = RunFolder(recipe.output_dir)
    folder.start(recipe, info or {"id2label": {"0": "a", "1": "b"}, "compute_dtype": "bf16"}, fresh=True)
    (folder.adapter).mkdir()
    (folder.adapter / "adapter_config.json").write_text("{}")
    return recipe, folder


def test_a_folder_that_holds_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, tiny_llama, chat_data):
    _, folder = _fake_run(tmp_path, tiny_llama, chat_data)
    with pytest.raises(RunError, match="already holds a run; pass --resume latest"):
        folder.check_new(None, False)
    folder.check_new("latest", False)
    folder.check_new(None, True)
    RunFolder(tmp_path / "empty").check_new(None, False)


def _digest(folder):
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def test_overwrite_keeps_the_old_run_aside_until_the_new_one_saved_something(tmp_path, tiny_llama, chat_data):
    recipe, folder = _fake_run(tmp_path, tiny_llama, chat_data)
    folder.log({"step": 1, "loss": 2.0})
    (folder.checkpoints / "step-00000001").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    old = _digest(folder.path)
    folder.set_aside()
    assert sorted(p.name for p in folder.path.iterdir()) == [REPLACED, "notes.txt"]
    # The new run writes its config and log, then ends before saving anything: the old run is back, byte for byte.
    folder.start(recipe, {"new": True}, fresh=True)
    folder.log({"step": 1, "loss": 9.0})
    folder.restore_aside()
    assert _digest(folder.path) == old
    # A kill while the old run waits aside, after the new run saved its first checkpoint: the new run wins.
    folder.set_aside()
    folder.start(recipe, {"new": True}, fresh=True)
    (folder.checkpoints / "step-00000002").mkdir(parents=True)
    folder.recover_aside()
    assert sorted(p.name for p in folder.path.iterdir()) == ["checkpoints", "notes.txt", "run_config.yaml",
                                                             "run_info.json"]
    assert [p.name for p in folder.checkpoints.iterdir()] == ["step-00000002"]
    # ... and a kill before it saved anything: the old run comes back.
    shutil.rmtree(folder.checkpoints)
    folder.set_aside()
    folder.start(recipe, {"newest": True}, fresh=True)
    folder.recover_aside()
    assert json.loads((folder / RUN_INFO).read_text()) == {"new": True}


def test_a_saved_run_reads_back_with_its_recipe_labels_and_dtype(tmp_path, tiny_llama, chat_data):
    recipe, folder = _fake_run(tmp_path, tiny_llama, chat_data)
    folder.log({"step": 1, "loss": 2.0})
    folder.log({"step": 1, "split": "validation", "loss": 2.5})
    run = open_run(folder.path)
    assert run.recipe == recipe and run.id2label == {0: "a", 1: "b"} and run.compute_dtype == "bf16"
    assert run.causal and not run.quantized and run.adapter_dir == folder.path / "adapter"
    assert [r["loss"] for r in folder.read_metrics()] == [2.0, 2.5]
    assert labels_of({}) is None and json.loads((folder / RUN_INFO).read_text())["compute_dtype"] == "bf16"


def test_opening_a_folder_that_is_no_run_or_has_no_adapter_says_which(tmp_path, tiny_llama, chat_data):
    with pytest.raises(RunError, match="is not a lora_ft run \\(no run_config.yaml\\)"):
        open_run(tmp_path)
    _, folder = _fake_run(tmp_path, tiny_llama, chat_data)
    (folder.adapter / "adapter_config.json").unlink()
    with pytest.raises(RunError, match="has no trained adapter"):
        open_run(folder.path)
    assert open_run(folder.path, need_adapter=False).info["compute_dtype"] == "bf16"


def test_merged_folder_is_the_default_or_the_latest_passing_merge_elsewhere(tmp_path, tiny_llama, chat_data):
    _, folder = _fake_run(tmp_path, tiny_llama, chat_data)
    run = open_run(folder.path)
    assert merged_folder(run) == folder.path / "merged"
    elsewhere, failed = tmp_path / "m1", tmp_path / "m2"
    for out in (elsewhere, failed):
        out.mkdir()
        (out / "config.json").write_text("{}")
    folder.write_json(MERGE_REPORT, {
        "dequantized-fp32": {"saved": True, "passed": True, "out": str(elsewhere), "written": "2026-01-01T00:00:00"},
        "original-fp32": {"saved": True, "passed": False, "out": str(failed), "written": "2026-01-02T00:00:00"}})
    assert merged_folder(run) == elsewhere
    (folder / "merged").mkdir()
    assert merged_folder(run) == folder.path / "merged"


def test_a_half_appended_last_line_is_left_out_and_any_other_bad_line_is_named(tmp_path):
    """metrics.jsonl is appended while a run trains: a reader may find its last row half-written (or a kill cut
    it); that row is left out. A bad line elsewhere was damaged, and is one RunError naming file and line."""
    folder = RunFolder(tmp_path)
    folder.log({"step": 1, "loss": 2.0})
    folder.log({"step": 2, "loss": 1.5})
    with folder.metrics.open("a") as f:
        f.write('{"step": 3, "lo')
    assert folder.read_metrics() == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    folder.metrics.write_text('{"step": 1}\n{"step": 2}')  # a complete last row without its newline is kept
    assert read_jsonl(folder.metrics) == [{"step": 1}, {"step": 2}]
    folder.metrics.write_text('{"step": 1}\n{"step": \n{"step": 3}\n')
    with pytest.raises(RunError, match=r"metrics.jsonl: line 2 is not JSON \(Expecting value\); repair or delete "):
        folder.read_metrics()
    assert read_jsonl(tmp_path / "missing.jsonl") == []
