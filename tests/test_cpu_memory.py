"""Returning freed memory during CPU training: when it trims, that it frees pages, that it changes no number."""

import pytest
import torch

from lora_ft.modeling.adapters import attach_adapters
from lora_ft.modeling.loading import load_model
from lora_ft.recipe import LoraConfigSection, ModelConfig
from lora_ft.training import cpu_memory


def _glibc() -> bool:
    return cpu_memory._malloc_trim() is not None


def _lora_model(tiny_llama):
    model = attach_adapters(load_model(ModelConfig(name=str(tiny_llama)), "fp32").model,
                            LoraConfigSection(r=4, dropout=0.0), "causal_lm", [], gradient_checkpointing=False)
    model.train()
    return model


@pytest.mark.skipif(not _glibc(), reason="malloc_trim is glibc's")
def test_trims_after_every_kth_block_forward_and_backward_never_in_evaluation(tiny_llama, monkeypatch):
    calls = []
    real = cpu_memory._malloc_trim()
    monkeypatch.setattr(cpu_memory, "_malloc_trim", lambda: lambda: calls.append(1) or real())
    model = _lora_model(tiny_llama)
    layers = model.get_base_model().config.num_hidden_layers
    remove = cpu_memory.release_freed_memory(model, every=1)
    ids = torch.randint(0, 300, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2 * layers  # one per block forward, one when its gradient arrives
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == 2 * layers
    remove()
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2 * layers


def test_gradients_are_unchanged(tiny_llama):
    ids = torch.randint(0, 300, (2, 12))
    grads = []
    for trim in (False, True):
        torch.manual_seed(0)
        model = _lora_model(tiny_llama)
        remove = cpu_memory.release_freed_memory(model, every=1) if trim else None
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        if remove:
            remove()
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not _glibc(), reason="malloc_trim is glibc's")
def test_trim_returns_heap_holes_to_the_os():
    # Freeing a 16 MB buffer raises glibc's mmap threshold, so the 2 MB buffers below come from the heap;
    # freeing every other one leaves holes that only a trim gives back.
    big = torch.ones(4 << 20)
    del big
    kept, freed = [], []
    for i in range(200):
        (kept if i % 2 else freed).append(torch.ones(512 << 10))
    freed.clear()
    before = _rss_mb()
    cpu_memory._malloc_trim()()
    assert before - _rss_mb() > 100  # ~200 MB of holes
    assert all(t[0].item() == 1.0 for t in kept)
