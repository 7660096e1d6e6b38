"""Fine-tuning craft: layer-wise LRs, freezing schedules, augmentation, forgetting metrics."""

import pytest
import torch
from accelerate import Accelerator

from lora_ft.adapters import attach_adapters
from lora_ft.config import AugmentConfig, FreezeConfig, LoraConfigSection, ModelConfig, TrainConfig
from lora_ft.craft import (
    Augmenter,
    FreezeSchedule,
    forgetting_breach,
    forgetting_metrics,
    layer_of,
    param_groups,
)
from lora_ft.model import load_model


@pytest.fixture
def bert_lora(tiny_bert):
    loaded = load_model(ModelConfig(name=str(tiny_bert), task="sequence_classification"), "fp32",
                        id2label={0: "a", 1: "b"})
    return attach_adapters(loaded.model, LoraConfigSection(r=2), "sequence_classification", loaded.head_modules,
                           False), loaded.head_modules


def test_layer_of():
    assert layer_of("base_model.model.model.layers.11.self_attn.q_proj.lora_A.default.weight") == 11
    assert layer_of("base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight") == 0
    assert layer_of("base_model.model.classifier.modules_to_save.default.weight") is None


def test_layer_wise_learning_rates_reach_the_optimizer(bert_lora):
    model, heads = bert_lora
    tc = TrainConfig(lr=1e-3, lr_layer_decay=0.5, head_lr=5e-3)
    groups = {g["name"]: g for g in param_groups(model, tc, heads)}
    assert groups["layer1"]["lr"] == pytest.approx(1e-3)  # top block (of 2): lr
    assert groups["layer0"]["lr"] == pytest.approx(5e-4)  # one below: lr · 0.5
    assert groups["head"]["lr"] == pytest.approx(5e-3)
    assert all("modules_to_save" in n for n, p in model.named_parameters()
               if any(p is q for q in groups["head"]["params"]))
    opt = torch.optim.AdamW(param_groups(model, tc, heads))
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx(sorted([5e-4, 1e-3, 1e-3, 5e-3]))


def _moved(model, before):
    return {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())}


def _train_steps(model, schedule, steps, start=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(5, 100, (4, 12))
    for step in range(start, start + steps):
        schedule.apply(step)
        model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def test_head_first_trains_only_the_head_then_everything(bert_lora):
    model, heads = bert_lora
    schedule = FreezeSchedule(model, FreezeConfig(strategy="head_first", head_steps=3), heads)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = _train_steps(model, schedule, 3)
    moved = _moved(model, before)
    assert moved and all("classifier" in n for n in moved)
    # adapters got no gradient, so AdamW holds no state for them
    assert all(len(opt.state[p]) == 0 for n, p in model.named_parameters() if "lora_" in n)
    assert schedule.apply(3) is not None and all(p.requires_grad for n, p in model.named_parameters()
                                                 if "lora_" in n)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _train_steps(model, schedule, 2, start=3)
    assert any("lora_B" in n for n in _moved(model, before))


def test_gradual_unfreeze_goes_top_down(bert_lora):
    model, heads = bert_lora
    schedule = FreezeSchedule(model, FreezeConfig(strategy="gradual_unfreeze", unfreeze_every=2), heads)
    trainable = lambda: {layer_of(n) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}  # noqa: E731
    msg = schedule.apply(0)
    assert trainable() == {1, None} and "blocks 1..1" in msg  # top block (+ the pooler's adapter above it)
    assert schedule.apply(1) is None
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _train_steps(model, schedule, 2)
    assert not any(layer_of(n) == 0 for n in _moved(model, before))
    schedule.apply(2)
    assert trainable() == {0, 1, None}


def test_augmentation_is_seeded_per_example_and_epoch_and_keeps_specials():
    aug = Augmenter(AugmentConfig(token_dropout=0.3, random_swap=0.3, random_deletion=0.2), seed=1,
                    special_ids={101, 102}, unk_id=100)
    row = {"idx": 7, "input_ids": [101, *range(1, 30), 102], "attention_mask": [1] * 31, "labels": 1}
    a, b = aug(row), aug(dict(row))
    assert a == b and a["input_ids"] != row["input_ids"]
    assert a["input_ids"][0] == 101 and a["input_ids"][-1] == 102 and a["labels"] == 1
    assert len(a["attention_mask"]) == len(a["input_ids"]) < 31
    aug.epoch = 1
    assert aug(row)["input_ids"] != a["input_ids"]
    assert not Augmenter(AugmentConfig(), 0, set(), 0)


def test_forgetting_metrics_zero_before_training_and_rising_after(tiny_llama, chat_data):
    from lora_ft.data import Collator, encode_text
    from lora_ft.model import load_tokenizer

    cfg = ModelConfig(name=str(tiny_llama))
    loaded = load_model(cfg, "fp32")
    model = attach_adapters(loaded.model, LoraConfigSection(r=4, dropout=0.0), "causal_lm", [], False)
    tok = load_tokenizer(str(tiny_llama), cfg)
    texts = ["the cat sat near the big dog", "rain and snow and wind today", "a small bank was near"]
    batch = Collator(tok.pad_token_id, causal=True)([encode_text(tok, t) for t in texts])
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


# ------------------------------------------------------------------------------ through the training loop
def _rows(out):
    import json

    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_head_first_schedule_in_training_is_logged_and_applied(tiny_bert, cls_data, tmp_path):
    from conftest import make_recipe

    from lora_ft.train import train

    recipe = make_recipe(tiny_bert, cls_data, tmp_path / "hf", model={"task": "sequence_classification"},
                         train={"max_steps": 6, "lr_layer_decay": 0.8, "head_lr": 1e-2},
                         freeze={"strategy": "head_first", "head_steps": 3})
    train(recipe)
    changes = [r for r in _rows(tmp_path / "hf") if "freeze" in r]
    assert [r["step"] for r in changes] == [0, 3]
    assert "blocks -..- + head" in changes[0]["freeze"] and "blocks 0..1 + head" in changes[1]["freeze"]


def test_augmentation_is_training_only_and_reproducible(tiny_bert, cls_data, tmp_path):
    from conftest import make_recipe

    from lora_ft.train import train

    def run(name, **augment):
        recipe = make_recipe(tiny_bert, cls_data, tmp_path / name, model={"task": "sequence_classification"},
                             train={"max_steps": 5, "micro_batch_size": 16}, data={"augment": augment})
        results = train(recipe)
        return results, [r["loss"] for r in _rows(tmp_path / name) if "split" not in r and "loss" in r]

    plain, plain_losses = run("plain")
    aug1, losses1 = run("aug1", token_dropout=0.3, random_swap=0.3)
    aug2, losses2 = run("aug2", token_dropout=0.3, random_swap=0.3)
    assert losses1 == losses2  # seeded
    assert losses1 != plain_losses  # and active in training
    assert aug1["before"] == plain["before"]  # validation and test never augmented


def test_forgetting_guard_measures_and_stops(tiny_llama, chat_data, tmp_path):
    import json
    import shutil

    from conftest import make_recipe

    from lora_ft.train import train

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
    steps = [r["step"] for r in _rows(tmp_path / "fg") if r.get("split") == "forgetting"]
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
