"""lora-ft push: the Hub folder (card, files that load), the upload at the HfApi boundary, and the token's secrecy."""

import ast
import json
import logging
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from conftest import make_recipe
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

from lora_ft.cli import main
from lora_ft.modeling.loading import quantization_config
from lora_ft.run import MERGE_MARKER, Run, open_run
from lora_ft.shipping.card import RECIPE_FILE, base_license, base_model_id, build_card, results_table, split_results
from lora_ft.shipping.merge import merge_run
from lora_ft.training.trainer import train

FAKE_TOKEN = "hf_FAKEtokenFORtestsXYZ0123456789abcdef"
BASE_ID = "acme/tiny-llama-base"


@pytest.fixture(scope="module")
def chat_run(tiny_llama, chat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "chat"
    recipe = make_recipe(tiny_llama, chat_data, out, train={"max_steps": 6})
    recipe.data.max_eval_examples = 8
    train(recipe)
    return out


@pytest.fixture
def no_network(monkeypatch):
    """Any Hub call made by a test that did not stub it fails loudly instead of hanging."""
    def refuse(*args, **kwargs):
        raise AssertionError("unexpected Hub call")

    for name in ("create_repo", "upload_folder", "model_info"):
        monkeypatch.setattr(HfApi, name, refuse)


@pytest.fixture
def token_env(monkeypatch, tmp_path):
    """A fake token in HF_TOKEN, and no token file (a real login on this machine must not be used)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)


def copy_run(run: Path, dest: Path) -> Path:
    """The run's training outputs only (no merges, no Hub folder), to change without touching the original."""
    return Path(shutil.copytree(run, dest, ignore=shutil.ignore_patterns("merged*", "hub", "merge_report.json")))


def usage_code(card: ModelCard) -> str:
    """The Python block of the card's Usage section."""
    section = card.text.split("## Usage", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def bnb_call(code: str) -> BitsAndBytesConfig:
    """The snippet's ``BitsAndBytesConfig(...)``, evaluated."""
    calls = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call)
             and getattr(n.func, "id", None) == "BitsAndBytesConfig"]
    assert len(calls) == 1, code
    return eval(compile(ast.Expression(calls[0]), "card", "eval"), {"torch": torch, "BitsAndBytesConfig":
                                                                    BitsAndBytesConfig})


@torch.no_grad()
def _logits(model, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    return model(**enc).logits


def test_dry_run_adapter_folder_is_complete_with_a_valid_card(chat_run, tiny_llama, no_network, capsys):
    own_config = (chat_run / "adapter" / "adapter_config.json").read_text()
    assert main(["push", str(chat_run), "--repo", "alice/tiny-chat", "--dry-run", "--base-model", BASE_ID]) == 0
    result = json.loads(capsys.readouterr().out)
    folder = chat_run / "hub"
    assert result["folder"] == str(folder) and not result["uploaded"]
    expected = {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "chat_template.jinja", "curves.png", "eval_results.json", RECIPE_FILE}
    assert expected <= set(result["files"]) == {p.name for p in folder.iterdir()}

    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == BASE_ID and card.data.library_name == "peft"
    assert card.data.pipeline_tag == "text-generation" and {"lora", "lora_ft"} <= set(card.data.tags)
    assert card.data.license is None and card.data.datasets is None  # tiny local model and local files
    after = json.loads((chat_run / "eval_results.json").read_text())["after"]["validation"]["loss"]
    assert "| validation | loss |" in card.text and f"{after:.4g}" in card.text
    assert "![training and validation loss](curves.png)" in card.text
    # The published recipe is the run's, with this machine's paths reduced to names (the base: its Hub id).
    run_recipe = open_run(chat_run).recipe.model_dump(mode="json")
    published = yaml.safe_load((folder / RECIPE_FILE).read_text())
    assert published["model"]["name"] == BASE_ID and published["output_dir"] == "chat"
    assert {k: published["data"][k] for k in ("train", "validation", "test")} == \
        {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
    for section in ("model", "data"):
        for key in ("name", "train", "validation", "test"):
            run_recipe[section].pop(key, None), published[section].pop(key, None)
    run_recipe.pop("output_dir"), published.pop("output_dir")
    assert published == run_recipe
    _assert_no_local_path(folder, chat_run.parent.parent)

    # On the Hub, AutoPeftModel finds the base by its id; the run's own adapter is left as it was.
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_ID
    assert (chat_run / "adapter" / "adapter_config.json").read_text() == own_config
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    texts = ["<|im_start|>user\nWhat does the cow say?<|im_end|>\n<|im_start|>assistant\n"]
    pushed = PeftModel.from_pretrained(base, folder)
    expected_logits = _logits(pushed, tok, texts)
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), chat_run / "adapter")
    assert torch.equal(expected_logits, _logits(fresh, tok, texts))


def _assert_no_local_path(folder: Path, *roots: Path) -> None:
    """No file that would be published names a path under ``roots`` (this machine's folders)."""
    for f in folder.rglob("*"):
        if f.is_file() and not f.name.endswith(".safetensors"):
            text = f.read_text(errors="replace")
            for root in roots:
                assert str(root) not in text and str(root.resolve()) not in text, (f, root)


def test_dry_run_merged_folder_opens_with_transformers_and_shows_fidelity(chat_run, tiny_llama, no_network):
    merge_run(chat_run, examples=8)
    assert main(["push", str(chat_run), "--repo", "alice/tiny-chat-merged", "--merged", "--dry-run"]) == 0
    folder = chat_run / "hub"
    assert not (folder / "adapter_config.json").exists() and (folder / "merge_report.json").is_file()
    assert json.loads((folder / "merge_report.json").read_text())["original-fp32"]["out"] == "merged"
    _assert_no_local_path(folder, chat_run.parent.parent, tiny_llama.parent)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and card.data.base_model is None  # local base, no id given
    assert "## Merge fidelity" in card.text and "top-1 agreement" in card.text
    model = AutoModelForCausalLM.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(chat_run / "merged")
    tok = AutoTokenizer.from_pretrained(folder)
    assert torch.equal(_logits(model, tok, ["hello cow"]), _logits(reference, tok, ["hello cow"]))


@pytest.mark.parametrize("what", ["adapter", "merged"])
def test_the_cards_code_loads_exactly_what_was_uploaded(what, chat_run, tiny_llama, tmp_path, no_network, monkeypatch,
                                                        capsys):
    run = copy_run(chat_run, tmp_path / "run")
    if what == "merged":
        merge_run(run, examples=8)
    assert main(["push", str(run), "--repo", "alice/tiny-chat", "--dry-run"]
                + (["--merged"] if what == "merged" else [])) == 0
    folder = run / "hub"
    code = usage_code(ModelCard.load(folder / "README.md")).replace('"alice/tiny-chat"', repr(str(folder)))
    # The folder stands in for the repository; the base, a local folder without a Hub id, is published under its
    # folder name, which resolves from the folder above it.
    monkeypatch.chdir(tiny_llama.parent)
    scope: dict = {}
    exec(code, scope)  # the whole snippet: load, apply the chat template, generate
    assert capsys.readouterr().out.strip()
    tok = AutoTokenizer.from_pretrained(folder)
    texts = ["<|im_start|>user\nWhat does the cow say?<|im_end|>\n<|im_start|>assistant\n"]
    reference = AutoModelForCausalLM.from_pretrained(run / "merged") if what == "merged" else \
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), run / "adapter")
    assert torch.equal(_logits(scope["model"], tok, texts), _logits(reference.eval(), tok, texts))


def test_push_uploads_the_built_folder_and_writes_the_token_nowhere(chat_run, token_env, monkeypatch, caplog,
                                                                   capsys):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        assert huggingface_hub.get_token() == FAKE_TOKEN  # the library resolves the token from HF_TOKEN
        calls["create_repo"] = (repo_id, kwargs)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        calls["upload_folder"] = kwargs
        calls["uploaded_files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        return "https://huggingface.co/alice/tiny-chat/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    caplog.set_level(logging.DEBUG)
    assert main(["-v", "push", str(chat_run), "--repo", "alice/tiny-chat", "--private"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["uploaded"] and result["commit"].endswith("/commit/abc")
    assert calls["create_repo"] == ("alice/tiny-chat", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls["upload_folder"]["repo_id"] == "alice/tiny-chat"
    assert calls["upload_folder"]["folder_path"] == str(chat_run / "hub")
    assert "README.md" in calls["uploaded_files"] and "adapter_model.safetensors" in calls["uploaded_files"]
    assert "token" not in calls["upload_folder"]  # never passed around by us

    written = [p for p in chat_run.rglob("*") if p.is_file()]
    assert len(written) > 10
    for p in written:
        assert FAKE_TOKEN.encode() not in p.read_bytes(), p
    assert FAKE_TOKEN not in caplog.text + out.out + out.err


def test_a_token_pasted_into_the_recipe_stops_the_push_before_anything_is_uploaded(chat_run, tmp_path, token_env,
                                                                                  no_network, capsys):
    """The real guard (hub._assert_no_token), unstubbed: the token in a system prompt reaches the published recipe
    and the card, and the push ends with one line naming the file; the Hub is never called (no_network)."""
    run = Path(shutil.copytree(chat_run, tmp_path / "leaky", ignore=shutil.ignore_patterns("hub", "merged*")))
    config = yaml.safe_load((run / "run_config.yaml").read_text())
    config["data"]["system_prompt"] = f"You are helpful. My key is {FAKE_TOKEN}"
    (run / "run_config.yaml").write_text(yaml.safe_dump(config))
    assert main(["push", str(run), "--repo", "alice/tiny-chat", "--base-model", BASE_ID]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lora-ft: error: {run / 'hub'}/") and err[-1].endswith(
        "contains your Hugging Face token; remove it before pushing")
    assert FAKE_TOKEN not in "\n".join(err)


def test_a_local_path_left_in_a_published_file_stops_the_push(chat_run, tmp_path, no_network, capsys):
    """Paths the recipe names are reduced to file names; a local path anywhere else (here a system prompt that
    names the run's folder) is caught by the last check before anything is published."""
    run = Path(shutil.copytree(chat_run, tmp_path / "pathy", ignore=shutil.ignore_patterns("hub", "merged*")))
    config = yaml.safe_load((run / "run_config.yaml").read_text())
    config["data"]["system_prompt"] = f"Files live in {run.resolve()}/notes"
    (run / "run_config.yaml").write_text(yaml.safe_dump(config))
    assert main(["push", str(run), "--repo", "alice/tiny-chat", "--dry-run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"lora-ft: error: {run / 'hub'}/") and f"contains the local path {run.resolve()}" in err


def test_merged_dir_must_be_a_merge_of_this_run(chat_run, tiny_llama, tmp_path, no_network, capsys):
    """`--merged-dir` with the untouched base model (which has a config.json) or another run's merge is refused:
    the run's card must not be published over something else."""
    other = Path(shutil.copytree(chat_run, tmp_path / "other", ignore=shutil.ignore_patterns("hub", "merged*")))
    merge_run(other, examples=4, out=tmp_path / "other-merged")
    for folder, why in ((tiny_llama, "no lora_ft merge marker: e.g. a base model"),
                        (tmp_path / "other-merged", f"it was merged from {other.resolve()}")):
        assert main(["push", str(chat_run), "--repo", "alice/x", "--merged-dir", str(folder), "--dry-run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == (f"lora-ft: error: {folder} is not a merge of {chat_run} ({why}); push a folder written by "
                       f"'lora-ft merge {chat_run} [--out DIR]'")
    assert not (chat_run / "hub" / "config.json").exists()


def test_a_failed_upload_is_one_line_without_the_token(chat_run, token_env, monkeypatch, capsys):
    def upload_folder(self, **kwargs):
        # As a transport error that echoes a header would read (the HTTP error type needs a live response).
        raise ConnectionError(f"401 Unauthorized: bad token {FAKE_TOKEN}\nmore")

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert main(["push", str(chat_run), "--repo", "alice/tiny-chat", "--base-model", BASE_ID]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lora-ft: error:")]
    assert len(errors) == 1 and "upload to alice/tiny-chat failed: 401 Unauthorized: bad token ***" in errors[0]
    assert FAKE_TOKEN not in err


def test_push_without_token_or_with_a_bad_repo_exits_2(chat_run, monkeypatch, tmp_path, no_network, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert main(["push", str(chat_run), "--repo", "alice/tiny-chat"]) == 2
    assert "no Hugging Face token found: set HF_TOKEN" in capsys.readouterr().err
    for bad in ("not a repo", "just-a-name", "a/b/c"):
        assert main(["push", str(chat_run), "--repo", bad, "--dry-run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--repo" in err[0]


def test_classifier_adapter_folder_card_and_head(tiny_bert, cls_data, tmp_path, no_network):
    out = tmp_path / "cls"
    recipe = make_recipe(tiny_bert, cls_data, out, model={"task": "sequence_classification"},
                         train={"max_steps": 8, "lr": 3e-3, "micro_batch_size": 30})
    recipe.data.max_eval_examples = 10
    train(recipe)
    assert main(["push", str(out), "--repo", "bob/tiny-topics", "--dry-run", "--base-model", "acme/tiny-bert"]) == 0
    folder = out / "hub"
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "text-classification" and card.data.library_name == "peft"
    assert "| test | accuracy |" in card.text and "`animals`, `money`, `weather`" in card.text
    # Loading as the card says (base with the run's labels + PeftModel) restores the trained head.
    id2label = {int(k): v for k, v in json.loads((out / "run_info.json").read_text())["id2label"].items()}
    tok = AutoTokenizer.from_pretrained(folder)

    def load(adapter):
        base = AutoModelForSequenceClassification.from_pretrained(
            tiny_bert, num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()})
        return PeftModel.from_pretrained(base, adapter).eval()

    texts = ["rain and snow today", "the bank price"]
    assert torch.equal(_logits(load(folder), tok, texts), _logits(load(out / "adapter"), tok, texts))


def test_license_comes_from_the_base_models_card(chat_run, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# a base model\n")
    run = open_run(chat_run)
    assert base_license(Run(run.folder, run.recipe, {"source": str(base)}), None) == "mit"
    assert base_license(run, None) is None


@pytest.mark.parametrize("quant, double_quant", [("nf4", True), ("fp4", False), ("int8", True)])
def test_quantized_adapter_card_loads_the_base_as_training_did(chat_run, quant, double_quant):
    run = open_run(chat_run)
    recipe = run.recipe.model_copy(update={"model": run.recipe.model.model_copy(
        update={"quant": quant, "double_quant": double_quant})})
    q_run = Run(run.folder, recipe, {**run.info, "compute_dtype": "bf16"})
    card = build_card(q_run, "alice/q", False, BASE_ID, None, None)
    code = usage_code(card)
    tree = ast.parse(code)  # valid Python
    # The config the card builds is the one training builds for this recipe (model.quantization_config).
    trained = quantization_config(recipe.model, torch.bfloat16, []).to_dict()
    shown = bnb_call(code).to_dict()
    keys = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
            "bnb_4bit_compute_dtype")
    assert {k: shown[k] for k in keys} == {k: trained[k] for k in keys}
    if quant != "int8":
        assert f'bnb_4bit_quant_type="{quant}"' in code and f"bnb_4bit_use_double_quant={double_quant}" in code
    load = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") ==
                "from_pretrained" and getattr(n.func.value, "id", "") == "AutoPeftModelForCausalLM")
    kwargs = {k.arg: ast.unparse(k.value) for k in load.keywords}
    assert kwargs == {"quantization_config": "quantization_config", "dtype": "torch.bfloat16"}
    assert "`lora-ft push --merged`" in card.text.split("```python")[0].split("## Usage")[1]
    # The merged model is full precision: its snippet loads it plainly; an unquantized run has no config either.
    assert "BitsAndBytesConfig" not in str(build_card(q_run, "alice/q", True, BASE_ID, None, None))
    assert "BitsAndBytesConfig" not in str(build_card(run, "alice/q", False, BASE_ID, None, None))


def test_card_says_when_the_base_was_dequantized_from_gguf(chat_run, tmp_path):
    run = open_run(chat_run)

    def card_for(name: str, merged: bool = False) -> ModelCard:
        recipe = run.recipe.model_copy(update={"model": run.recipe.model.model_copy(update={"name": name})})
        r = Run(run.folder, recipe, run.info)
        return build_card(r, "alice/g", merged, base_model_id(r), None, None)

    example = card_for("example:smollm2-135m-instruct")
    assert example.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    sentence = next(line for line in example.text.splitlines() if "GGUF" in line)
    assert "de-quantized from the Q4_1 GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf`" in sentence
    assert "`HuggingFaceTB/SmolLM2-135M-Instruct`" in sentence and "`lora-ft push --merged`" in sentence
    assert "Q8_0 GGUF file `tiny.Q8_0.gguf`" in card_for(str(tmp_path / "tiny.Q8_0.gguf")).text
    assert "the GGUF file `tiny.gguf`" in card_for(str(tmp_path / "tiny.gguf")).text
    merged = next(line for line in card_for("example:smollm2-135m-instruct", True).text.splitlines()
                  if "GGUF" in line)
    assert "this merged model is built on them" in merged
    # Not from GGUF: the MiniLM example (a plain checkpoint) and the tiny local model.
    assert "GGUF" not in card_for("example:minilm-l6").text and "GGUF" not in str(build_card(
        run, "alice/g", False, None, None, None))


def test_results_table_reads_both_shapes_and_puts_forgetting_under_its_own_heading(chat_run):
    real = json.loads((chat_run / "eval_results.json").read_text())
    assert "forgetting" not in real["after"] and "forgetting" not in real  # no guard in this run
    f0 = {"kl": 0.0, "ppl": 188.71, "ppl_base": 188.71, "examples": 64}
    f1 = {"kl": 0.03368, "ppl": 176.2, "ppl_base": 188.71, "examples": 64}
    old = {"before": {**real["before"], "forgetting": f0}, "after": {**real["after"], "forgetting": f1}}
    new = {"before": real["before"], "after": real["after"], "forgetting": {"before": f0, "after": f1}}
    assert split_results(old) == split_results(new) == (real["before"], real["after"], {"before": f0,
                                                                                          "after": f1})
    table = results_table(new)
    assert table == results_table(old)
    splits, forgetting = table.split("### Forgetting guard")
    val = real["after"]["validation"]
    assert f"| validation | loss | {real['before']['validation']['loss']:.4g} | {val['loss']:.4g} |" in splits
    assert f"| validation | examples | {real['before']['validation']['examples']} | {val['examples']} |" in splits
    assert "forgetting" not in splits and "tokens" not in splits
    assert "KL(adapted ‖ base) and perplexity on general text, adapted vs base" in forgetting
    assert "| KL(adapted ‖ base), nats/token | 0 | 0.03368 |" in forgetting
    assert "| perplexity, adapted | 188.7 | 176.2 |" in forgetting
    assert "| perplexity, base | 188.7 | 188.7 |" in forgetting and "| examples | 64 | 64 |" in forgetting
    assert "Forgetting guard" not in results_table(real)


def test_card_of_a_run_with_the_forgetting_guard(tiny_llama, chat_data, tmp_path, no_network):
    out = tmp_path / "guarded"
    recipe = make_recipe(tiny_llama, chat_data, out, train={"max_steps": 4},
                         forgetting={"enabled": True, "max_examples": 8})
    recipe.data.max_eval_examples = 8
    train(recipe)
    assert main(["push", str(out), "--repo", "alice/guarded", "--dry-run", "--base-model", BASE_ID]) == 0
    card = ModelCard.load(out / "hub" / "README.md")
    _, after, forgetting = split_results(json.loads((out / "eval_results.json").read_text()))
    assert "forgetting" not in after and forgetting["after"]["kl"] > 0
    results = card.text.split("## Results", 1)[1].split("\n## ", 1)[0]
    assert not any(line.startswith("| forgetting") for line in results.splitlines())
    guard = results.split("### Forgetting guard", 1)[1]
    assert f"| KL(adapted ‖ base), nats/token | {forgetting['before']['kl']:.4g} | " \
           f"{forgetting['after']['kl']:.4g} |" in guard


@pytest.fixture(scope="module")
def merged_elsewhere(chat_run, tmp_path_factory):
    """A copy of the chat run, merged with ``merge --out DIR`` (no RUN_DIR/merged)."""
    root = tmp_path_factory.mktemp("merged-elsewhere")
    run = copy_run(chat_run, root / "run")
    merge_run(run, examples=8, out=root / "elsewhere")
    return run, root / "elsewhere"


def test_push_merged_finds_a_merge_written_with_out(merged_elsewhere, tmp_path, no_network, capsys):
    run, elsewhere = merged_elsewhere
    assert not (run / "merged").exists()
    assert main(["push", str(run), "--repo", "alice/m", "--merged", "--dry-run"]) == 0
    folder = run / "hub"
    assert json.loads(capsys.readouterr().out)["folder"] == str(folder)
    assert (folder / "model.safetensors").read_bytes() == (elsewhere / "model.safetensors").read_bytes()
    assert (elsewhere / MERGE_MARKER).is_file() and not (folder / MERGE_MARKER).exists()  # local bookkeeping only
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and "Merged into the original base weights in fp32" in card.text

    # RUN_DIR/merged, when present, is what --merged means; --merged-dir names another folder (and implies --merged).
    merge_run(run, dtype="bf16", examples=8)
    assert main(["push", str(run), "--repo", "alice/m", "--merged", "--dry-run"]) == 0
    assert "Merged into the original base weights in bf16" in ModelCard.load(folder / "README.md").text
    assert main(["push", str(run), "--repo", "alice/m", "--merged-dir", str(elsewhere), "--dry-run"]) == 0
    assert "Merged into the original base weights in fp32" in ModelCard.load(folder / "README.md").text
    assert (folder / "model.safetensors").read_bytes() == (elsewhere / "model.safetensors").read_bytes()
    capsys.readouterr()

    # Nothing merged anywhere: one line that names both ways out.
    unmerged = copy_run(run, tmp_path / "unmerged")
    for args in (["--merged"], ["--merged-dir", str(tmp_path / "nowhere")]):
        assert main(["push", str(unmerged), "--repo", "alice/m", "--dry-run", "--base-model", BASE_ID, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds no merged model" in err[0] and "--merged-dir DIR" in err[0], err


def test_hub_folder_is_a_snapshot_of_the_reports(merged_elsewhere, no_network):
    run, elsewhere = merged_elsewhere
    assert main(["push", str(run), "--repo", "alice/m", "--merged-dir", str(elsewhere), "--dry-run"]) == 0
    folder = run / "hub"
    snapshot = {name: (folder / name).read_bytes() for name in ("merge_report.json", "eval_results.json")}
    assert snapshot["eval_results.json"] == (run / "eval_results.json").read_bytes()
    # The merge report as published: the same entries, each naming its folder, not this machine's path to it.
    report = json.loads((run / "merge_report.json").read_text())
    published = json.loads(snapshot["merge_report.json"])
    assert published == {k: {**e, "out": Path(e["out"]).name} for k, e in report.items()}
    # Rewritten in place, as merge_run and training write them: the Hub folder keeps what it was built from.
    try:
        for name in snapshot:
            (run / name).write_text(json.dumps({"rewritten": True}), encoding="utf-8")
        assert {name: (folder / name).read_bytes() for name in snapshot} == snapshot
    finally:  # the module's other tests read the run's reports
        for name, data in snapshot.items():
            (run / name).write_bytes(data)
    # The weights are linked, not copied (a merged model can be gigabytes): merges never edit them in place.
    assert (folder / "model.safetensors").stat().st_ino == (elsewhere / "model.safetensors").stat().st_ino


def test_card_metadata_names_hub_datasets_and_the_base_license(chat_run, tiny_llama, tmp_path, no_network):
    run = copy_run(chat_run, tmp_path / "run")
    base = Path(shutil.copytree(tiny_llama, tmp_path / "base"))
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a base model\n")
    recipe = open_run(run).recipe
    recipe.data.train = "org/ds"  # a Hub dataset id; validation and test stay local files (no Hub name)
    (run / "run_config.yaml").write_text(recipe.dump(), encoding="utf-8")
    info = json.loads((run / "run_info.json").read_text())
    (run / "run_info.json").write_text(json.dumps({**info, "source": str(base)}), encoding="utf-8")
    assert main(["push", str(run), "--repo", "alice/ds", "--dry-run", "--base-model", BASE_ID]) == 0
    card = ModelCard.load(run / "hub" / "README.md")
    assert card.data.datasets == ["org/ds"] and card.data.license == "mit" and card.data.base_model == BASE_ID


def test_card_metadata_carries_the_results_as_model_index(chat_run, tmp_path, no_network):
    run = copy_run(chat_run, tmp_path / "run")
    assert main(["push", str(run), "--repo", "alice/tiny-chat", "--dry-run", "--base-model", BASE_ID]) == 0
    card = ModelCard.load(run / "hub" / "README.md")  # parses the YAML model-index back into EvalResults
    after = json.loads((run / "eval_results.json").read_text())["after"]
    got = {(r.dataset_split, r.metric_type): r for r in card.data.eval_results}
    assert set(got) == {(s, m) for s, ms in after.items() for m in ms if m not in ("examples", "tokens")}
    for (split, metric), r in got.items():
        assert r.metric_value == pytest.approx(after[split][metric], rel=1e-5)
        assert r.task_type == "text-generation" and r.dataset_type == f"{split}.jsonl"
    assert card.data.model_name == "tiny-chat"


def test_push_gguf_without_an_export_is_one_line_with_exit_2(chat_run, tmp_path, no_network, capsys):
    run = copy_run(chat_run, tmp_path / "run")
    assert main(["push", str(run), "--repo", "alice/tiny-gguf", "--gguf", "--dry-run"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lora-ft:")]
    assert len(err) == 1 and "no passing GGUF export is recorded" in err[0] and "lora-ft export" in err[0]


def test_push_gguf_uploads_the_file_its_modelfile_and_a_card_that_runs_it(chat_run, tmp_path, no_network, capsys):
    from lora_ft.shipping.export import export_run

    run = copy_run(chat_run, tmp_path / "run")
    pushed = Path(export_run(run, "q8_0", examples=8)["out"])
    export_run(run, "f16", examples=8)  # a later export: the Modelfile beside them now names the F16 file
    assert f"FROM ./{run.name}-F16.gguf" in (pushed.parent / "Modelfile").read_text()
    assert main(["push", str(run), "--repo", "alice/tiny-gguf", "--gguf", str(pushed), "--dry-run",
                 "--base-model", BASE_ID]) == 0
    result = json.loads(capsys.readouterr().out)
    folder = run / "hub"
    assert set(result["files"]) == {pushed.name, "Modelfile", "README.md", "eval_results.json", "export_report.json",
                                    "curves.png", RECIPE_FILE} and not result["uploaded"]
    assert (folder / pushed.name).read_bytes() == pushed.read_bytes()
    assert f"FROM ./{pushed.name}\n" in (folder / "Modelfile").read_text()
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "gguf" and {"gguf", "llama.cpp", "ollama"} <= set(card.data.tags)
    assert card.data.base_model == BASE_ID and card.data.eval_results
    assert "llama-cli -hf alice/tiny-gguf:Q8_0 -cnv" in card.text
    assert "ollama run hf.co/alice/tiny-gguf:Q8_0" in card.text
    assert f"hf download alice/tiny-gguf {pushed.name} Modelfile" in card.text and "## GGUF fidelity" in card.text
    # The card's transformers snippet, pointed at the folder standing in for the repository, loads the file.
    code = usage_code(card).replace('"alice/tiny-gguf"', repr(str(folder)))
    scope: dict = {}
    exec(code, scope)
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=pushed.name)
    assert torch.equal(_logits(scope["model"], tok, ["hello cow"]), _logits(reference, tok, ["hello cow"]))
    # --latest by default: the newest passing export
    assert main(["push", str(run), "--repo", "alice/tiny-gguf", "--gguf", "--dry-run"]) == 0
    assert f"{run.name}-F16.gguf" in json.loads(capsys.readouterr().out)["files"]


def test_a_signal_while_the_hub_folder_is_written_uploads_nothing_and_keeps_the_earlier_folder(
        chat_run, tmp_path, token_env, monkeypatch, capsys):
    """SIGTERM with half of adapter_model.safetensors written into the Hub folder being built: one line, exit 143,
    no repository created and nothing uploaded, RUN_DIR/hub byte for byte the earlier build, no temporary folder
    left, the run unlocked."""
    import hashlib

    from test_merge import sigterm_inside

    from lora_ft.shipping import hub

    run = copy_run(chat_run, tmp_path / "run")
    assert main(["push", str(run), "--repo", "alice/tiny-chat", "--dry-run"]) == 0
    capsys.readouterr()

    def hashes() -> dict[str, str]:
        return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(run.rglob("*")) if p.is_file()}

    before, calls, written = hashes(), [], []
    assert "hub/adapter_model.safetensors" in before
    for name in ("create_repo", "upload_folder"):
        monkeypatch.setattr(HfApi, name, lambda self, *a, _name=name, **k: calls.append(_name))
    real_place = hub._place

    def half_then_signal(src: Path, dst: Path) -> None:
        if src.name != "adapter_model.safetensors":
            return real_place(src, dst)
        data = src.read_bytes()
        with open(dst, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            sigterm_inside(written, dst)
            f.write(data[len(data) // 2 :])

    monkeypatch.setattr(hub, "_place", half_then_signal)
    assert main(["push", str(run), "--repo", "alice/tiny-chat"]) == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"lora-ft: interrupted (SIGTERM) during lora-ft push; nothing was uploaded (an upload commits all "
                   f"its files or none) and {run}/hub is as it was; run the command again to start over")
    assert calls == [] and hashes() == before  # no .hub.tmp, no .hub.old, no lock, the earlier folder intact
    [(partial, size)] = written
    assert partial == run / ".hub.tmp" / "adapter_model.safetensors" and size > 1000


def test_the_card_shows_the_best_sample_answers_and_the_folder_carries_the_samples(answering_run, tmp_path,
                                                                                   no_network):
    run = tmp_path / "run"
    shutil.copytree(answering_run, run, ignore=shutil.ignore_patterns("hub", "merged", "gguf", "*_report.json"))
    assert main(["push", str(run), "--repo", "alice/sounds", "--dry-run", "--base-model", BASE_ID]) == 0
    folder = run / "hub"
    assert (folder / "samples.md").read_text() == (run / "samples.md").read_text()
    rows = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    card = (folder / "README.md").read_text()
    section = card[card.index("## Sample answers"):]
    section = section[: section.index("\n## ", 3)]
    best = sorted(rows, key=lambda r: -r["rougeL_after"])[:3]  # eval.samples_in_card: 3, the closest first
    assert section.count("- reference: ") == 3
    for r in best:
        assert f"- reference: {r['reference']}" in section and f"- after: {r['after']}" in section
