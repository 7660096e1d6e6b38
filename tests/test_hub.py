"""lora-ft push: the Hub folder (card, files that load), the upload at the HfApi boundary, and the token's secrecy."""

import json
import logging
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import make_recipe
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lora_ft.cli import main
from lora_ft.config import load_recipe
from lora_ft.export import Run, merge_run, open_run
from lora_ft.hub import RECIPE_FILE, base_license
from lora_ft.train import train

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
    assert load_recipe(folder / RECIPE_FILE) == open_run(chat_run).recipe

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


def test_dry_run_merged_folder_opens_with_transformers_and_shows_fidelity(chat_run, no_network):
    merge_run(chat_run, examples=8)
    assert main(["push", str(chat_run), "--repo", "alice/tiny-chat-merged", "--merged", "--dry-run"]) == 0
    folder = chat_run / "hub"
    assert not (folder / "adapter_config.json").exists() and (folder / "merge_report.json").is_file()
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and card.data.base_model is None  # local base, no id given
    assert "## Merge fidelity" in card.text and "top-1 agreement" in card.text
    model = AutoModelForCausalLM.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(chat_run / "merged")
    tok = AutoTokenizer.from_pretrained(folder)
    assert torch.equal(_logits(model, tok, ["hello cow"]), _logits(reference, tok, ["hello cow"]))


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
    assert base_license(Run(run.dir, run.recipe, {"source": str(base)}), None) == "mit"
    assert base_license(run, None) is None
