"""Adapters: target discovery, head handling, frozen base, QLoRA training actually moves the adapter."""

import pytest
import torch

from lora_ft.errors import RecipeError
from lora_ft.modeling.adapters import attach_adapters, resolve_targets
from lora_ft.modeling.loading import load_model
from lora_ft.recipe import LoraConfigSection, ModelConfig


def test_auto_targets_every_backbone_linear_but_not_the_output_head(tiny_llama):
    m = load_model(ModelConfig(name=str(tiny_llama)), "fp32").model
    assert resolve_targets(m, "auto", []) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                              "v_proj"]


def test_auto_targets_exclude_the_classifier(tiny_bert):
    m = load_model(ModelConfig(name=str(tiny_bert), task="sequence_classification"), "fp32",
                   id2label={0: "x", 1: "y"}).model
    targets = resolve_targets(m, "auto", ["classifier"])
    assert "classifier" not in targets and {"query", "key", "value", "dense"} <= set(targets)


def test_targets_matching_nothing_list_candidates(tiny_llama):
    m = load_model(ModelConfig(name=str(tiny_llama)), "fp32").model
    with pytest.raises(RecipeError, match=r"\['qkv'\] match no linear layer.*candidates: down_proj"):
        resolve_targets(m, ["q_proj", "qkv"], [])


@pytest.mark.parametrize("quant", ["none", "nf4", "fp4", "int8"])
def test_only_adapter_trains_and_base_stays_unchanged(tiny_llama, quant):
    import bitsandbytes as bnb

    loaded = load_model(ModelConfig(name=str(tiny_llama), quant=quant), "fp32")
    kind = {"none": torch.nn.Linear, "nf4": bnb.nn.Linear4bit, "fp4": bnb.nn.Linear4bit,
            "int8": bnb.nn.Linear8bitLt}[quant]
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, kind)
    # gradient checkpointing as training uses it on 4-bit models (its "auto" is off on CPU)
    model = attach_adapters(loaded.model, LoraConfigSection(r=4, dropout=0.0),
                            "causal_lm", [], gradient_checkpointing=quant in ("nf4", "fp4"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model(input_ids=ids, labels=ids).loss.item())
    after = dict(model.named_parameters())
    assert all(torch.equal(frozen[n], after[n].detach()) for n in frozen)
    assert all(not torch.equal(before[n], after[n].detach()) for n in before if "lora_B" in n)
    assert losses[-1] < losses[0] / 2, losses  # the quantized model learns the batch


def test_dora_and_rslora_reach_peft(tiny_llama):
    loaded = load_model(ModelConfig(name=str(tiny_llama)), "fp32")
    model = attach_adapters(loaded.model, LoraConfigSection(r=4, use_dora=True, use_rslora=True), "causal_lm",
                            [], False)
    cfg = model.peft_config["default"]
    assert cfg.use_dora and cfg.use_rslora
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
