"""The guards the loop consults: the forgetting metrics and guard, the best adapter, the overfitting watch."""

import pytest
import torch
from accelerate import Accelerator
from conftest import metrics_rows

from lora_ft.modeling.adapters import attach_adapters
from lora_ft.modeling.loading import load_model
from lora_ft.objectives.classification import SequenceClassification
from lora_ft.recipe import DataConfig, LoraConfigSection, ModelConfig
from lora_ft.training.guards import BestAdapter, forgetting_breach, forgetting_metrics


def test_forgetting_metrics_zero_before_training_and_rising_after(tiny_llama, chat_data):
    from lora_ft.data.chat import encode_text
    from lora_ft.modeling.loading import load_tokenizer
    from lora_ft.objectives.causal_lm import pad_left

    cfg = ModelConfig(name=str(tiny_llama))
    loaded = load_model(cfg, "fp32")
    model = attach_adapters(loaded.model, LoraConfigSection(r=4, dropout=0.0), "causal_lm", [], False)
    tok = load_tokenizer(str(tiny_llama), cfg)
    texts = ["the cat sat near the big dog", "rain and snow and wind today", "a small bank was near"]
    batch = pad_left([encode_text(tok, t) for t in texts], tok.pad_token_id)
    acc = Accelerator(cpu=True)
    m0 = forgetting_metrics(model, [batch], acc)
    assert m0["kl"] == pytest.approx(0.0, abs=1e-7) and m0["ppl_adapted"] == pytest.approx(m0["ppl_base"])
    with torch.no_grad():  # push the adapter far from zero: the model now differs from its base
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.5)
    m1 = forgetting_metrics(model, [batch], acc)
    assert m1["kl"] > 0.01 and m1["ppl_base"] == pytest.approx(m0["ppl_base"], rel=1e-5)
    assert forgetting_breach(m1, max_kl=0.001, max_ppl_increase=None).startswith("KL to the base model")
    assert forgetting_breach(m0, max_kl=0.001, max_ppl_increase=0.1) is None


def test_forgetting_guard_measures_and_stops(tiny_llama, chat_data, tmp_path):
    import json
    import shutil

    from conftest import make_recipe

    from lora_ft.training.trainer import train

    splits = {k: v for k, v in chat_data.items() if k != "test"}
    recipe = make_recipe(tiny_llama, splits, tmp_path / "fg", train={"max_steps": 20, "eval_every": 5,
                                                                     "checkpoint_every": 10},
                         forgetting={"enabled": True, "max_examples": 16})
    results = train(recipe)
    # Forgetting is reported beside the splits, not as one: every split has a loss.
    assert json.loads((tmp_path / "fg" / "eval_results.json").read_text()) == json.loads(json.dumps(results))
    assert set(results) == {"before", "after", "forgetting"} and set(results["forgetting"]) == {"before", "after"}
    for when in ("before", "after"):
        assert set(results[when]) == {"validation"} and "loss" in results[when]["validation"]
    before, after = results["forgetting"]["before"], results["forgetting"]["after"]
    assert before["kl"] == pytest.approx(0.0, abs=1e-6) and before["ppl_adapted"] == pytest.approx(before["ppl_base"])
    assert after["kl"] > 0.05 and after["ppl_base"] == pytest.approx(before["ppl_base"])
    steps = [r["step"] for r in metrics_rows(tmp_path / "fg") if r.get("split") == "forgetting"]
    assert steps == [0, 5, 10, 15, 20, 20]  # before, every evaluation, and the final (restored) adapter

    # A resumed run keeps the measurement of the untrained adapter from its checkpoint.
    (tmp_path / "part" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "fg" / "checkpoints" / "step-00000010",
                    tmp_path / "part" / "checkpoints" / "step-00000010")
    resumed = train(recipe.model_copy(update={"output_dir": str(tmp_path / "part")}), resume="latest")
    assert resumed["forgetting"]["before"] == before and set(resumed["before"]) == {"validation"}
    assert resumed["forgetting"]["after"]["kl"] == pytest.approx(after["kl"], rel=1e-4)

    budget = after["kl"] / 4  # a budget the full run exceeds: training must stop early and roll back
    guarded = make_recipe(tiny_llama, splits, tmp_path / "fg2", train={"max_steps": 20, "eval_every": 5},
                          forgetting={"enabled": True, "max_examples": 16, "max_kl": budget, "action": "rollback"})
    results2 = train(guarded)
    import json

    info = json.loads((tmp_path / "fg2" / "run_info.json").read_text())
    assert info["stopped"].startswith("forgetting guard at step") and "rolled back" in info["stopped"]
    assert info["steps_done"] < 20
    assert results2["forgetting"]["after"]["kl"] <= budget


def test_a_classifier_keeps_the_clearly_more_accurate_adapter_and_lets_loss_decide_within_accuracy_noise(tok):
    objective = SequenceClassification(DataConfig(), tok)
    best = BestAdapter()
    # 100 validation examples: accuracy's noise is 0.05. Step 2 is one example less accurate but of clearly lower
    # loss (a tie on accuracy, won on loss); step 3 is clearly more accurate though its loss rose (over-confident
    # mistakes); step 4 is within noise of step 3 with a higher loss.
    for step, accuracy, loss in [(1, 0.78, 0.52), (2, 0.77, 0.48), (3, 0.90, 0.60), (4, 0.92, 0.70)]:
        metrics = {"accuracy": accuracy, "loss": loss, "examples": 100}
        best.consider(loss, step, lambda step=step: {"step": torch.tensor(step)}, objective.selection_key(metrics),
                      objective.selection_noise(metrics))
        if step == 2:
            assert best.step == 2
    assert (best.step, best.loss, best.bad_evals) == (3, 0.60, 1)
    assert objective.describe_best(best) == "accuracy 0.9000, loss 0.6000"


def test_without_a_score_the_lowest_loss_wins_as_in_older_checkpoints():
    best = BestAdapter()
    for step, loss in [(1, 0.9), (2, 0.7), (3, 0.7 + 1e-9), (4, 0.8)]:
        best.consider(loss, step, dict)
    assert (best.step, best.bad_evals, best.score) == (2, 2, [0.7])
