"""LoftQ: the adapter starts at the scaled rank-r SVD of each NF4 layer's quantization error, on any device."""

import bitsandbytes as bnb
import pytest
import torch
from conftest import make_recipe
from safetensors.torch import load_file, save_file

from lora_ft.errors import RecipeError
from lora_ft.modeling.adapters import attach_adapters
from lora_ft.modeling.loading import load_model
from lora_ft.modeling.loftq import start_at_quantization_error
from lora_ft.recipe import LoraConfigSection, ModelConfig
from lora_ft.training.evaluation import evaluate_run
from lora_ft.training.trainer import train

IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def _adapted(folder, lora: LoraConfigSection, quant: str = "nf4", task: str = "causal_lm", **kw):
    loaded = load_model(ModelConfig(name=str(folder), quant=quant, task=task), "fp32", **kw)
    heads = loaded.head_modules
    return attach_adapters(loaded.model, lora, task, heads, False, loaded.weight_files), loaded


def _nf4_lora_layers(model):
    return [(n.removeprefix("base_model.model."), m) for n, m in model.named_modules()
            if hasattr(m, "lora_A") and isinstance(m.get_base_layer(), bnb.nn.Linear4bit)]


def _start(layer) -> torch.Tensor:
    """What the adapter adds to the layer's weight at the start: scale · B A."""
    return (layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()


@pytest.mark.parametrize("lora", [LoraConfigSection(r=16, alpha=32, dropout=0.0, init="loftq"),
                                  LoraConfigSection(r=8, alpha=8, dropout=0.0, init="loftq", use_rslora=True)],
                         ids=["scale-2", "rslora"])
def test_each_layer_starts_exactly_the_rank_r_share_of_its_quantization_error_closer_to_the_full_weight(
        tiny_llama, lora):
    model, loaded = _adapted(tiny_llama, lora)
    full = load_file(str(loaded.weight_files[0]))
    layers = _nf4_lora_layers(model)
    assert len(layers) == 14  # 7 linear layers × 2 blocks
    for name, layer in layers:
        base = layer.get_base_layer()
        quantized = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        error = full[name + ".weight"].float() - quantized
        start = _start(layer)
        left = ((error - start).norm() ** 2).item()
        # the best rank-r approximation leaves exactly the energy of the other singular values (Eckart-Young)
        rest = (torch.linalg.svdvals(error)[lora.r:] ** 2).sum()
        assert left == pytest.approx(rest.item(), rel=1e-4), name
        assert left < 0.8 * error.norm().item() ** 2, name


def test_a_loftq_start_gives_logits_closer_to_the_full_precision_model_than_plain_nf4(tiny_llama):
    full = load_model(ModelConfig(name=str(tiny_llama)), "fp32").model
    with torch.no_grad():
        reference = full(input_ids=IDS).logits
        plain, loftq = (_adapted(tiny_llama, LoraConfigSection(dropout=0.0, init=init))[0](input_ids=IDS).logits
                        - reference for init in (True, "loftq"))
    assert loftq.norm() < 0.7 * plain.norm(), (loftq.norm(), plain.norm())


def test_dora_with_loftq_starts_at_the_same_model_as_plain_loftq(tiny_llama):
    # DoRA's magnitude is measured when peft builds the layer (from W_q alone): unless it is measured again on
    # W_q + scale·BA, every column is rescaled back to W_q's norm and the start is not LoftQ's.
    with torch.no_grad():
        lora, dora = (_adapted(tiny_llama, LoraConfigSection(dropout=0.0, init="loftq", use_dora=d))[0](
            input_ids=IDS).logits for d in (False, True))
    assert torch.allclose(dora, lora, atol=1e-4 * lora.abs().max().item())


def test_a_classifier_on_a_bare_encoder_checkpoint_finds_its_weights_under_the_backbone_names(tiny_bert):
    # tiny_bert is a BertModel checkpoint ("encoder.layer.0..."); the classifier's layers are "bert.encoder...".
    model, loaded = _adapted(tiny_bert, LoraConfigSection(r=4, alpha=8, dropout=0.0, init="loftq"),
                             task="sequence_classification", id2label={0: "a", 1: "b"})
    full = load_file(str(loaded.weight_files[0]))
    layers = _nf4_lora_layers(model)
    assert len(layers) == 13  # query, key, value, attention output, intermediate, output × 2 blocks; the pooler
    for name, layer in layers:
        base = layer.get_base_layer()
        error = (full[name.removeprefix("bert.") + ".weight"].float()
                 - bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float())
        assert (error - _start(layer)).norm() < 0.95 * error.norm(), name


def test_loftq_without_a_readable_checkpoint_is_refused_in_one_line_naming_lora_init(tiny_llama):
    loaded = load_model(ModelConfig(name=str(tiny_llama), quant="nf4"), "fp32")
    with pytest.raises(RecipeError) as e:
        attach_adapters(loaded.model, LoraConfigSection(init="loftq"), "causal_lm", [], False, None)
    assert str(e.value).startswith("lora.init: loftq ") and "lora.init: true" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("stored, message", [
    (lambda w: w[:, :32].contiguous(), r"^lora.init: loftq: the checkpoint's model.layers.0.self_attn.q_proj.weight "
                                       r"is \(64, 32\), the layer \(64, 64\): use lora.init: true$"),
    (lambda w: w.to(torch.uint8), r"^lora.init: loftq needs the full-precision weights and the checkpoint stores "
                                  r"model.layers.0.self_attn.q_proj.weight as torch.uint8: use the unquantized model")],
    ids=["another-shape", "pre-quantized"])
def test_a_checkpoint_tensor_loftq_cannot_use_is_refused_naming_the_layer(tiny_llama, tmp_path, stored, message):
    loaded = load_model(ModelConfig(name=str(tiny_llama), quant="nf4"), "fp32")
    tensors = load_file(str(loaded.weight_files[0]))
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = stored(tensors[key])
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = attach_adapters(loaded.model, LoraConfigSection(), "causal_lm", [], False)
    with pytest.raises(RecipeError, match=message):
        start_at_quantization_error(model, [tmp_path / "model.safetensors"])


def test_a_loftq_run_trains_from_the_loftq_start_and_its_adapter_scores_as_trained(tiny_llama, chat_data, tmp_path):
    # (Closer logits need not mean a closer loss: on this random model the validation loss before training is
    # 6.980 in fp32, 6.988 in plain NF4 and 6.936 with LoftQ, so the start is compared by its logits, above.)
    splits = {k: v for k, v in chat_data.items() if k != "test"}
    runs = {name: train(make_recipe(tiny_llama, splits, tmp_path / name, model={"quant": "nf4"}, lora=lora,
                                    train={"max_steps": 2}))
            for name, lora in [("plain", {}), ("loftq", {"init": "loftq"})]}
    before = {name: r["before"]["validation"]["loss"] for name, r in runs.items()}
    assert abs(before["loftq"] - before["plain"]) > 1e-3, before  # the trainer's model started at B ≠ 0
    # The saved adapter on a freshly loaded NF4 base (peft's loading: the init is not re-run) is the trained model.
    after = runs["loftq"]["after"]["validation"]["loss"]
    assert after != pytest.approx(before["loftq"], abs=1e-3)
    assert evaluate_run(tmp_path / "loftq", str(chat_data["validation"]))["loss"] == pytest.approx(after, abs=1e-5)
