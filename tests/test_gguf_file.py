"""GGUF writing on tiny random models, read back by an independent reader (transformers' GGUF loader)."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import build_bert_tokenizer, build_chat_tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lora_ft.errors import UsageError
from lora_ft.modeling.gguf_rope import rope_factors
from lora_ft.shipping.export import load_gguf
from lora_ft.shipping.gguf_file import SUPPORTED, check_exportable, vocabulary, write_gguf

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, initializer_range=0.2, bos_token_id=None)


def tiny(cls, config_cls, tok, **extra):
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=len(tok), eos_token_id=tok.eos_token_id, **{**SIZES, **extra})
    cfg.architectures = [cls.__name__]
    return cls(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return build_chat_tokenizer()


@pytest.fixture(scope="module")
def texts(tok):
    chats = [[{"role": "user", "content": "What does the cow say?"}, {"role": "assistant", "content": "Moo."}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And the owl, 42 times?"}]]
    return [tok.apply_chat_template(c, tokenize=False) for c in chats]


@torch.no_grad()
def logits(model, tok, texts):
    return torch.cat([model(**tok(t, return_tensors="pt")).logits[0] for t in texts])


def read_back(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def rounded_like(model, path: Path):
    """``model`` with every weight passed through the storage type its tensor has in the file (read with gguf's
    own reader), i.e. the model the file should hold."""
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    copy = type(model)(model.config).eval()
    state = {}
    for name, t in model.state_dict().items():
        qtype = types[names.get_name(name, try_suffixes=(".weight",))]
        data = t.float().numpy()
        state[name] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype).copy())
        state[name] = state[name].reshape(t.shape)
    copy.load_state_dict(state)
    return copy


@pytest.mark.parametrize("cls, config_cls, extra", [
    (LlamaForCausalLM, LlamaConfig, {"tie_word_embeddings": False}),
    (LlamaForCausalLM, LlamaConfig, {"tie_word_embeddings": True}),
    (MistralForCausalLM, MistralConfig, {"sliding_window": None}),
    (Qwen2ForCausalLM, Qwen2Config, {}),
    (Qwen3ForCausalLM, Qwen3Config, {}),  # q/k norms; head_dim 128 (Qwen3's, wider than hidden / heads here)
])
def test_f32_file_read_back_by_transformers_gives_the_same_logits_and_tokens(cls, config_cls, extra, tok, texts,
                                                                             tmp_path):
    model = tiny(cls, config_cls, tok, **extra)
    path = tmp_path / "m-F32.gguf"
    counts = write_gguf(model, tok, path, "f32", "tiny")
    assert counts == {"F32": sum(1 for n in model.state_dict() if not (extra.get("tie_word_embeddings")
                                                                       and n == "lm_head.weight"))}
    back, back_tok = read_back(path)
    # Exact: the architecture's metadata, the Q/K row order and the tensor names all round-trip.
    assert torch.allclose(logits(back, tok, texts), logits(model, tok, texts), atol=1e-5, rtol=0)
    assert back.config.tie_word_embeddings == bool(extra.get("tie_word_embeddings"))
    for t in texts:
        assert back_tok(t, add_special_tokens=False)["input_ids"] == tok(t, add_special_tokens=False)["input_ids"]
    assert back_tok.chat_template == tok.chat_template and back_tok.eos_token_id == tok.eos_token_id


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_f16_and_q8_0_files_hold_the_weights_rounded_to_their_type(quant, tok, texts, tmp_path):
    model = tiny(LlamaForCausalLM, LlamaConfig, tok, tie_word_embeddings=False)
    path = tmp_path / f"m-{quant.upper()}.gguf"
    counts = write_gguf(model, tok, path, quant, "tiny")
    assert counts == {"F32": 5, quant.upper(): 16}  # norms stay F32, every matrix is stored in the type
    back, _ = read_back(path)
    got, original = logits(back, tok, texts), logits(model, tok, texts)
    expected = logits(rounded_like(model, path), tok, texts)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)
    # ... and the rounding is really there, the size of the type's precision
    assert 1e-4 < (got - original).abs().max() < (0.1 if quant == "f16" else 1.0)


def test_4_bit_files_keep_the_output_projection_at_8_bits_and_odd_rows_at_f16(tok, tmp_path):
    model = tiny(LlamaForCausalLM, LlamaConfig, tok, tie_word_embeddings=False, intermediate_size=80)
    path = tmp_path / "m-Q4_0.gguf"
    write_gguf(model, tok, path, "q4_0", "tiny")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["output.weight"] == types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.ffn_up.weight"] == types["blk.0.attn_q.weight"] == "Q4_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 80: not a whole number of 32-value blocks
    back, _ = read_back(path)
    assert back.model.layers[0].mlp.down_proj.weight.shape == (64, 80)


LLAMA_3_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # Llama 3.1's, for a 32-token context


def test_llama_3_scaled_rope_is_written_as_llama_cpp_s_rope_freqs_and_read_back_to_the_same_logits(tok, tmp_path):
    # (the factors themselves against llama.cpp's converter: test_gguf_rope.py)
    model = tiny(LlamaForCausalLM, LlamaConfig, tok, rope_parameters=dict(LLAMA_3_ROPE))
    path = tmp_path / "m-F32.gguf"
    write_gguf(model, tok, path, "f32", "tiny")
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}["rope_freqs.weight"]
    assert stored.tensor_type.name == "F32"
    assert np.array_equal(np.asarray(stored.data), rope_factors(model.config).numpy())
    long = [" ".join(["the cow says moo and the owl"] * 6)]  # past the 32-token context the scaling was set for
    back, _ = load_gguf(path, torch.device("cpu"))
    assert torch.allclose(logits(back, tok, long), logits(model, tok, long), atol=1e-5, rtol=0)
    # transformers' reader alone ignores rope_freqs: the factors are what makes the two agree
    plain, _ = read_back(path)
    assert (logits(plain, tok, long) - logits(model, tok, long)).abs().max() > 0.1


def test_vocabulary_marks_special_tokens_control_and_pads_unused_rows(tok):
    tokens, types = vocabulary(tok, len(tok) + 3)
    assert tokens[tok.convert_tokens_to_ids("<|im_start|>")] == "<|im_start|>"
    assert types[tok.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    word = tok(" cow", add_special_tokens=False)["input_ids"][0]
    assert types[word] == gguf.TokenType.NORMAL and tokens[word] == tok.convert_ids_to_tokens(word)
    assert tokens[-3:] == [f"[PAD{len(tok) + i}]" for i in range(3)] and set(types[-3:]) == {gguf.TokenType.UNUSED}


def test_metadata_is_what_llama_cpp_reads(tok, tmp_path):
    model = tiny(LlamaForCausalLM, LlamaConfig, tok, tie_word_embeddings=True, rms_norm_eps=1e-5)
    path = tmp_path / "m.gguf"
    write_gguf(model, tok, path, "f16", "tiny")
    fields = gguf.GGUFReader(path).fields
    value = {k: f.contents() for k, f in fields.items() if not k.startswith("tokenizer.ggml.")}
    assert value["general.architecture"] == "llama" and value["llama.block_count"] == 2
    assert value["llama.attention.head_count"] == 4 and value["llama.attention.head_count_kv"] == 2
    assert value["llama.rope.dimension_count"] == 16 and value["llama.context_length"] == 256
    assert np.isclose(value["llama.attention.layer_norm_rms_epsilon"], 1e-5)
    assert value["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"].contents() == [" ".join(m) if isinstance(m, list) else m for m in merges]


def test_architectures_and_tokenizers_it_cannot_map_are_refused_in_one_line(tok):
    with pytest.raises(UsageError, match="supports Llama") as e:
        check_exportable(BertConfig(architectures=["BertForMaskedLM"]))
    assert SUPPORTED in str(e.value) and "\n" not in str(e.value)
    yarn = LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                        "original_max_position_embeddings": 32768}, architectures=["LlamaForCausalLM"])
    with pytest.raises(UsageError, match="RoPE scaling 'yarn'"):
        check_exportable(yarn)
    llama3_on_qwen = Qwen2Config(rope_parameters=dict(LLAMA_3_ROPE), architectures=["Qwen2ForCausalLM"])
    with pytest.raises(UsageError, match="RoPE scaling 'llama3'"):
        check_exportable(llama3_on_qwen)
    with pytest.raises(UsageError, match="Qwen3 with head_dim 16 cannot be verified"):
        check_exportable(Qwen3Config(head_dim=16, architectures=["Qwen3ForCausalLM"]))
    with pytest.raises(UsageError, match="byte-level BPE"):
        check_exportable(LlamaConfig(architectures=["LlamaForCausalLM"]), build_bert_tokenizer())
    with pytest.raises(UsageError, match="--quant q3_k"):
        write_gguf(tiny(LlamaForCausalLM, LlamaConfig, tok), tok, Path("unused.gguf"), "q3_k", "tiny")
