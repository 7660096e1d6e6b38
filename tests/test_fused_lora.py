"""The fused LoRA layer: peft's values and gradients in one autograd function, peft's structure untouched."""

import copy

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2Model

from lora_ft.modeling.fused_lora import FusedLoraLinear, FusedLoraLinear4bit, fuse_lora_layers
from lora_ft.modeling.lora_dropout import fuse_lora_dropout


class OneLayer(torch.nn.Module):
    def __init__(self, quant: bool, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        torch.manual_seed(0)
        lin = torch.nn.Linear(48, 40)
        if quant:
            self.proj = bnb.nn.Linear4bit(48, 40, compute_dtype=compute_dtype, quant_type="nf4")
            self.proj.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
            self.proj.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
            self.proj.to("cpu")  # quantizes
            self.is_loaded_in_4bit = True  # what peft reads to wrap a 4-bit layer in its lora.bnb.Linear4bit
        else:
            self.proj = lin

    def forward(self, x):
        return self.proj(x)


def _pair(quant: bool, p: float, compute_dtype: torch.dtype = torch.float32):
    """(peft's layer, the fused one): the same weights, B non-zero so that every gradient is exercised."""
    plain = get_peft_model(OneLayer(quant, compute_dtype), LoraConfig(r=4, lora_alpha=8, lora_dropout=p,
                                                                      target_modules=["proj"]))
    with torch.no_grad():
        plain.base_model.model.proj.lora_B["default"].weight.normal_()
    fuse_lora_dropout(plain)
    fused = copy.deepcopy(plain)
    assert fuse_lora_layers(fused) == 1
    return plain, fused


def _run(model, x, g, autocast: bool = False):
    """Output, and the gradients of x, A and B, with the global generator at the same state for both models."""
    x = x.clone().requires_grad_()
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    y.backward(g.to(y.dtype))
    layer = model.base_model.model.proj
    return y, x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


@pytest.mark.parametrize("quant", [False, True], ids=["linear", "nf4"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_the_fused_layer_computes_peft_s_values_and_gradients_in_fp32(quant, p):
    plain, fused = _pair(quant, p)
    x, g = torch.randn(3, 5, 48), torch.randn(3, 5, 40)
    y0, *grads0 = _run(plain, x, g)
    y1, *grads1 = _run(fused, x, g)
    assert y1.grad_fn.name() == "FusedLoraFunctionBackward" and y0.grad_fn.name() != y1.grad_fn.name()
    assert y1.dtype == y0.dtype == torch.float32
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads1, grads0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quant", [False, True], ids=["linear", "nf4"])
def test_under_bf16_autocast_the_fused_layer_returns_bf16_with_peft_s_values_to_bf16_precision(quant):
    plain, fused = _pair(quant, 0.1, torch.bfloat16)
    x, g = torch.randn(4, 6, 48), torch.randn(4, 6, 40)
    y0, *grads0 = _run(plain, x, g, autocast=True)
    y1, *grads1 = _run(fused, x, g, autocast=True)
    assert y1.grad_fn.name() == "FusedLoraFunctionBackward"
    # An autocast linear returns bf16; bitsandbytes casts a 4-bit layer's bf16 product back to the input's fp32,
    # the fused layer hands on the bf16 product itself (the same values: a 16-bit number cast up and back).
    assert y1.dtype == torch.bfloat16 and y0.dtype == (torch.float32 if quant else torch.bfloat16)
    torch.testing.assert_close(y1.float(), y0.float(), rtol=2e-2, atol=1e-2 * y0.abs().max().item())
    for a, b in zip(grads1, grads0, strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())


def test_outside_plain_training_the_fused_class_runs_peft_s_forward():
    plain, fused = _pair(False, 0.1)
    layer = fused.base_model.model.proj
    x = torch.randn(2, 48, requires_grad=True)
    fused.eval(), plain.eval()
    torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)  # eval: no dropout, peft's forward
    assert fused(x).grad_fn.name() != "FusedLoraFunctionBackward"
    fused.train()
    with torch.no_grad():
        assert fused(x).grad_fn is None
    fused.merge_adapter()  # merged: the base layer alone, as peft does
    assert fused(x).grad_fn.name() != "FusedLoraFunctionBackward"
    fused.unmerge_adapter()
    layer.lora_A["default"].weight.ds_id = 0  # partitioned by DeepSpeed ZeRO-3: gathered only by a module call
    assert fused.train()(x).grad_fn.name() != "FusedLoraFunctionBackward"
    del layer.lora_A["default"].weight.ds_id
    assert fused(x).grad_fn.name() == "FusedLoraFunctionBackward"
    fused.add_adapter("other", LoraConfig(r=2, target_modules=["proj"]))
    fused.base_model.set_adapter(["default", "other"])  # two active adapters: peft sums them
    assert layer.active_adapters == ["default", "other"]
    assert fused(x).grad_fn.name() != "FusedLoraFunctionBackward"


def test_the_swap_keeps_peft_s_classes_and_keys_and_leaves_transposed_layers_alone():
    plain, fused = _pair(True, 0.1)
    layer = fused.base_model.model.proj
    assert type(layer) is FusedLoraLinear4bit and isinstance(layer, type(plain.base_model.model.proj))
    assert list(fused.state_dict()) == list(plain.state_dict())
    gpt2 = get_peft_model(GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)),
                          LoraConfig(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    assert fuse_lora_layers(gpt2) == 0  # Conv1D keeps its weight transposed: peft's forward
    lin = get_peft_model(OneLayer(False), LoraConfig(r=2, target_modules=["proj"]))
    assert fuse_lora_layers(lin) == 1 and type(lin.base_model.model.proj) is FusedLoraLinear
