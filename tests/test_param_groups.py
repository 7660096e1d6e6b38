"""Layer-wise learning rates and a new head's own rate reach the optimizer, fused where that is safe."""

import pytest
import torch
from accelerate.utils import DistributedType

from lora_ft.recipe import TrainConfig
from lora_ft.training.param_groups import make_optimizer, param_groups


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


@pytest.mark.parametrize("distributed, fused", [(DistributedType.NO, True), (DistributedType.MULTI_CPU, True),
                                                (DistributedType.FSDP, None), (DistributedType.DEEPSPEED, None)])
def test_adamw_is_fused_for_one_process_or_ddp_and_steps_the_same_as_torchs_default(bert_lora, distributed, fused):
    model, heads = bert_lora
    tc = TrainConfig(lr=1e-3, lr_layer_decay=0.5, head_lr=5e-3, weight_decay=0.01)
    opt = make_optimizer(model, tc, heads, distributed)
    assert all(g["fused"] is fused for g in opt.param_groups)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx(sorted([5e-4, 1e-3, 1e-3, 5e-3]))
    # the fused kernel's update equals the per-tensor loop's
    params = [p for g in opt.param_groups for p in g["params"]]
    start = [p.detach().clone() for p in params]
    reference = torch.optim.AdamW(param_groups(model, tc, heads), weight_decay=0.01, foreach=False)
    after = {}
    for name, optimizer in (("made", opt), ("reference", reference)):
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.full_like(p, 0.01 * (i + 1) * (step + 1))
            optimizer.step()
        after[name] = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, start, strict=True):
            p.copy_(s)
    assert any(not torch.equal(a, s) for a, s in zip(after["made"], start, strict=True))
    for a, b in zip(after["made"], after["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
