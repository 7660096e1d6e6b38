"""Bad input, one table: every row exits non-zero with one line naming the fix, and damages nothing on disk."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import classification_rows, write_jsonl

from lora_ft.cli import main


def error_line(err: str) -> str:
    """The CLI's error: exactly one 'lora-ft' line, the last one (INFO progress lines may precede it)."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("lora-ft:") and sum(x.startswith("lora-ft") for x in lines) == 1, err
    assert "Traceback" not in err, err
    return lines[-1]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _gguf_of_unknown_architecture(path: Path) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "nonesuch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _without_chat_template(tiny_llama: Path, dest: Path) -> Path:
    shutil.copytree(tiny_llama, dest)
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dest


# id → (recipe changes as a function of (tmp, fixtures), expected words in the one-line message)
CASES = {
    "malformed YAML": ("RAW:model: {name: [x\n", "malformed YAML at line"),
    "unknown key": ({"lora": {"rank": 8}}, "lora.rank: unknown key (did you mean 'r'?)"),
    "r <= 0": ({"lora": {"r": 0}}, "lora.r: Input should be greater than 0"),
    "lr <= 0": ({"train": {"lr": 0}}, "train.lr: Input should be greater than 0"),
    "dropout out of [0,1)": ({"lora": {"dropout": 1.0}}, "lora.dropout: Input should be less than 1"),
    "model folder missing": ({"model": {"name": "./no/such/model"}}, "model.name: ./no/such/model does not exist"),
    "Hub id unreachable": ({"model": {"name": "nobody/no-such-model"}},
                           "model.name: cannot load 'nobody/no-such-model'"),
    "GGUF of unknown architecture": (lambda t, f: {"model": {"name": str(_gguf_of_unknown_architecture(t / "m.gguf"))}},
                                     "model.name: cannot import m.gguf"),
    "data file missing": (lambda t, f: {"data": {"train": str(t / "missing.jsonl")}}, "data.train: file not found"),
    "unreadable format": (lambda t, f: {"data": {"train": str(_write(t / "d.txt", "hello"))}},
                          "cannot read '.txt' files; use .jsonl"),
    "broken jsonl": (lambda t, f: {"data": {"train": str(_write(t / "d.jsonl", '{"text": 1}\n{oops\n'))}},
                     "data.train: cannot parse"),
    "missing columns": (lambda t, f: {"data": {"train": str(write_jsonl(t / "q.jsonl", [{"q": "a", "a": "b"}]))}},
                        "columns ['q', 'a']; set data.format and the column names"),
    "empty split": (lambda t, f: {"data": {"validation": str(_write(t / "e.jsonl", ""))}}, "holds no examples"),
    "unseen validation label": (lambda t, f: {
        "model": {"name": str(f["bert"]), "task": "sequence_classification"},
        "data": {"train": str(write_jsonl(t / "c.jsonl", classification_rows(20, 0))),
                 "validation": str(write_jsonl(t / "v.jsonl", [{"text": "rain", "label": "sports"}]))}},
        "data.validation: label(s) ['sports'] never occur in the training data"),
    "chat without assistant turn": (lambda t, f: {"data": {"train": str(write_jsonl(
        t / "n.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]))}}, "needs an assistant turn"),
    "tokenizer without chat template": (lambda t, f: {
        "model": {"name": str(_without_chat_template(f["llama"], t / "notemplate"))}},
        "has no chat template, so 'messages' data cannot be rendered"),
    "every example too long": ({"data": {"max_length": 4}}, "raise max_length"),
    "target_modules match nothing": ({"lora": {"target_modules": ["qkv_proj"]}},
                                     "['qkv_proj'] match no linear layer of the backbone; candidates: down_proj"),
    "bitsandbytes missing": ({"model": {"quant": "nf4"}, "_no_bnb": True}, "model.quant nf4 needs bitsandbytes"),
    "resume without checkpoint": ({"_argv": ["--resume", "latest"]}, "--resume latest: no intact checkpoint"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _merge(tree: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return tree


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_table(case, tmp_path, tiny_llama, tiny_bert, chat_data, capsys, monkeypatch):
    change, expected = CASES[case]
    recipe = tmp_path / "recipe.yaml"
    out = tmp_path / "run"
    tree = {"model": {"name": str(tiny_llama)},
            "data": {"train": str(chat_data["train"]), "validation": str(chat_data["validation"])},
            "train": {"max_steps": 2}, "output_dir": str(out)}
    argv = []
    if isinstance(change, str):
        recipe.write_text(change.removeprefix("RAW:"))
    else:
        changes = change(tmp_path, {"llama": tiny_llama, "bert": tiny_bert}) if callable(change) else dict(change)
        argv = changes.pop("_argv", [])
        if changes.pop("_no_bnb", False):
            monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
        recipe.write_text(yaml.safe_dump(_merge(tree, changes)))
    inputs = {p: _digest(p) for p in (tiny_llama, tiny_bert, chat_data["train"].parent)}
    code = main(["train", str(recipe), *argv])
    err = capsys.readouterr().err.strip()
    assert code != 0
    err = error_line(err)
    assert err.startswith("lora-ft: error:") and expected in err, err
    assert {p: _digest(p) for p in inputs} == inputs  # nothing the user had was touched
    assert not (out / "adapter").exists()
    print(f"{case}: {err}", file=sys.__stdout__)  # the table for the closing note (pytest -s)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_llama, chat_data, tmp_path, capsys, monkeypatch):
    import torch

    from lora_ft import checkpoint

    calls = {"n": 0}
    real_save = torch.save

    def save_then_fill_the_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:  # the first checkpoint succeeds, the second finds the disk full
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", save_then_fill_the_disk)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": str(tiny_llama)}, "data": {"train": str(chat_data["train"])},
                                      "train": {"max_steps": 4, "checkpoint_every": 1},
                                      "output_dir": str(tmp_path / "run")}))
    assert main(["train", str(recipe)]) == 1
    err = error_line(capsys.readouterr().err)
    assert "No space left on device" in err and "--resume latest" in err
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000001"]  # no half-written folder left
    assert checkpoint.find_checkpoint(ckpts) == ckpts / "step-00000001"


def test_corrupt_checkpoint_is_skipped_for_the_previous_one(tiny_llama, chat_data, tmp_path, caplog):
    from conftest import make_recipe

    from lora_ft import checkpoint
    from lora_ft.train import train

    recipe = make_recipe(tiny_llama, {"train": chat_data["train"]}, tmp_path / "run",
                         train={"max_steps": 4, "checkpoint_every": 2})
    train(recipe)
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step-00000004" / checkpoint.STATE_FILE).write_bytes(b"truncated")
    assert checkpoint.find_checkpoint(ckpts) == ckpts / "step-00000002"
    assert "skipping checkpoint" in caplog.text and "step-00000004" in caplog.text


def test_nan_loss_stops_with_the_step_named(tiny_llama, chat_data, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama)}, "data": {"train": str(chat_data["train"])},
        "train": {"max_steps": 6, "lr": 1.0e+30, "max_grad_norm": None, "warmup": 0, "checkpoint_every": 1},
        "output_dir": str(tmp_path / "run")}))
    assert main(["train", str(recipe)]) == 1
    err = error_line(capsys.readouterr().err)
    assert "loss became nan at step" in err or "loss became inf at step" in err, err
    assert "last good checkpoint" in err and not (tmp_path / "run" / "adapter").exists()


_DRIVER = """
import sys
from lora_ft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start_training(recipe: Path, tmp_path: Path, *extra):
    import subprocess

    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    return subprocess.Popen([sys.executable, str(driver), "train", str(recipe), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                                     "OMP_NUM_THREADS": "1"})


def _wait_for(path_glob, folder: Path, timeout=120.0):
    import time

    end = time.time() + timeout
    while time.time() < end:
        if list(folder.glob(path_glob)):
            return
        time.sleep(0.05)
    raise TimeoutError(path_glob)


def _long_recipe(tiny_llama, chat_data, tmp_path) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama)}, "data": {"train": str(chat_data["train"])},
        "train": {"max_steps": 100000, "micro_batch_size": 2, "checkpoint_every": 5, "log_every": 1},
        "output_dir": str(tmp_path / "run")}))
    return recipe


def test_sigterm_checkpoints_exits_non_zero_and_says_how_to_resume(tiny_llama, chat_data, tmp_path):
    import signal

    recipe = _long_recipe(tiny_llama, chat_data, tmp_path)
    proc = _start_training(recipe, tmp_path)
    _wait_for("metrics.jsonl", tmp_path / "run")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "--resume latest" in err and str(recipe) in err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last_step = max(r["step"] for r in rows if "split" not in r)
    from lora_ft.checkpoint import find_checkpoint

    assert find_checkpoint(tmp_path / "run" / "checkpoints").name == f"step-{last_step:08d}"


def test_kill_9_during_saves_always_leaves_an_intact_checkpoint(tiny_llama, chat_data, tmp_path):
    """SIGKILL at several moments while checkpoints are written every step: the newest intact checkpoint is
    always found, and resuming from it works."""
    import random
    import signal
    import time

    from lora_ft.checkpoint import find_checkpoint, list_checkpoints

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama)}, "data": {"train": str(chat_data["train"])},
        "train": {"max_steps": 100000, "micro_batch_size": 2, "checkpoint_every": 1, "keep_checkpoints": 2},
        "output_dir": str(tmp_path / "run")}))
    rng = random.Random(0)
    ckpts = tmp_path / "run" / "checkpoints"
    newest = 0
    for attempt in range(3):
        proc = _start_training(recipe, tmp_path, *(["--resume", "latest"] if attempt else []))
        _wait_for(f"step-{newest + 2:08d}", ckpts)  # resumed, and saving again
        time.sleep(rng.uniform(0.2, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        found = find_checkpoint(ckpts)
        assert found is not None and found == list_checkpoints(ckpts)[-1]
        newest = int(found.name.removeprefix("step-"))
    leftovers = sorted(p.name for p in ckpts.iterdir())
    print(f"after kill -9: {leftovers}", file=sys.__stdout__)
