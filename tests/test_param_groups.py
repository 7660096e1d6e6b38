"""Layer-wise learning rates and a new head's own rate reach the optimizer."""

import pytest
import torch

from lora_ft.recipe import TrainConfig
from lora_ft.training.param_groups import param_groups


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
