"""The command line: one-line errors with non-zero exits, validate, train and eval through main()."""

import json
import subprocess
import sys

import pytest
from conftest import write_jsonl

from lora_ft.cli import main


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lora_ft", *args], capture_output=True, text=True, cwd=cwd,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("text, needle", [
    ("model: {name: x\n", "malformed YAML"),
    ("lora: {rr: 8}\n", "lora.rr: unknown key (did you mean 'r'?)"),
    ("train: {lr: 0}\n", "train.lr: Input should be a positive number or 'auto'"),
    ("- just\n- a list\n", "a recipe is a mapping of sections"),
])
def test_bad_recipe_exits_non_zero_with_one_line(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    r = run_cli("validate", str(p))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-ft: error:") and needle in lines[0], r.stderr


def test_validate_reports_missing_files(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data: {train: nowhere.jsonl}\nmodel: {name: ./nope.gguf}\n")
    r = run_cli("validate", str(p))
    assert r.returncode == 2 and "data.train: file not found" in r.stderr and "model.name" in r.stderr


def test_validate_ok(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    p = tmp_path / "r.yaml"
    p.write_text("data: {train: t.jsonl}\n")
    r = run_cli("validate", str(p), "--set", "lora.r=4")
    assert r.returncode == 0 and r.stdout.startswith("ok:") and "r=4" in r.stdout


def test_train_then_eval_from_the_command_line(tiny_llama, chat_data, tmp_path, capsys):
    p = tmp_path / "r.yaml"
    # fp32: `lora-ft eval` batches differently from training's evaluation, which bf16 (auto here) does not keep to 1e-4
    p.write_text(f"model: {{name: {tiny_llama}, compute_dtype: fp32}}\ndata: {{train: {chat_data['train']}, "
                 f"validation: {chat_data['validation']}}}\noutput_dir: {tmp_path / 'run'}\n")
    assert main(["train", str(p), "--set", "train.max_steps=20", "--set", "train.lr=1e-2",
                 "--set", "data.max_eval_examples=4"]) == 0
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert results["after"]["validation"]["examples"] == 4  # the cap applies to evaluation during training
    assert results["after"]["validation"]["loss"] < results["before"]["validation"]["loss"]
    rows = [json.loads(x) for x in chat_data["validation"].read_text().splitlines()]
    first4 = write_jsonl(tmp_path / "first4.jsonl", rows[:4])
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--data", str(first4), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["adapter"]
    assert printed["examples"] == 4
    assert printed["loss"] == pytest.approx(results["after"]["validation"]["loss"], rel=1e-4)
    # ... but not to `lora-ft eval`: it scores every row of the file it is given
    assert main(["eval", str(tmp_path / "run"), "--data", str(chat_data["validation"]), "--json"]) == 0
    assert len(rows) == 24 and json.loads(capsys.readouterr().out)["adapter"]["examples"] == 24
    # the run is protected: a second train into it fails cleanly
    assert main(["train", str(p)]) == 2


def test_eval_of_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--data", "x.jsonl"]) == 2
    assert "is not a lora_ft run" in capsys.readouterr().err
