"""Bad input, one table: every row exits with status 2 and one line naming the fix, and damages nothing on disk:
the inputs are unchanged and no run is started (no run_config.yaml, no adapter)."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import chat_rows, classification_rows, write_jsonl

from lora_ft.cli import main
from lora_ft.errors import SaveError


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
    "lr <= 0": ({"train": {"lr": 0}}, "train.lr: Input should be a positive number or 'auto'"),
    "dropout out of [0,1)": ({"lora": {"dropout": 1.0}}, "lora.dropout: Input should be less than 1"),
    "negative dropout": ({"lora": {"dropout": -0.1}}, "lora.dropout: Input should be greater than or equal to 0"),
    "wrong type": ({"lora": {"r": "eight"}}, "lora.r: Input should be a valid integer"),
    "batch sizes do not divide": ({"train": {"global_batch_size": 12, "micro_batch_size": 8}},
                                  "train.global_batch_size 12 is not a multiple of micro_batch_size 8"),
    "model folder missing": ({"model": {"name": "./no/such/model"}}, "/no/such/model does not exist"),
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
        "data": {"max_length": 128, "train": str(write_jsonl(t / "c.jsonl", classification_rows(20, 0))),
                 "validation": str(write_jsonl(t / "v.jsonl", [{"text": "rain", "label": "sports"}]))}},
        "data.validation: label(s) ['sports'] never occur in the training data"),
    "chat without assistant turn": (lambda t, f: {"data": {"train": str(write_jsonl(
        t / "n.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]))}},
        "n.jsonl row 1, column 'messages' has no assistant answer after the prompt"),
    "tokenizer without chat template": (lambda t, f: {
        "model": {"name": str(_without_chat_template(f["llama"], t / "notemplate"))}},
        "has no chat template, so 'messages' data cannot be rendered"),
    "every example too long": ({"data": {"max_length": 4}}, "raise max_length"),
    "target_modules match nothing": ({"lora": {"target_modules": ["qkv_proj"]}},
                                     "['qkv_proj'] match no linear layer of the backbone; candidates: down_proj"),
    "bitsandbytes missing": ({"model": {"quant": "nf4"}, "_no_bnb": True}, "model.quant nf4 needs bitsandbytes"),
    "bitsandbytes unsupported here": ({"model": {"quant": "nf4"}, "_bnb_broken": True},
                                      "model.quant nf4: bitsandbytes cannot run here ("),
    "validation_split leaves no training data": (
        lambda t, f: {"data": {"train": str(write_jsonl(t / "few.jsonl", chat_rows(10, 0))), "validation": None,
                               "validation_split": 0.95}},
        "data.validation_split 0.95 of 10 training example(s) leaves 0 to train on"),
    "infinite learning rate": ("RAW:train: {lr: .inf}\n", "train.lr: Input should be a finite number"),
    "resume without a run": ({"_argv": ["--resume", "latest"]}, "holds no run to continue (no run_config.yaml); "
                                                                  "drop --resume to start one"),
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
        if changes.pop("_bnb_broken", False):  # a build without kernels for this device: fails when quantizing
            import bitsandbytes.functional as bnbf

            def no_kernel(*args, **kwargs):
                raise RuntimeError("no kernel for this device")

            monkeypatch.setattr(bnbf, "quantize_4bit", no_kernel)
        recipe.write_text(yaml.safe_dump(_merge(tree, changes)))
    inputs = {p: _digest(p) for p in (tiny_llama, tiny_bert, chat_data["train"].parent)}
    code = main(["train", str(recipe), *argv])
    err = capsys.readouterr().err.strip()
    err = error_line(err)
    assert code == 2, (code, err)  # the README's promise for recipe errors
    assert err.startswith("lora-ft: error:") and expected in err, err
    assert {p: _digest(p) for p in inputs} == inputs  # nothing the user had was touched
    assert not (out / "run_config.yaml").exists() and not (out / "adapter").exists()
    print(f"{case}: {err}", file=sys.__stdout__)  # the table for the closing note (pytest -s)


SAFETENSORS_ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 4736 vs 4630"


def _fake_disk(monkeypatch, under: Path, free: int, total: int = 500 * 2**30) -> None:
    """``shutil.disk_usage`` reports ``free`` bytes for paths under ``under`` (elsewhere the real value, so
    datasets' own free-space checks of its cache are not disturbed)."""
    real = shutil.disk_usage

    def usage(path):
        if str(Path(path).resolve()).startswith(str(under.resolve())):
            return real(path)._replace(total=total, used=total - free, free=free)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", usage)


def _fail_second_write(monkeypatch, writer: str) -> None:
    """From the second call on, the adapter's safetensors write or torch.save's state write finds the disk
    full: a partial file is left, then the library's real error for a full disk is raised."""
    import peft.peft_model
    import safetensors

    from lora_ft.training import checkpoint

    module, name, error = {
        "safetensors": (peft.peft_model, "safe_save_file", safetensors.SafetensorError(SAFETENSORS_ENOSPC)),
        "torch.save": (checkpoint.torch, "save", RuntimeError(TORCH_FULL + "\nException raised from ...")),
    }[writer]
    real, calls = getattr(module, name), {"n": 0}

    def write_then_fail(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:
            Path(f).write_bytes(b"partial")
            raise error
        return real(obj, f, *a, **k)

    monkeypatch.setattr(module, name, write_then_fail)


@pytest.mark.parametrize("writer, reason", [("safetensors", SAFETENSORS_ENOSPC), ("torch.save", TORCH_FULL)],
                         ids=["safetensors", "torch.save"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(writer, reason, tiny_llama, chat_data, tmp_path,
                                                              capsys, monkeypatch):
    import torch

    from lora_ft.training import checkpoint

    _fail_second_write(monkeypatch, writer)  # the first checkpoint succeeds, the second finds the disk full
    _fake_disk(monkeypatch, tmp_path / "run", free=10 * 2**20)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": str(tiny_llama)}, "data": {"train": str(chat_data["train"])},
                                      "train": {"max_steps": 4, "checkpoint_every": 1},
                                      "output_dir": str(tmp_path / "run")}))
    assert main(["train", str(recipe)]) == 1
    err = error_line(capsys.readouterr().err)
    ckpts = tmp_path / "run" / "checkpoints"
    assert err == (f"lora-ft: error: could not write {ckpts / 'step-00000002'}: {reason} (disk full?); the previous "
                   "copy is intact - free disk space (or set another output_dir) and continue with --resume latest")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000001"]  # no .tmp folder or half-written copy
    assert checkpoint.find_checkpoint(ckpts) == ckpts / "step-00000001"
    state = torch.load(ckpts / "step-00000001" / checkpoint.STATE_FILE, weights_only=True)
    assert state["step"] == 1 and state["position"] == 1
    from safetensors.torch import load_file

    adapter = load_file(ckpts / "step-00000001" / checkpoint.ADAPTER_FILE)
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())


# ---------------------------------------------------------------- checkpoint.py on a tiny peft model


@pytest.fixture
def peft_model(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


def _mark(model, value: float):
    """Fill every lora_B with ``value``, so a saved copy tells which save wrote it."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(value)
    return model


def _marked(folder: Path, adapter_file: str = "adapter_model.safetensors") -> set[float]:
    from safetensors.torch import load_file

    weights = load_file(folder / adapter_file)
    return {float(v) for k, t in weights.items() if "lora_B" in k for v in t.unique()}


def _save(root: Path, step: int, model, keep: int) -> Path:
    from lora_ft.training import checkpoint

    return checkpoint.save_checkpoint(root, step, _mark(model, float(step)), {"step": step}, keep)


def test_pruning_keeps_exactly_the_newest_k_checkpoints(peft_model, tmp_path):
    import torch

    from lora_ft.training import checkpoint

    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        _save(root, step, peft_model, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004"]
    for step in (3, 4):
        folder = root / f"step-{step:08d}"
        assert _marked(folder, checkpoint.ADAPTER_FILE) == {float(step)}
        assert torch.load(folder / checkpoint.STATE_FILE, weights_only=True)["step"] == step
    assert checkpoint.find_checkpoint(root) == root / "step-00000004"


class _Killed(BaseException):
    """A kill -9 stand-in: not an Exception, so no cleanup code in checkpoint.py runs."""


@pytest.mark.parametrize("kill", [None, "before the new copy is in place", "before the old copy is deleted"])
def test_saving_a_step_twice_always_leaves_an_intact_checkpoint(kill, peft_model, tmp_path, monkeypatch):
    """keep=1 and a signal on a checkpoint_every step: the same step is saved twice. A kill at any point of
    the second save leaves the old or the new copy findable, never neither."""
    import os

    from lora_ft.training import checkpoint

    root = tmp_path / "checkpoints"
    _save(root, 2, peft_model, keep=1)
    _save(root, 3, peft_model, keep=1)  # step 2 pruned: step 3 is the only checkpoint
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def rename(src, dst, *a, **k):
        if kill == "before the new copy is in place" and Path(src).name.startswith(".tmp-step"):
            raise _Killed
        return real_rename(src, dst, *a, **k)

    def rmtree(path, *a, **k):
        if kill == "before the old copy is deleted" and Path(path).name.endswith(".old") and Path(path).exists():
            raise _Killed
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    peft_model = _mark(peft_model, 33.0)
    try:
        checkpoint.save_checkpoint(root, 3, peft_model, {"step": 3}, keep=1)
    except _Killed:
        pass
    monkeypatch.undo()
    left = sorted(p.name for p in root.iterdir())
    expected = {None: (["step-00000003"], 33.0),
                "before the new copy is in place": ([".step-00000003.old", ".tmp-step-00000003"], 3.0),
                "before the old copy is deleted": ([".step-00000003.old", "step-00000003"], 33.0)}[kill]
    assert left == expected[0]
    # What a resume sees: the aside copy is put back (or dropped when the new one was committed).
    found = checkpoint.find_checkpoint(root)
    assert found == root / "step-00000003" and _marked(found, checkpoint.ADAPTER_FILE) == {expected[1]}
    # And the next save works and cleans up.
    _save(root, 4, peft_model, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]


def test_a_stale_aside_adapter_does_not_block_the_next_save(peft_model, tmp_path):
    """A kill between 'rename the old adapter aside' and 'delete it' leaves .adapter.old behind."""
    from lora_ft.training import checkpoint

    folder = tmp_path / "run" / "adapter"
    checkpoint.save_adapter(_mark(peft_model, 1.0), folder)
    stale = tmp_path / "run" / ".adapter.old"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"left by a kill")
    checkpoint.save_adapter(_mark(peft_model, 2.0), folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["adapter"]
    assert _marked(folder) == {2.0}
    # Killed before the new adapter was in place: the aside copy is the only one and comes back.
    folder.rename(stale)
    checkpoint.save_adapter(_mark(peft_model, 3.0), folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["adapter"] and _marked(folder) == {3.0}


@pytest.mark.parametrize("free, hint", [(50 * 2**20, True), (400 * 2**30, False)])
@pytest.mark.parametrize("error", [
    "safetensors", OSError(errno.EIO, "Input/output error"), RuntimeError(TORCH_FULL)])
def test_a_failed_adapter_write_is_one_line_and_keeps_the_old_adapter(error, free, hint, peft_model, tmp_path,
                                                                     monkeypatch):
    import peft.peft_model
    import safetensors

    from lora_ft.training import checkpoint

    folder = tmp_path / "run" / "adapter"
    checkpoint.save_adapter(_mark(peft_model, 1.0), folder)
    if error == "safetensors":
        error = safetensors.SafetensorError(SAFETENSORS_ENOSPC)

    def fail(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise error

    monkeypatch.setattr(peft.peft_model, "safe_save_file", fail)
    _fake_disk(monkeypatch, tmp_path, free=free)
    with pytest.raises(SaveError) as caught:
        checkpoint.save_adapter(_mark(peft_model, 2.0), folder)
    message = str(caught.value)
    reason = error.strerror if isinstance(error, OSError) else str(error)
    assert message == (f"could not write {folder}: {reason}{' (disk full?)' if hint else ''}; the previous copy is "
                       "intact - free disk space (or set another output_dir) and continue with --resume latest")
    assert "\n" not in message
    assert sorted(p.name for p in folder.parent.iterdir()) == ["adapter"]  # no .adapter.tmp left
    assert _marked(folder) == {1.0}


def test_a_checkpoint_holding_pickled_code_is_refused(peft_model, tmp_path, caplog):
    """The state is read with weights_only=True: a pickle whose __reduce__ would run code is skipped."""
    import torch

    from lora_ft.errors import UsageError
    from lora_ft.training import checkpoint

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return open, (str(marker), "w")  # unpickling creates the marker file

    root = tmp_path / "checkpoints"
    _save(root, 1, peft_model, keep=5)
    _save(root, 2, peft_model, keep=5)
    torch.save({"step": 2, "payload": Evil()}, root / "step-00000002" / checkpoint.STATE_FILE)
    assert checkpoint.find_checkpoint(root) == root / "step-00000001"
    assert "skipping checkpoint" in caplog.text and "step-00000002" in caplog.text
    with pytest.raises(UsageError, match=r"step-00000002 is not an intact checkpoint \(trainer_state.pt holds more "
                                          r"than tensors and plain values: loading it would run code\); intact "
                                          "checkpoints under .*: step-00000001 "):
        checkpoint.find_checkpoint(root, "step-00000002")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        checkpoint.load_checkpoint(root / "step-00000002", peft_model)
    assert not marker.exists()
    # The file really is malicious: a plain pickle load runs its code.
    torch.load(root / "step-00000002" / checkpoint.STATE_FILE, weights_only=False)
    assert marker.exists()


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "split" not in r and "loss" in r}


def test_resume_from_a_named_checkpoint_continues_the_losses(tiny_llama, chat_data, tmp_path, capsys,
                                                             monkeypatch):
    """`--resume step-00000003` is looked up under output_dir/checkpoints (not the cwd); mid-epoch (24 batches
    an epoch), with dropout, the resumed losses equal the uninterrupted run's."""
    def recipe(run: str) -> Path:
        path = tmp_path / f"{run}.yaml"
        path.write_text(yaml.safe_dump({
            "model": {"name": str(tiny_llama)}, "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
            "data": {"train": str(chat_data["train"])},
            "train": {"max_steps": 5, "micro_batch_size": 4, "lr": 1e-2, "warmup": 0, "log_every": 1,
                      "checkpoint_every": 3, "keep_checkpoints": 5},
            "output_dir": str(tmp_path / run)}))
        return path

    monkeypatch.chdir(tmp_path)  # no step-00000003 here: the name must resolve against the run
    assert main(["train", str(recipe("full"))]) == 0
    # A run that died after step 3 holds only that checkpoint.
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000003",
                    tmp_path / "part" / "checkpoints" / "step-00000003")
    assert main(["train", str(recipe("part")), "--resume", "step-00000003"]) == 0
    full, part = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert sorted(full) == [1, 2, 3, 4, 5] and sorted(part) == [4, 5]
    diff = max(abs(full[s] - part[s]) for s in part)
    assert diff < 1e-6, (full, part)
    print(f"resume from step-00000003: max loss difference {diff:.3g} over steps 4-5", file=sys.__stdout__)
    capsys.readouterr()
    assert main(["train", str(recipe("part")), "--resume", "step-00000009"]) == 2
    err = error_line(capsys.readouterr().err)
    ckpts = tmp_path / "part" / "checkpoints"
    assert err == (f"lora-ft: error: --resume step-00000009: {ckpts / 'step-00000009'} does not exist; intact "
                   f"checkpoints under {ckpts}: step-00000003 (give one of them, or --resume latest)")


def test_corrupt_checkpoint_is_skipped_for_the_previous_one(tiny_llama, chat_data, tmp_path, caplog):
    """Where nothing resumes from it (the message after a signal names the last checkpoint); ``--resume latest``
    refuses it by name instead (test_resume.py)."""
    from conftest import make_recipe

    from lora_ft.training import checkpoint
    from lora_ft.training.trainer import train

    recipe = make_recipe(tiny_llama, {"train": chat_data["train"]}, tmp_path / "run",
                         train={"max_steps": 4, "checkpoint_every": 2})
    train(recipe)
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step-00000004" / checkpoint.STATE_FILE).write_bytes(b"truncated")
    assert checkpoint.find_checkpoint(ckpts) == ckpts / "step-00000002"
    assert "skipping checkpoint" in caplog.text and "step-00000004" in caplog.text


def test_nan_loss_stops_with_the_step_named_and_a_good_checkpoint_to_resume(tiny_llama, chat_data, tmp_path,
                                                                              capsys, monkeypatch):
    """A loss that turns NaN at step 4 is caught before any save, even between logging steps (log_every 10);
    the named checkpoint exists, holds finite weights, and a resume from it trains on."""
    from safetensors.torch import load_file

    from lora_ft.objectives import CausalLM

    real, calls = CausalLM.loss, []

    def nan_at_step_4(self, model, batch):  # a fault injected into real training
        loss = real(self, model, batch)
        calls.append(1)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(CausalLM, "loss", nan_at_step_4)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama)}, "data": {"train": str(chat_data["train"])},
        "train": {"max_steps": 8, "warmup": 0, "checkpoint_every": 1, "keep_checkpoints": 10, "log_every": 10},
        "output_dir": str(tmp_path / "run")}))
    assert main(["train", str(recipe)]) == 1
    err = error_line(capsys.readouterr().err)
    good = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert "loss became non-finite at step 4;" in err and f"last good checkpoint: {good}" in err, err
    assert "--resume step-00000002" in err and not (tmp_path / "run" / "adapter").exists()
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == ["step-00000001", "step-00000002", "step-00000003"]  # nothing from step 4 on
    assert all(torch.isfinite(t).all() for t in load_file(good / "adapter" / "adapter_model.safetensors").values())
    monkeypatch.setattr(CausalLM, "loss", real)
    assert main(["train", str(recipe), "--resume", "step-00000002"]) == 0
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r and "split" not in r)


_DRIVER = """
import io
import os
import sys
import threading
from pathlib import Path

from lora_ft import storage
from lora_ft.cli import main
from lora_ft.training import checkpoint

# A test hook, for the kill -9 test: block (until killed) at a chosen moment inside a save, after saying so.
point, marker = os.environ.get("BLOCK_AT", ""), Path(os.environ.get("BLOCK_MARKER", "/nonexistent"))


def block(what):
    marker.write_text(what)
    threading.Event().wait()


if point.startswith("state:"):  # half of step N's training state written into its temporary folder
    real_save = checkpoint.torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == int(point.split(":")[1]):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            block(str(f))
        return real_save(obj, f, *args, **kwargs)

    checkpoint.torch.save = save
elif point == "adapter":  # the final adapter complete in its temporary folder, not yet renamed in
    real_replace = storage._replace

    def replace(tmp, folder):
        if folder.name == "adapter":
            block(str(tmp))
        return real_replace(tmp, folder)

    storage._replace = replace
sys.exit(main(sys.argv[1:]))
"""


def _start_training(recipe: Path, tmp_path: Path, *extra, env: dict | None = None):
    import subprocess

    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    return subprocess.Popen([sys.executable, str(driver), "train", str(recipe), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                                     "OMP_NUM_THREADS": "1", **(env or {})})


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


@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_checkpoints_exits_non_zero_and_says_how_to_resume(signame, code, tiny_llama, chat_data, tmp_path):
    import signal

    recipe = _long_recipe(tiny_llama, chat_data, tmp_path)
    proc = _start_training(recipe, tmp_path)
    _wait_for("metrics.jsonl", tmp_path / "run")
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"{signame} received: finishing the current training step first" in err
    assert "--resume latest" in err and str(recipe) in err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last_step = max(r["step"] for r in rows if "split" not in r)
    from lora_ft.training.checkpoint import find_checkpoint

    assert find_checkpoint(tmp_path / "run" / "checkpoints").name == f"step-{last_step:08d}"


def test_kill_9_inside_a_save_always_leaves_an_intact_checkpoint(tiny_llama, chat_data, tmp_path):
    """SIGKILL at two moments that are provably inside a save (a hook in the training process says when it is
    there and waits): half-way through writing step 2's state, and with the final adapter complete in its
    temporary folder but not yet renamed in. Each time the newest intact checkpoint is found, and the run resumed
    after both kills ends with exactly the adapter of an uninterrupted run (dropout on: the RNG is restored too)."""
    import signal

    from conftest import make_recipe

    from lora_ft.training.checkpoint import find_checkpoint

    def recipe(out):
        return make_recipe(tiny_llama, {"train": chat_data["train"]}, out, lora={"dropout": 0.1}, train={
            "max_steps": 3, "micro_batch_size": 4, "checkpoint_every": 1, "keep_checkpoints": 2})

    # The reference trains as the killed runs do, in a process of one thread: the adapters are compared bit for
    # bit, and fp32 CPU kernels may round differently at another thread count (an AVX-512 Intel Xeon did: the
    # reference trained in pytest's two-thread process differed; an AMD EPYC did not).
    (tmp_path / "reference.yaml").write_text(recipe(tmp_path / "reference").dump())
    proc = _start_training(tmp_path / "reference.yaml", tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    path = tmp_path / "r.yaml"
    path.write_text(recipe(tmp_path / "run").dump())
    run, ckpts, marker = tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "inside-a-save"
    listings = {}
    for point, extra in [("state:2", []), ("adapter", ["--resume", "latest"])]:
        marker.unlink(missing_ok=True)
        proc = _start_training(path, tmp_path, *extra, env={"BLOCK_AT": point, "BLOCK_MARKER": str(marker)})
        _wait_for(marker.name, tmp_path, timeout=300)  # the process is inside the save now, and stays there
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        listings[point] = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and
                                 "adapter/" not in str(p.relative_to(run)))
        if point == "state:2":  # the kill landed in the temporary copy of step 2: step 1 is the intact one
            partial = ckpts / ".tmp-step-00000002" / "trainer_state.pt"
            assert marker.read_text() == str(partial) and 0 < partial.stat().st_size
            assert find_checkpoint(ckpts) == ckpts / "step-00000001"
        else:  # the adapter was complete, not yet renamed in: no adapter, step 3 intact
            assert (run / ".adapter.tmp" / "adapter_model.safetensors").is_file() and not (run / "adapter").exists()
            assert find_checkpoint(ckpts) == ckpts / "step-00000003"
    proc = _start_training(path, tmp_path, "--resume", "latest")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    leftovers = sorted(p.name for p in run.iterdir()) + sorted(p.name for p in ckpts.iterdir())
    # Step 2 was logged before the kill in its save: the resume from step 1 set that row aside (it was redone).
    aside = [p for p in ckpts.iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and [p.name for p in aside[0].iterdir()] == ["metrics.jsonl"]
    assert [json.loads(x)["step"] for x in (aside[0] / "metrics.jsonl").read_text().splitlines()] == [2]
    assert leftovers == ["adapter", "checkpoints", "curves.png", "eval_results.json", "metrics.jsonl",
                         "run_config.yaml", "run_info.json", aside[0].name, "step-00000002", "step-00000003"]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # each step logged once
    from safetensors.torch import load_file

    got, want = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (run, tmp_path / "reference"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    print(f"\nafter kill -9 in a save: {listings}\nafter the resume: {leftovers}", file=sys.__stdout__)


def test_a_failed_report_write_is_one_line(tiny_llama, chat_data, tmp_path, capsys, monkeypatch):
    """Writes outside the checkpoint code (here metrics.jsonl) fail with one line too, not a traceback."""
    import errno

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": str(tiny_llama)},
                                      "data": {"train": str(chat_data["train"]),
                                               "validation": str(chat_data["validation"])},
                                      "train": {"max_steps": 1}, "output_dir": str(tmp_path / "run")}))
    real_open = Path.open

    def full_disk(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_disk)
    assert main(["train", str(recipe)]) == 1
    err = error_line(capsys.readouterr().err.strip())
    assert err.startswith("lora-ft: error: No space left on device: ") and "metrics.jsonl" in err, err
