"""The chunked linear + cross-entropy: the same losses and LoRA gradients as full logits, without their memory."""

from __future__ import annotations

import pytest
import torch
from conftest import chat_rows

from lora_ft.data.chat import encode_chat
from lora_ft.objectives import chunked_loss
from lora_ft.objectives.causal_lm import causal_loss, pad_left


@pytest.fixture()
def lora_llama(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, cfg)


@pytest.fixture()
def batch(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = [encode_chat(tok, r["messages"], False) for r in chat_rows(6, 11)]
    return pad_left(rows, pad)


def _loss_and_grads(model, batch, chunked: bool, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both passes (GPT-2, OPT and BLOOM configs have dropout on)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        per_example, counts = causal_loss(model, batch, per_example=True, chunked=chunked)
    (per_example.sum() / counts.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return per_example.detach(), counts, grads


TOL = 1e-5
"""Losses: relative (and 1e-5 absolute); each LoRA gradient: elementwise 1e-5 relative, plus 1e-5 of the tensor's
largest element (the README's "tested to 1e-5")."""
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=256)
SIZES = {"falcon": {k: v for k, v in TINY.items() if k != "head_dim"},  # Falcon derives it
         "gptj": {**TINY, "rotary_dim": 8}}  # GPT-J's default rotates 64 dimensions, more than a head has


def assert_equal_to_full_logits(model, batch) -> int:
    """Chunked and full-logits losses and LoRA gradients agree to TOL; returns how many gradients were compared."""
    ref, ref_counts, ref_grads = _loss_and_grads(model, batch, chunked=False)
    got, counts, grads = _loss_and_grads(model, batch, chunked=True)
    assert torch.equal(counts, ref_counts) and ref.min() > 0
    torch.testing.assert_close(got, ref, rtol=TOL, atol=TOL)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(g, ref_grads[name], rtol=TOL, atol=TOL * scale, msg=name)
    return len(grads)


@pytest.mark.parametrize("model_type", sorted(chunked_loss.PLAIN_HEAD_MODELS))
def test_chunked_loss_equals_full_logits_on_every_architecture_it_accepts(model_type, batch, monkeypatch):
    """Every architecture the allow-list lets through: a tiny random model of it, LoRA on all its linear layers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=int(batch["input_ids"].max()) + 1, pad_token_id=0,
                                  **SIZES.get(model_type, TINY))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # biases start at zero: give them values, or a dropped head bias (GPT-J, Phi) goes unseen
        for name, p in base.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    assert chunked_loss.output_head(model) is not None  # the chunked path is taken, not the fallback
    monkeypatch.setattr(chunked_loss, "CHUNK_VALUES", 7 * config.vocab_size)  # several chunks
    assert assert_equal_to_full_logits(model, batch) >= 2 * 2 * 2  # A and B, 2 layers, at least 2 targets


def test_chunked_loss_equals_full_logits_in_losses_and_lora_gradients(lora_llama, batch, monkeypatch):
    # 7 positions per chunk: several chunks, some of them made only of masked prompt positions.
    monkeypatch.setattr(chunked_loss, "CHUNK_VALUES", 7 * lora_llama.config.vocab_size)
    assert chunked_loss.output_head(lora_llama) is not None
    assert assert_equal_to_full_logits(lora_llama, batch) == 2 * 7 * 2  # A and B, 7 targets, 2 layers
    # Under bf16 autocast both compute the head's matmul in bf16: equal to bf16 rounding.
    ref16, _, ref16_grads = _loss_and_grads(lora_llama, batch, chunked=False, autocast=True)
    got16, _, grads16 = _loss_and_grads(lora_llama, batch, chunked=True, autocast=True)
    torch.testing.assert_close(got16, ref16, rtol=2e-2, atol=2e-2)
    for name, g in grads16.items():
        assert torch.nn.functional.cosine_similarity(g.flatten(), ref16_grads[name].flatten(), dim=0) > 0.99, name


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_full_logits_with_a_chat_templates_trained_token_rows(tiny_llama, batch, tied,
                                                                                   monkeypatch):
    """model.chat_template trains a few rows of the embedding and the head (peft's trainable tokens): the chunked
    loss computes their logits and gradients from the trained rows, as peft's forward over full logits does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, tie_word_embeddings=tied)
    rows = [1, 2]  # <|im_start|> and <|im_end|>: in every example, <|im_end|> among the answers' targets
    tokens = {"embed_tokens": rows} if tied else {"embed_tokens": rows, "lm_head": rows}
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                            init_lora_weights=False, trainable_token_indices=tokens))
    with torch.no_grad():  # trained rows, not the base's: a head that ignored them would differ
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    head = chunked_loss.output_head(model)
    assert head is not None and head.rows.tolist() == rows and head.values.requires_grad
    monkeypatch.setattr(chunked_loss, "CHUNK_VALUES", 7 * model.config.vocab_size)
    assert assert_equal_to_full_logits(model, batch) == 2 * 7 * 2 + (1 if tied else 2)  # LoRA + the rows
    with model.disable_adapter():  # a preference objective's reference: the base rows, as peft's forward
        assert chunked_loss.output_head(model).rows is None
        with torch.no_grad():
            torch.testing.assert_close(causal_loss(model, batch, chunked=True)[0],
                                       causal_loss(model, batch, chunked=False)[0], rtol=TOL, atol=TOL)


def test_under_autocast_the_head_weight_is_cast_once_per_loss_not_once_per_chunk(lora_llama, batch, monkeypatch):
    """autocast caches the casts of trained leaves only: the frozen head's weight was copied to bf16 for every
    chunk (a vocabulary × hidden tensor each time: 0.8 GB for a Llama-3 3B head)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(chunked_loss, "CHUNK_VALUES", 7 * lora_llama.config.vocab_size)
    weight = chunked_loss.output_head(lora_llama).linear.weight
    copies = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.shape == weight.shape and out.dtype == torch.bfloat16:
                copies.append(func)
            return out

    labels = int((batch["labels"] != -100).sum())
    with Copies():
        _loss_and_grads(lora_llama, batch, chunked=True, autocast=True)
    # One for the loss, one by the model's own head, which autocast still runs on the empty slice it is handed.
    assert labels > 2 * 7 and copies == [torch.ops.aten._to_copy.default] * 2


def test_chunked_loss_without_gradients_matches_and_keeps_nothing(lora_llama, batch):
    with torch.no_grad():
        ref, _ = causal_loss(lora_llama, batch, chunked=False)
        got, _ = causal_loss(lora_llama, batch, chunked=True)
    assert got.grad_fn is None
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _peak_step_bytes(model, batch, chunked: bool) -> int:
    """Net CPU allocation peak of forward + backward, as the planner's ``measure_peak`` counts it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, n = causal_loss(model, batch, chunked=chunked)
        (loss / n).backward()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    net = top = 0
    for e in events:
        net += e.nbytes()
        top = max(top, net)
    return top


def test_chunked_loss_never_holds_the_batch_logits(tmp_path, batch, monkeypatch):
    """A large vocabulary next to a tiny model, as for SmolLM2 or Llama 3: the step's peak falls by about the
    three (positions × vocabulary) fp32 copies the unchunked loss holds."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = 32_768
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear"))
    monkeypatch.setattr(chunked_loss, "CHUNK_VALUES", 16 * vocab)  # 16 positions per chunk
    positions = batch["input_ids"].shape[0] * (int(batch["logits_to_keep"]) - 1)
    assert positions > 64
    full = _peak_step_bytes(model, batch, chunked=False)
    chunked = _peak_step_bytes(model, batch, chunked=True)
    logits = positions * vocab * 4
    assert full - chunked > 2 * logits, (full, chunked, logits)
    assert chunked < full / 3, (full, chunked, logits)


def test_chunked_loss_falls_back_where_the_head_trains_or_the_architecture_is_unknown(lora_llama, tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    trained_head = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                                  LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert chunked_loss.output_head(trained_head) is None
    # An architecture that may transform its logits after the head (soft-capping, scaling) is not trusted.
    lora_llama.get_base_model().config.model_type = "gemma2"
    assert chunked_loss.output_head(lora_llama) is None


def test_a_second_backward_is_refused_not_silently_wrong(lora_llama, batch):
    loss, n = causal_loss(lora_llama, batch, chunked=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_under_accelerate_mixed_precision_the_head_computes_as_it_would_in_the_forward(lora_llama, batch,
                                                                                       monkeypatch):
    """accelerate wraps only the model's forward in autocast; the loss runs after it. The chunked head must still
    compute in bf16 (as the head inside the forward would), not silently in fp32."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        model = Accelerator(cpu=True, mixed_precision="bf16").prepare(lora_llama)
        seen, real = [], chunked_loss.ChunkedLinearCrossEntropy.forward

        def spy(ctx, *args):
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            return real(ctx, *args)

        monkeypatch.setattr(chunked_loss.ChunkedLinearCrossEntropy, "forward", staticmethod(spy))
        got, _ = causal_loss(model, batch, per_example=True, chunked=True)
        ref, _ = causal_loss(model, batch, per_example=True, chunked=False)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert seen == [True]
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
