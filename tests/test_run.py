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


# ------------------------------------------------------------------ damaged run files: one line naming the file
@pytest.fixture(scope="module")
def trained(tiny_llama, chat_data, tmp_path_factory):
    """A finished 2-step run with a checkpoint at each step and its reports (copied by each test before it is
    damaged)."""
    from lora_ft.training.trainer import train

    out = tmp_path_factory.mktemp("trained") / "run"
    recipe = make_recipe(tiny_llama, chat_data, out, train={"max_steps": 2, "checkpoint_every": 1})
    recipe.data.max_eval_examples = 8
    train(recipe)
    return out


def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _json_error(text: str) -> str:
    try:
        json.loads(text)
    except ValueError as e:
        return str(e)
    raise AssertionError("still parses")


RETRAIN = "restore it from a copy, or train the run again with --overwrite"
RESTORE_CONFIG = "restore it (every checkpoint in checkpoints/ keeps a copy), or train the run again with --overwrite"
# case → (file, damage, command after RUN, expected line after 'lora-ft: error: ' with RUN for the run folder)
DAMAGED = {
    # Cut YAML mostly still parses (here to max_length 12, every later key taking its default): the missing
    # newline tells.
    "run_config.yaml cut": ("run_config.yaml", "cut mid-value", ["generate", "--prompt", "hi"],
                            "RUN/run_config.yaml is cut short (its last line is unfinished); " + RESTORE_CONFIG),
    "run_config.yaml cut on a line end": ("run_config.yaml", "cut on a line end", ["generate", "--prompt", "hi"],
                                          "RUN/run_config.yaml is cut short (it ends before output_dir, the last key "
                                          "a run writes); " + RESTORE_CONFIG),
    "run_config.yaml malformed": ("run_config.yaml", "model: {name: [x\n", ["generate", "--prompt", "hi"],
                                  "RUN/run_config.yaml cannot be read back as this run's recipe (malformed YAML at "
                                  "line 2, column 1: expected ',' or ']', but got '<stream end>'); " + RESTORE_CONFIG),
    "run_info.json": ("run_info.json", "cut", ["generate", "--prompt", "hi"],
                      "RUN/run_info.json is not valid JSON ({json}); " + RETRAIN),
    "adapter weights cut": ("adapter/adapter_model.safetensors", "cut", ["generate", "--prompt", "hi"],
                            "the run's adapter: RUN/adapter/adapter_model.safetensors is cut short or corrupt (header: "
                            "incomplete metadata, file not fully covered); " + RETRAIN),
    "adapter tokenizer garbage": ("adapter/tokenizer.json", "\x00 not json", ["generate", "--prompt", "hi"],
                                  "the run's adapter: RUN/adapter/tokenizer.json is not valid JSON (Expecting value: "
                                  "line 1 column 1 (char 0)); " + RETRAIN),
    "merge_report.json": ("merge_report.json", "cut", ["generate", "--merged", "--prompt", "hi"],
                          "RUN/merge_report.json is not valid JSON ({json}); delete it (it only records earlier "
                          "merges; the next merge writes a new one)"),
    "eval_results.json": ("eval_results.json", "cut", ["push", "--repo", "me/x", "--dry-run"],
                          "RUN/eval_results.json is not valid JSON ({json}); delete it (training's final evaluation; "
                          "lora-ft eval measures the run again)"),
}


@pytest.mark.parametrize("name", list(DAMAGED))
def test_a_damaged_run_file_is_one_line_naming_it_and_what_to_do(name, trained, tmp_path, capsys):
    """Half a file (a crash of an older version while writing it) or garbage: the command that reads it ends with
    one line naming the file and what to do, exits 2, and changes nothing in the run folder."""
    from test_errors import error_line

    from lora_ft.cli import main

    run = shutil.copytree(trained, tmp_path / "run")
    file, damage, args, expected = DAMAGED[name]
    path = run / file
    if file == "merge_report.json":
        path.write_text(json.dumps({"merged": {"saved": True, "out": str(tmp_path / "m"), "passed": True}}))
    if damage == "cut mid-value":
        text = path.read_text()
        path.write_text(text[:text.index("  max_length: 128\n") + len("  max_length: 12")])
    elif damage == "cut on a line end":
        text = path.read_text()
        path.write_text(text[:text.index("train:\n")])
    else:
        _cut(path) if damage == "cut" else path.write_text(damage)
    text = path.read_text(encoding="utf-8", errors="replace")
    expected = expected.replace("RUN", str(run)).format(json=_json_error(text) if damage == "cut" else "")
    before = _digest(run)
    assert main([args[0], str(run), *args[1:]]) == 2
    assert error_line(capsys.readouterr().err) == f"lora-ft: error: {expected}"
    assert {k: v for k, v in _digest(run).items() if ".lora_ft.lock" not in k} == \
        {k: v for k, v in before.items() if ".lora_ft.lock" not in k}


def test_an_unfinished_last_metrics_row_is_skipped_and_cut_before_a_resumed_run_appends(tmp_path, tiny_llama,
                                                                                        chat_data, caplog):
    """A kill while a row was appended leaves half a line: reading skips it with a warning; a resumed run cuts it
    first, so its next row is not glued to the fragment."""
    recipe, folder = _fake_run(tmp_path, tiny_llama, chat_data)
    folder.metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert folder.read_metrics() == [{"step": 1, "loss": 2.0}]
    assert "metrics.jsonl: ignoring its unfinished last line" in caplog.text
    folder.start(recipe, {}, fresh=False)
    folder.log({"step": 2, "loss": 1.5})
    assert folder.metrics.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


def test_a_damaged_metrics_row_before_the_last_is_one_line_naming_the_line(tmp_path, tiny_llama, chat_data):
    _, folder = _fake_run(tmp_path, tiny_llama, chat_data)
    folder.metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(RunError) as caught:
        folder.read_metrics()
    assert str(caught.value) == (f"{folder.metrics} line 2 is not valid JSON (Unterminated string starting at: line 1 "
                                 "column 13 (char 12)); delete that line (the rows before and after it stay usable)")


def test_a_damaged_start_adapter_is_refused_naming_the_file(trained, tmp_path, tiny_llama, chat_data):
    """lora.init_from: an adapter whose weights were cut short is named before any model loads."""
    from lora_ft.errors import RecipeError
    from lora_ft.run import adopt_start_adapter

    run = shutil.copytree(trained, tmp_path / "start")
    _cut(run / "adapter" / "adapter_model.safetensors")
    recipe = make_recipe(tiny_llama, chat_data, tmp_path / "next", lora={"init_from": str(run)})
    with pytest.raises(RecipeError) as caught:
        adopt_start_adapter(recipe)
    assert str(caught.value) == (f"lora.init_from: {run / 'adapter' / 'adapter_model.safetensors'} is cut short or "
                                 "corrupt (header: incomplete metadata, file not fully covered); point lora.init_from "
                                 "at an intact adapter or run")
