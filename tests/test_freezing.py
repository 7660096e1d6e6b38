"""Freezing schedules: LP-FT (head first) and gradual unfreezing, alone and in training."""

import torch
from conftest import metrics_rows

from lora_ft.modeling.layers import layer_of
from lora_ft.recipe import FreezeConfig
from lora_ft.training.freezing import FreezeSchedule


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


def test_head_first_schedule_in_training_is_logged_and_applied(tiny_bert, cls_data, tmp_path):
    from conftest import make_recipe

    from lora_ft.training.trainer import train

    recipe = make_recipe(tiny_bert, cls_data, tmp_path / "hf", model={"task": "sequence_classification"},
                         train={"max_steps": 6, "lr_layer_decay": 0.8, "head_lr": 1e-2},
                         freeze={"strategy": "head_first", "head_steps": 3})
    train(recipe)
    changes = [r for r in metrics_rows(tmp_path / "hf") if "freeze" in r]
    assert [r["step"] for r in changes] == [0, 3]
    assert "blocks -..- + head" in changes[0]["freeze"] and "blocks 0..1 + head" in changes[1]["freeze"]
