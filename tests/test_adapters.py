"""Adapters: target discovery, head handling, frozen base, QLoRA training actually moves the adapter."""

import pytest
import torch

from lora_ft.errors import RecipeError
from lora_ft.modeling.adapters import attach_adapters, check_init_fits_device, resolve_targets
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


def test_loftq_on_a_cpu_is_refused_in_one_line_naming_lora_init():
    # peft 0.21 moves every weight to cuda (or xpu) for LoftQ's SVD: on a CPU that would be a torch traceback.
    with pytest.raises(RecipeError) as e:
        check_init_fits_device(LoraConfigSection(init="loftq"), "cpu")
    assert str(e.value).startswith("lora.init: loftq: ") and "lora.init: true" in str(e.value)
    assert "\n" not in str(e.value)
    check_init_fits_device(LoraConfigSection(init="loftq"), "cuda")
    check_init_fits_device(LoraConfigSection(init="pissa"), "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peft computes LoftQ on a CUDA or XPU device")
def test_a_loftq_initialised_nf4_model_is_closer_to_the_full_precision_base_than_plain_nf4(tiny_llama):
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()

    def logits(quant: str, init: bool | str) -> torch.Tensor:
        loaded = load_model(ModelConfig(name=str(tiny_llama), quant=quant), "fp32", device="cuda")
        model = loaded.model if quant == "none" else attach_adapters(
            loaded.model, LoraConfigSection(r=16, dropout=0.0, init=init), "causal_lm", [], False, str(tiny_llama))
        with torch.no_grad():
            return model(input_ids=ids).logits.float()

    full = logits("none", True)
    plain, loftq = (logits("nf4", init) - full for init in (True, "loftq"))
    assert loftq.norm() < 0.9 * plain.norm()
