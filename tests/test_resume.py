"""Resuming: from nothing, along one lineage (newer checkpoints of an abandoned branch are set aside and never picked
again), and with a changed recipe (what the checkpoint cannot serve is refused by name; the rest is served)."""

import hashlib
import json
import shutil
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_ft.cli import main
from lora_ft.training.checkpoint import ADAPTER_FILE, find_checkpoint


def _recipe(path, tiny_llama, chat_data, out, **train):
    path.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        # Batches of 8 examples (not packed rows): the steps, evaluations and stops these tests count on.
        "data": {"train": str(chat_data["train"]), "validation": str(chat_data["validation"]), "max_length": 128,
                 "max_eval_examples": 8, "packing": False},
        "train": {"max_steps": 4, "micro_batch_size": 8, "lr": 1e-2, "warmup": 0, "schedule": "constant",
                  "checkpoint_every": 1, "keep_checkpoints": 10, "eval_every": None, "early_stopping_patience": None,
                  **train},
        "output_dir": str(out)}))
    return path


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _tree(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny_llama, chat_data, tmp_path_factory):
    """A 4-step run with a checkpoint at every step (copied by each test before it is changed)."""
    root = tmp_path_factory.mktemp("resume")
    recipe = _recipe(root / "r.yaml", tiny_llama, chat_data, root / "run")
    assert main(["train", str(recipe)]) == 0
    return root / "run"


def test_resuming_from_an_older_checkpoint_sets_the_newer_ones_aside(finished, tiny_llama, chat_data, tmp_path,
                                                                     capsys):
    """`--resume step-00000002` abandons steps 3-4 (e.g. the weights that led to a NaN): they and their metrics
    rows move to checkpoints/abandoned-*, and the next `--resume latest` continues the new lineage."""
    out = shutil.copytree(finished, tmp_path / "run")
    old3 = load_file(out / "checkpoints" / "step-00000003" / ADAPTER_FILE)
    recipe = _recipe(tmp_path / "r.yaml", tiny_llama, chat_data, out)
    assert main(["train", str(recipe), "--resume", "step-00000002", "--set", "train.lr=1e-3",
                 "--set", "train.max_steps=3"]) == 0
    ckpts = out / "checkpoints"
    aside = [p for p in ckpts.iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["metrics.jsonl", "step-00000003",
                                                                             "step-00000004"]
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == \
        ["step-00000001", "step-00000002", "step-00000003"]
    assert f"resuming from step-00000002: set aside step-00000003, step-00000004, 3 metrics row(s) to {aside[0]}" \
        in capsys.readouterr().err
    # The abandoned branch is never picked again: latest is the new step 3, trained at the new learning rate.
    assert find_checkpoint(ckpts) == ckpts / "step-00000003"
    new3 = load_file(ckpts / "step-00000003" / ADAPTER_FILE)
    assert any(not torch.equal(old3[k], new3[k]) for k in new3)
    rows = [r for r in _rows(out) if "split" not in r and "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]  # each step once: the abandoned rows are aside, not repeated
    assert rows[-1]["lr"] == pytest.approx(1e-3)  # the recipe's new learning rate was applied on resume
    abandoned = [json.loads(x) for x in (aside[0] / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in abandoned} == {3, 4}
    print(f"\nlineage: {sorted(str(p.relative_to(out)) for p in ckpts.rglob('step-*'))}", file=sys.__stdout__)


FIXED = {
    "lora.r": ("lora.r=8", "lora.r 4 → 8"),
    "lora.alpha": ("lora.alpha=16", "lora.alpha 8.0 → 16.0"),
    "lora.dropout": ("lora.dropout=0.1", "lora.dropout 0.0 → 0.1"),
    "lora.target_modules": ("lora.target_modules=[q_proj,v_proj]", "lora.target_modules 'auto' → ['q_proj', 'v_proj']"),
    "lora.use_dora": ("lora.use_dora=true", "lora.use_dora False → True"),
    "model.quant": ("model.quant=nf4", "model.quant 'none' → 'nf4'"),
    "model.name": ("model.name=OTHER", "model.name 'LLAMA' → 'OTHER'"),
    "model.chat_template": ("model.chat_template=chatml", "model.chat_template None → 'chatml'"),
}


@pytest.mark.parametrize("key", list(FIXED))
def test_a_change_the_checkpoint_cannot_serve_is_refused_by_name(key, finished, tiny_llama, chat_data, tmp_path,
                                                                 capsys):
    out = shutil.copytree(finished, tmp_path / "run")
    other = shutil.copytree(tiny_llama, tmp_path / "other-model")
    recipe = _recipe(tmp_path / "r.yaml", tiny_llama, chat_data, out)
    setting, change = FIXED[key]
    before = _tree(out)
    code = main(["train", str(recipe), "--resume", "latest", "--set", setting.replace("OTHER", str(other))])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    change = change.replace("OTHER", str(other)).replace("LLAMA", str(tiny_llama))
    assert code == 2 and err == (
        f"lora-ft: error: --resume step-00000004: the recipe changed what the checkpoint was trained with: {change}; "
        f"restore these values (see {out}/checkpoints/step-00000004/run_config.yaml), or start a new run (another "
        "output_dir, or --overwrite)")
    assert _tree(out) == before  # nothing moved, nothing written


SERVED = {
    "max_steps": (["train.max_steps=6"], 6, None),
    "evaluation, early stopping, logging, checkpointing": (
        ["train.max_steps=5", "train.eval_every=1", "train.early_stopping_patience=3", "train.log_every=2",
         "train.checkpoint_every=5", "train.keep_checkpoints=3"], 5, None),
    "learning rate and weight decay": (["train.max_steps=5", "train.lr=3e-3", "train.weight_decay=0.1"], 5, None),
    "layer-wise learning rates": (["train.max_steps=5", "train.lr_layer_decay=0.5"], 5, None),
    "max_length (served, no longer an exact replay)": (
        ["train.max_steps=5", "data.max_length=100"], 5,
        "--resume step-00000004 with changed data.max_length 128 → 100: the run continues, but no longer replays the "
        "uninterrupted one exactly"),
}


@pytest.mark.parametrize("case", list(SERVED))
def test_a_change_the_checkpoint_can_serve_keeps_working(case, finished, tiny_llama, chat_data, tmp_path, capsys):
    out = shutil.copytree(finished, tmp_path / "run")
    recipe = _recipe(tmp_path / "r.yaml", tiny_llama, chat_data, out)
    sets, steps, warning = SERVED[case]
    assert main(["train", str(recipe), "--resume", "latest", *(x for s in sets for x in ("--set", s))]) == 0
    rows = [r for r in _rows(out) if "split" not in r and "loss" in r]
    assert rows[-1]["step"] == steps and json.loads((out / "run_info.json").read_text())["steps_done"] == steps
    if case == "learning rate and weight decay":
        assert rows[-1]["lr"] == pytest.approx(3e-3)
        state = torch.load(out / "checkpoints" / "step-00000005" / "trainer_state.pt", weights_only=True)
        assert {g["weight_decay"] for g in state["optimizer"]["param_groups"]} == {0.1}
    log = capsys.readouterr().err
    if "layer-wise" in case:  # the parameter groups are the same; their rates are the recipe's new ones
        state = torch.load(out / "checkpoints" / "step-00000005" / "trainer_state.pt", weights_only=True)
        lrs = {g["name"]: g["lr"] for g in state["optimizer"]["param_groups"]}
        assert lrs["layer1"] == pytest.approx(1e-2) and lrs["layer0"] == pytest.approx(5e-3)
    if warning:
        assert warning in log
    else:
        assert "no longer replays" not in log


def test_resume_latest_without_a_checkpoint_starts_again_and_says_so(tiny_llama, chat_data, tmp_path, capsys):
    """A run stopped before its first checkpoint (no checkpoint_every, killed during setup or step 1) continues with
    --resume latest from step 0; a finished run without checkpoints is refused instead of retrained."""
    out = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", tiny_llama, chat_data, out, checkpoint_every=None, max_steps=2)
    out.mkdir()
    shutil.copy(recipe, out / "run_config.yaml")  # what a run killed during its first step leaves
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "split": "validation", "loss": 9.0}) + "\n")
    assert main(["train", str(recipe), "--resume", "latest"]) == 0
    assert f"--resume latest: {out}/checkpoints holds no intact checkpoint (the run stopped before saving one): " \
           "starting from step 0" in capsys.readouterr().err
    assert [r["step"] for r in _rows(out) if "split" not in r and "loss" in r] == [1, 2]
    assert main(["train", str(recipe), "--resume", "latest"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lora-ft: error: --resume latest: the run in {out} finished (adapter/ is saved) and kept no checkpoint to "
        "continue from; pass --overwrite to train it again, or choose another output_dir")


def test_a_checkpoint_of_another_adapter_shape_is_not_loaded_loosely(tiny_llama, tmp_path):
    """peft's own loader skips missing or extra tensors and would start from a half-loaded adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_ft.errors import RecipeError
    from lora_ft.training import checkpoint

    def model(r):
        return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                              LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))

    checkpoint.save_checkpoint(tmp_path / "ckpts", 1, model(4), {"step": 1}, keep=2)
    with pytest.raises(RecipeError, match=r"checkpoint .*step-00000001 does not fit this recipe's adapter: tensors "
                                          r"8 of another shape \(e.g. base_model.model.model.layers.0.self_attn"):
        checkpoint.load_checkpoint(tmp_path / "ckpts" / "step-00000001", model(2))


def _without_lock(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if not k.endswith(".lora_ft.lock")}


@pytest.mark.parametrize("damage", ["adapter cut short", "state cut short", "recipe cut short",
                                    "recipe cut on a line end"])
def test_a_damaged_newest_checkpoint_is_named_under_resume_latest_and_an_older_one_continues(
        damage, finished, tiny_llama, chat_data, tmp_path, capsys):
    """`--resume latest` never passes over a damaged newest checkpoint in silence (its steps would be lost without
    a word): one line names it, why, and the newest intact one to resume by name; nothing on disk changes. Resuming
    by name then sets the damaged one aside with the rest of the abandoned branch (kept, not deleted)."""
    from test_errors import error_line

    out = shutil.copytree(finished, tmp_path / "run")
    newest = out / "checkpoints" / "step-00000004"
    file = {"adapter cut short": ADAPTER_FILE, "state cut short": "trainer_state.pt"}.get(damage, "run_config.yaml")
    data = (newest / file).read_bytes()
    # Half of each file; the recipe mid-value, or on a line end (its YAML parses: only the keys it lost tell).
    cut = len(data) // 2
    if damage == "recipe cut short":
        cut = data.index(b"  max_length: 128\n") + len(b"  max_length: 12")
    elif damage == "recipe cut on a line end":
        cut = data.index(b"train:\n")
    (newest / file).write_bytes(data[:cut])
    why = {"adapter cut short": f"{ADAPTER_FILE}: Error while deserializing header: incomplete metadata, file not "
                                "fully covered",
           "state cut short": "trainer_state.pt: [Errno 22] Invalid argument",  # torch's own words
           "recipe cut short": "run_config.yaml: cut short (its last line is unfinished)",
           "recipe cut on a line end": "run_config.yaml: cut short (it ends before output_dir, the last key a run "
                                       "writes)"}[damage]
    before = _without_lock(_tree(out))
    recipe = _recipe(tmp_path / "r.yaml", tiny_llama, chat_data, out)
    assert main(["train", str(recipe), "--resume", "latest"]) == 2
    assert error_line(capsys.readouterr().err) == (
        f"lora-ft: error: --resume latest: the newest checkpoint {newest} is damaged ({why}); continue from the "
        "newest intact one with --resume step-00000003, or delete step-00000004")
    assert _without_lock(_tree(out)) == before
    assert main(["train", str(recipe), "--resume", "step-00000003"]) == 0
    aside = next(p for p in (out / "checkpoints").iterdir() if p.name.startswith("abandoned-"))
    assert (aside / "step-00000004" / file).read_bytes() == data[:cut]


def test_resume_latest_with_every_checkpoint_damaged_says_so(finished, tiny_llama, chat_data, tmp_path, capsys):
    from test_errors import error_line

    out = shutil.copytree(finished, tmp_path / "run")
    for step in (out / "checkpoints").glob("step-*"):
        (step / ADAPTER_FILE).write_bytes(b"")
    recipe = _recipe(tmp_path / "r.yaml", tiny_llama, chat_data, out)
    assert main(["train", str(recipe), "--resume", "latest"]) == 2
    assert error_line(capsys.readouterr().err) == (
        f"lora-ft: error: --resume latest: the newest checkpoint {out / 'checkpoints' / 'step-00000004'} is damaged "
        f"({ADAPTER_FILE}: Error while deserializing header: header too small); no intact checkpoint is left: "
        f"delete {out / 'checkpoints'} to start again from step 0 with --resume latest, or train again with "
        "--overwrite")


def test_a_damaged_metrics_row_stops_a_resume_with_the_line_named(finished, tiny_llama, chat_data, tmp_path, capsys):
    from test_errors import error_line

    out = shutil.copytree(finished, tmp_path / "run")
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1][:10] + "\n"  # a row an older version's crash cut, with rows written after it
    (out / "metrics.jsonl").write_text("".join(lines))
    before = _without_lock(_tree(out))
    recipe = _recipe(tmp_path / "r.yaml", tiny_llama, chat_data, out)
    assert main(["train", str(recipe), "--resume", "step-00000002"]) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"lora-ft: error: {out / 'metrics.jsonl'} line 2 is not valid JSON (") and \
        err.endswith("); delete that line (the rows before and after it stay usable)"), err
    assert _without_lock(_tree(out)) == before
