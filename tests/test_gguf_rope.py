"""Llama 3.1+'s scaled RoPE and llama.cpp's rope_freqs: the factors, and the scaling recovered from them."""

import numpy as np
import pytest
import torch
from conftest import build_chat_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lora_ft.errors import RecipeError
from lora_ft.modeling.examples import convert_gguf
from lora_ft.modeling.gguf_rope import llama3_parameters, rope_factors
from lora_ft.shipping.gguf_file import write_gguf

LLAMA_3_2_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # Llama-3.2-1B's config.json
LLAMA_3_1_ROPE = {**LLAMA_3_2_ROPE, "factor": 8.0}  # Llama-3.1-8B's


def converter_rope_factors(rope: dict, head_dim: int) -> list[float]:
    """llama.cpp's ``convert_hf_to_gguf.py`` (LlamaModel.generate_extra_tensors) for rope_type llama3, restated
    as the reference lora_ft's factors must match."""
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    old = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / rope["low_freq_factor"], old / rope["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = (old / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return factors


@pytest.mark.parametrize("rope, hidden, heads", [(LLAMA_3_2_ROPE, 2048, 32), (LLAMA_3_1_ROPE, 4096, 32)])
def test_the_factors_are_llama_cpp_s_and_give_back_the_scaling_they_came_from(rope, hidden, heads):
    config = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, rope_parameters=dict(rope))
    factors = rope_factors(config)
    head_dim = hidden // heads
    assert factors.shape == (head_dim // 2,) and factors.min() == 1.0 and factors.max() == rope["factor"]
    assert np.allclose(factors.numpy(), converter_rope_factors(rope, head_dim), rtol=1e-5)
    unscaled = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, rope_parameters={"rope_theta": 5e5})
    assert rope_factors(unscaled) is None
    assert llama3_parameters(factors, unscaled) == pytest.approx(rope)


def test_factors_no_llama3_scaling_gives_are_not_recovered():
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_parameters={"rope_theta": 5e5})
    factors = rope_factors(LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_parameters=dict(LLAMA_3_2_ROPE)))
    bent = factors.clone()
    bent[len(bent) // 2 + 1] *= 1.1  # a frequency in the band between 1 and the factor, off the curve
    assert llama3_parameters(bent, config) is None
    assert llama3_parameters(torch.full_like(factors, 4.0), config) is None  # linear scaling: no band
    assert llama3_parameters(factors[:-1], config) is None  # another head size


def test_a_llama_3_gguf_given_as_the_model_trains_with_its_scaled_rope(tmp_path):
    # A file as llama.cpp's converter writes it (rope_freqs); transformers' reader alone would drop the scaling.
    tok = build_chat_tokenizer()
    torch.manual_seed(0)
    # head_dim 16 has 8 frequencies: three fall in the band between 1 and the factor (needed to recover it)
    rope = {**LLAMA_3_2_ROPE, "rope_theta": 1e4, "factor": 8.0, "high_freq_factor": 16.0,
            "original_max_position_embeddings": 256}
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, eos_token_id=tok.eos_token_id, bos_token_id=None, rope_parameters=rope,
                         architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config).eval()
    path = tmp_path / "llama3.gguf"
    write_gguf(model, tok, path, "f32", "tiny")
    folder = convert_gguf(path, tmp_path / "converted")
    back = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert back.config.rope_parameters == pytest.approx(rope)
    ids = tok(" ".join(["the cow says moo and the owl"] * 6), return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(back(**ids).logits, model(**ids).logits, atol=1e-5, rtol=0)
        plain = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "rope_parameters": {"rope_theta": 1e4}})).eval()
        plain.load_state_dict(model.state_dict())
        assert (plain(**ids).logits - model(**ids).logits).abs().max() > 0.1  # what dropping the scaling costs


def test_a_gguf_whose_rope_freqs_fit_no_llama3_scaling_is_refused_in_one_line(tmp_path, monkeypatch):
    import lora_ft.shipping.gguf_file

    tok = build_chat_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, architectures=["LlamaForCausalLM"], rope_parameters={"rope_theta": 1e4})
    path = tmp_path / "linear.gguf"
    # a constant rope_freqs, as a linearly scaled RoPE would be: not llama3's, and not the model's
    monkeypatch.setattr(lora_ft.shipping.gguf_file, "rope_factors", lambda config: torch.full((8,), 4.0))
    write_gguf(LlamaForCausalLM(config), tok, path, "f32", "tiny")
    with pytest.raises(RecipeError, match=r"model.name: linear.gguf scales its RoPE .rope_freqs.") as e:
        convert_gguf(path, tmp_path / "converted")
    assert "\n" not in str(e.value) and not (tmp_path / "converted").exists()
