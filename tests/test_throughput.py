"""MFU's parts: the FLOPs a LoRA training step costs through each kind of weight, and the measured matmul peak."""

import pytest
import torch

from lora_ft.modeling.adapters import attach_adapters
from lora_ft.modeling.loading import load_model
from lora_ft.recipe import LoraConfigSection, ModelConfig
from lora_ft.training.throughput import FlopCounts, count_flop_weights, matmul_peak


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_flop_weights_are_the_linear_layers_by_role_whatever_their_storage(tiny_llama, quant):
    loaded = load_model(ModelConfig(name=str(tiny_llama), quant=quant), "fp32")
    shapes = {n: m.weight.shape for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear)}
    head = loaded.model.get_output_embeddings()
    model = attach_adapters(loaded.model, LoraConfigSection(r=4), "causal_lm", [], False)
    counts = count_flop_weights(model)
    layers = sum(m.in_features * m.out_features for n, m in loaded.model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in n and "lora_" not in n)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts == FlopCounts(frozen=layers, trainable=lora, head=head.in_features * head.out_features)
    assert counts.frozen == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)  # q,o + k,v (2 kv heads) + MLP, 2 layers
    assert shapes and counts.step(tokens=10, labelled=3) == 10 * (4 * counts.frozen + 6 * lora) + 3 * 4 * counts.head


def test_the_matmul_peak_is_measured_once_per_process_and_draws_nothing_from_the_global_rng():
    matmul_peak.cache_clear()
    state = torch.get_rng_state()
    first = matmul_peak("cpu", torch.float32)
    assert torch.equal(torch.get_rng_state(), state)  # dropout masks after a resume must not depend on it
    assert first > 1e9 and matmul_peak("cpu", torch.float32) == first  # GFLOP/s range on any CPU
