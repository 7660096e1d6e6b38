"""Fused LoRA dropout: the same values and gradients as peft's dropout → lora_A, with fewer saved bytes."""

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from lora_ft.modeling import lora_dropout
from lora_ft.modeling.adapters import attach_adapters, lora_config
from lora_ft.modeling.loading import load_model
from lora_ft.modeling.lora_dropout import DropoutLinear, DroppedLinear, keep_mask
from lora_ft.recipe import LoraConfigSection, ModelConfig

TARGETS = 7  # per Llama block: q, k, v, o, gate, up, down


@pytest.mark.parametrize("autocast", [False, True])
def test_dropped_linear_equals_dropout_then_linear(autocast):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    keep, p = torch.rand(3, 5, 8) > 0.3, 0.3
    g = torch.randn(3, 5, 4)
    results = []
    for fn in (lambda: DroppedLinear.apply(x, w, keep, p), lambda: F.linear(x * keep / (1 - p), w)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn()
        y.backward(g.to(y.dtype))
        results.append((y.detach().float(), x.grad, w.grad))
        x.grad = w.grad = None
    (y1, gx1, gw1), (y2, gx2, gw2) = results
    assert y1.dtype == y2.dtype and gx1.dtype == gx2.dtype == torch.float32 and gw1.dtype == torch.float32
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw1, gw2, rtol=1e-5, atol=1e-5)


def test_dropout_linear_drops_at_rate_p_in_training_only():
    lin = DropoutLinear(torch.nn.Linear(64, 1, bias=False), 0.25)
    torch.nn.init.ones_(lin.weight)
    x = torch.ones(4000, 64, requires_grad=True)
    kept = lin(x).detach() * 0.75  # = number of inputs kept per row
    assert abs(kept.mean().item() / 64 - 0.75) < 0.01
    lin.eval()
    assert torch.equal(lin(x), x.sum(-1, keepdim=True))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3])
def test_the_cpu_mask_keeps_each_value_at_1_minus_p_in_every_lane_and_says_its_p(p):
    """Each 64-bit draw gives four 16-bit lanes: a lane that never reached the threshold's range (a 63-bit
    generator's top lane, say) would drop at another rate."""
    torch.manual_seed(0)
    keep, drawn = keep_mask(torch.Size((1000, 4000)), p, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (1000, 4000)
    assert abs(drawn - p) <= 0.5 / 65536 and drawn * 65536 == round(drawn * 65536)
    lanes = keep.reshape(-1, 4).float().mean(0)  # 1M values per lane: sd of a rate ~3e-4
    assert (lanes - (1 - drawn)).abs().max() < 2e-3, lanes
    again = keep_mask(torch.Size((1000, 4000)), p, torch.device("cpu"))[0]
    assert not torch.equal(keep, again)  # fresh draws from the global generator
    torch.manual_seed(0)
    assert torch.equal(keep, keep_mask(torch.Size((1000, 4000)), p, torch.device("cpu"))[0])


def test_dropout_linear_scales_by_the_p_its_mask_was_drawn_at():
    lin = DropoutLinear(torch.nn.Linear(4000, 1, bias=False), 0.05)
    torch.nn.init.ones_(lin.weight)
    x = torch.ones(500, 4000, requires_grad=True)
    torch.manual_seed(3)
    out = lin(x)
    torch.manual_seed(3)
    keep, drawn = keep_mask(x.shape, 0.05, x.device)
    torch.testing.assert_close(out.detach(), keep.sum(-1, keepdim=True).float() / (1 - drawn), rtol=2e-5, atol=0)


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one training forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_fused_model_saves_less_and_keeps_peft_structure(tiny_llama, tmp_path, quant, monkeypatch):
    # The masks drawn as nn.Dropout draws them (bernoulli_, the GPU path), so that both models see the same ones.
    monkeypatch.setattr(lora_dropout, "keep_mask", lambda shape, p, device: (
        torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p), p))
    cfg = LoraConfigSection(r=4, dropout=0.1)
    fused = attach_adapters(load_model(ModelConfig(name=str(tiny_llama), quant=quant), "fp32").model, cfg,
                            "causal_lm", [], gradient_checkpointing=False)
    plain_base = load_model(ModelConfig(name=str(tiny_llama), quant=quant), "fp32").model
    if quant != "none":
        from peft import prepare_model_for_kbit_training
        plain_base = prepare_model_for_kbit_training(plain_base, use_gradient_checkpointing=False)
    plain = get_peft_model(plain_base, lora_config(cfg, "causal_lm", fused.peft_config["default"].target_modules,
                                                   []))
    layers = fused.get_base_model().config.num_hidden_layers
    assert sum(isinstance(m, DropoutLinear) for m in fused.modules()) == TARGETS * layers
    # Same parameter names (so checkpoints, freezing and optimizer groups are untouched) and same outputs in eval.
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain.named_parameters()]
    set_peft_model_state_dict(plain, get_peft_model_state_dict(fused))
    ids = torch.randint(0, 300, (4, 24))
    fused.eval(), plain.eval()
    torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)

    fused.train(), plain.train()
    grads = []
    for model in (fused, plain):  # the same random draws: the same masks, so the same loss and gradients
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad()
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)
    saving = _saved_bytes(plain, ids) - _saved_bytes(fused, ids)
    hidden, inter = fused.get_base_model().config.hidden_size, fused.get_base_model().config.intermediate_size
    values = ids.numel() * layers * (6 * hidden + inter)  # LoRA inputs per step: 6 of width h, 1 of width i
    # peft saves every dropout output in fp32 (4 bytes per LoRA input value); the fused path a bool mask (1 byte)
    # and a reference to the input, which other operations keep anyway.
    assert saving >= 3 * values

    fused.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_model(ModelConfig(name=str(tiny_llama)), "fp32").model,
                                         tmp_path / "adapter")
    assert reloaded.peft_config["default"].lora_dropout == 0.1
    assert not any(isinstance(m, DropoutLinear) for m in reloaded.modules())


def test_fused_training_learns_and_dora_is_left_to_peft(tiny_llama):
    model = attach_adapters(load_model(ModelConfig(name=str(tiny_llama)), "fp32").model,
                            LoraConfigSection(r=4, dropout=0.1), "causal_lm", [], gradient_checkpointing=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (4, 16))
    losses = []
    for _ in range(12):  # checkpointing recomputes the forward: the same mask must come back (RNG preserved)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    dora = attach_adapters(load_model(ModelConfig(name=str(tiny_llama)), "fp32").model,
                           LoraConfigSection(r=4, dropout=0.1, use_dora=True), "causal_lm", [], False)
    assert not any(isinstance(m, DropoutLinear) for m in dora.modules())
