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


LRS = {"lion_8bit": 1e-3, "sgd": 5e-2}  # Lion's sign updates want a smaller rate, plain SGD a larger one


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit",
                                  "adafactor", "sgd"])
def test_every_optimizer_trains_a_tiny_classifier_its_loss_falls(tiny_bert, name):
    from lora_ft.modeling.adapters import attach_adapters
    from lora_ft.modeling.loading import load_model
    from lora_ft.recipe import LoraConfigSection, ModelConfig

    torch.manual_seed(0)
    loaded = load_model(ModelConfig(name=str(tiny_bert), task="sequence_classification"), "fp32",
                        id2label={0: "a", 1: "b"})
    # r=64: the 64→64 layers' A matrices reach bitsandbytes' 8-bit state (4,096 values), not only its fp32 fallback
    model = attach_adapters(loaded.model, LoraConfigSection(r=64, dropout=0.0), "sequence_classification",
                            loaded.head_modules, False)
    opt = make_optimizer(model, TrainConfig(optimizer=name, lr=LRS.get(name, 1e-2), head_lr=None), loaded.head_modules,
                         DistributedType.NO)
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(5, 200, (8, 12), generator=g), torch.tensor([0, 1] * 4)
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_sgd_is_fused_like_adamw_where_the_device_allows(bert_lora):
    model, heads = bert_lora
    opt = make_optimizer(model, TrainConfig(optimizer="sgd", lr=1e-2, head_lr=None), heads, DistributedType.NO)
    assert isinstance(opt, torch.optim.SGD) and all(g["fused"] and g["momentum"] == 0.9 for g in opt.param_groups)


def test_lora_plus_trains_the_b_matrices_at_the_ratio_times_the_rate_of_the_a_matrices(bert_lora):
    model, heads = bert_lora
    opt = make_optimizer(model, TrainConfig(lr=1e-3, head_lr=None, weight_decay=0.01), heads, DistributedType.NO,
                         plus_lr_ratio=16)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    a = [lr_of[id(p)] for n, p in named.items() if "lora_A" in n]
    b = [lr_of[id(p)] for n, p in named.items() if "lora_B" in n]
    assert a and b and set(a) == {1e-3} and b == pytest.approx([16e-3] * len(b))
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in named.values())
    assert {g["weight_decay"] for g in opt.param_groups if g["params"] and g["lr"] == 1e-3} == {0.01}


def test_a_chat_templates_token_rows_can_travel_a_set_share_of_their_layers_spread_over_the_run(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_ft.training.param_groups import TOKEN_ROWS_TRAVEL

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        base.lm_head.weight.mul_(3)  # untied, with another spread: each layer's rows get their own rate
    sigma = {m: base.get_submodule(m).weight.std().item() for m in ("model.embed_tokens", "lm_head")}
    model = get_peft_model(base, LoraConfig(
        r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [1, 2]}))
    rows = {m: f"base_model.model.{m}.token_adapter.trainable_tokens_delta.default" for m in sigma}

    def rates(tc, steps):
        groups = param_groups(model, tc, [], steps)
        named = {id(p): n for n, p in model.named_parameters()}
        return {named[id(p)]: g["lr"] for g in groups for p in g["params"]}

    short = rates(TrainConfig(lr=1e-3), 10)
    for m, name in rows.items():
        assert short[name] == pytest.approx(TOKEN_ROWS_TRAVEL * sigma[m] / 10) and short[name] > 10 * 1e-3
    assert sigma["lm_head"] > 2.5 * sigma["model.embed_tokens"]  # so one shared rate would fail the loop above
    assert all(lr == 1e-3 for n, lr in short.items() if n not in rows.values())  # LoRA keeps lr
    assert set(rates(TrainConfig(lr=1e-3), 10**6).values()) == {1e-3}  # a long run: never slower than lr
    assert set(rates(TrainConfig(lr=1e-3), None).values()) == {1e-3}  # the run's length unknown
