"""End to end on tiny models: learning, outputs, reloadable adapters, resume, output-dir safety."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_recipe
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lora_ft.config import RecipeError
from lora_ft.train import evaluate_run, train


@pytest.fixture(scope="module")
def chat_run(tiny_llama, chat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "chat-nf4"
    recipe = make_recipe(tiny_llama, chat_data, out, model={"quant": "nf4"}, train={"eval_every": 10})
    return recipe, train(recipe)


def test_qlora_loss_falls_and_results_have_the_documented_shape(chat_run):
    recipe, results = chat_run
    out = recipe.output_dir
    saved = json.loads(open(f"{out}/eval_results.json").read())
    assert saved == json.loads(json.dumps(results))
    assert set(saved) == {"before", "after"}
    for when in ("before", "after"):
        assert set(saved[when]) == {"validation", "test"}
        for metrics in saved[when].values():
            assert {"loss", "perplexity", "examples", "tokens"} <= set(metrics)
    assert saved["after"]["validation"]["loss"] < saved["before"]["validation"]["loss"] - 1.0
    assert saved["after"]["test"]["loss"] < saved["before"]["test"]["loss"] - 1.0
    rows = [json.loads(x) for x in open(f"{out}/metrics.jsonl")]
    train_losses = [r["loss"] for r in rows if "split" not in r]
    assert len(train_losses) == 30 and sum(train_losses[-5:]) < sum(train_losses[:5])
    assert all(r["tokens_per_s"] > 0 for r in rows if "split" not in r)
    for name in ("run_config.yaml", "run_info.json", "curves.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer_config.json"):
        assert (Path(out) / name).is_file(), name


def test_adapter_loads_with_peft_and_reproduces_the_evaluation(chat_run, chat_data):
    recipe, results = chat_run
    # The saved adapter on a fresh base gives the same test loss as the end of training.
    again = evaluate_run(recipe.output_dir, str(chat_data["test"]))
    assert again["loss"] == pytest.approx(results["after"]["test"]["loss"], rel=1e-4)
    info = json.loads(open(f"{recipe.output_dir}/run_info.json").read())
    base = AutoModelForCausalLM.from_pretrained(info["source"])
    model = PeftModel.from_pretrained(base, f"{recipe.output_dir}/adapter")
    assert any("lora_A" in n for n, _ in model.named_parameters())
    tok = AutoTokenizer.from_pretrained(f"{recipe.output_dir}/adapter")
    assert tok.chat_template


def test_classifier_head_is_saved_and_reloads_to_identical_logits(tiny_bert, cls_data, tmp_path):
    recipe = make_recipe(tiny_bert, cls_data, tmp_path / "cls", model={"task": "sequence_classification"},
                         train={"max_steps": 60, "lr": 3e-3, "micro_batch_size": 60, "grad_accum": 2})
    results = train(recipe)
    assert results["after"]["validation"]["loss"] < results["before"]["validation"]["loss"] - 0.3
    assert results["after"]["validation"]["accuracy"] > results["before"]["validation"]["accuracy"] + 0.2
    assert {"loss", "accuracy", "f1_macro"} <= set(results["after"]["test"])
    info = json.loads((tmp_path / "cls" / "run_info.json").read_text())
    id2label = {int(k): v for k, v in info["id2label"].items()}
    assert sorted(id2label.values()) == ["animals", "money", "weather"]
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tok(["the cat and the dog", "rain and snow today"], return_tensors="pt", padding=True)

    def reload():
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3, id2label=id2label)
        return PeftModel.from_pretrained(base, tmp_path / "cls" / "adapter").eval()

    a, b = reload(), reload()  # the random init of the fresh head must be overwritten by the saved one
    with torch.no_grad():
        torch.testing.assert_close(a(**batch).logits, b(**batch).logits, rtol=0, atol=0)
    again = evaluate_run(tmp_path / "cls", str(cls_data["test"]))
    assert again["accuracy"] == pytest.approx(results["after"]["test"]["accuracy"])


def test_existing_run_is_not_overwritten(chat_run):
    recipe, _ = chat_run
    before = (recipe.output_dir + "/adapter/adapter_model.safetensors")
    data = open(before, "rb").read()
    with pytest.raises(RecipeError, match="already holds a run; pass --resume latest"):
        train(recipe)
    assert open(before, "rb").read() == data


def test_resume_mid_epoch_reproduces_the_uninterrupted_losses(tiny_llama, chat_data, tmp_path):
    import shutil

    data = {k: v for k, v in chat_data.items() if k != "test"}
    full = make_recipe(tiny_llama, data, tmp_path / "full", lora={"dropout": 0.1},
                       train={"max_steps": 8, "micro_batch_size": 4, "checkpoint_every": 3, "keep_checkpoints": 5})
    train(full)
    # A run that died after step 3 (24 batches per epoch: mid-epoch) holds only that checkpoint.
    (tmp_path / "part" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000003",
                    tmp_path / "part" / "checkpoints" / "step-00000003")
    train(full.model_copy(update={"output_dir": str(tmp_path / "part")}), resume="latest")

    def losses(run):
        rows = [json.loads(x) for x in open(tmp_path / run / "metrics.jsonl")]
        return {r["step"]: r["loss"] for r in rows if "split" not in r}

    a, b = losses("full"), losses("part")
    assert sorted(b) == [4, 5, 6, 7, 8]
    assert max(abs(a[step] - b[step]) for step in b) < 1e-6
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["step-00000003",
                                                                                      "step-00000006"]
