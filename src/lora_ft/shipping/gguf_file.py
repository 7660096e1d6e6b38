"""Writing a transformers causal LM as one GGUF file that llama.cpp (and Ollama, LM Studio) run.

Built on the ``gguf`` package, llama.cpp's own Python library: ``GGUFWriter`` writes the file, ``TensorNameMap``
names the tensors, ``SpecialVocab`` reads the merges, special tokens and chat template from a tokenizer folder,
and ``gguf.quants`` quantizes. What it leaves to each converter, and what we write ourselves after reading
llama.cpp's ``convert_hf_to_gguf.py``: the architecture's metadata keys, the Q/K row order llama.cpp's ``llama``
architecture expects, which tensors stay F32, the vocabulary with its token types, and the pre-tokenizer name.

Supported: Llama-family architectures whose GGUF files transformers can also read back (the independent reader the
export is verified with): Llama (SmolLM2 included, and Llama 3.1-3.3's scaled RoPE), Mistral, Qwen2, Qwen3;
byte-level BPE tokenizers (Llama 3, Qwen2/3, SmolLM2 and most recent models; not sentencepiece). Anything else is
refused with one line naming what is.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import UsageError
from ..modeling.gguf_rope import ROPE_FACTORS, head_dim, rope_factors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool
    """llama.cpp's ``llama`` architecture applies RoPE to interleaved pairs (GPT-J style), transformers to the two
    halves of each head (NeoX style): the Q and K rows are reordered so both compute the same thing. ``qwen2`` is
    NeoX style in llama.cpp too and keeps the transformers order."""


# transformers class → llama.cpp architecture. Mistral is written as ``llama``, as llama.cpp's converter does.
ARCHITECTURES: dict[str, Arch] = {
    "LlamaForCausalLM": Arch(gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": Arch(gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": Arch(gguf.MODEL_ARCH.QWEN2, False),
    "Qwen3ForCausalLM": Arch(gguf.MODEL_ARCH.QWEN3, False),
}
SUPPORTED = "Llama (incl. SmolLM2), Mistral, Qwen2, Qwen3"

# Every type gguf.quants can *write* in Python (it reads many more). K-quants and i-quants need llama.cpp's
# llama-quantize; TQ1_0/TQ2_0 are ternary (BitNet) formats, meaningless for an ordinary model.
QUANT_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (gguf.GGMLQuantizationType.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (gguf.GGMLQuantizationType.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# llama-quantize keeps the output projection (and a tied embedding, which is the output projection) at Q6_K in
# its 4/5-bit files: it decides most of the next-token distribution. gguf.quants cannot write Q6_K, so those
# files keep it at Q8_0 instead.
LOW_BIT = {"q5_1", "q5_0", "q4_1", "q4_0"}
OUTPUT_TENSORS = ("token_embd.weight", "output.weight")

# Pre-tokenizers (tokenizer.json) whose split llama.cpp implements, by the name it knows them under
# (``tokenizer.ggml.pre``). llama.cpp's converter identifies a tokenizer by hashing its output on a test text;
# we recognise the pre-tokenizer's structure instead, which needs no table of hashes, and refuse any other.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for a tokenizer.json ``pre_tokenizer`` (None: not one llama.cpp implements)."""
    if pre is None:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or byte_level.get("add_prefix_space"):
        return None
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"  # GPT-2's own split (SmolLM2 once re-read from a GGUF file, GPT-2, many small models)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(pattern)
    return None


# transformers' GGUF reader has no key for a Qwen3 head size and builds the model with Qwen3Config's default.
QWEN3_READER_HEAD_DIM = 128


# -------------------------------------------------------------------------------------------- checks
def check_exportable(config, tokenizer: PreTrainedTokenizerBase | None = None) -> Arch:
    """The architecture to write ``config`` as; a one-line ``UsageError`` for anything the export cannot map
    faithfully (before any weights are loaded)."""
    name = (getattr(config, "architectures", None) or ["?"])[0]
    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise UsageError(f"GGUF export supports {SUPPORTED}; this run's base is {name} "
                         f"({getattr(config, 'model_type', '?')})")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3") or (rope_type == "llama3" and arch.gguf_arch != gguf.MODEL_ARCH.LLAMA):
        # llama3's scaling is a per-frequency divisor llama.cpp reads from the rope_freqs tensor (written and read
        # back here); the others need llama.cpp's scaling keys, which transformers' GGUF reader (the check) ignores.
        raise UsageError(f"GGUF export: RoPE scaling '{rope_type}' is not supported yet (unscaled RoPE, and "
                         "Llama 3.1+'s 'llama3')")
    if arch.gguf_arch == gguf.MODEL_ARCH.QWEN3 and head_dim(config) != QWEN3_READER_HEAD_DIM:
        raise UsageError(f"GGUF export: Qwen3 with head_dim {head_dim(config)} cannot be verified: transformers' "
                         f"GGUF reader, which checks the file, assumes head_dim {QWEN3_READER_HEAD_DIM} (every "
                         "published Qwen3's)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UsageError(f"GGUF export: {name} with attention/MLP biases is not supported")
    if tokenizer is not None:
        _tokenizer_kind(tokenizer)
    return arch


def _tokenizer_kind(tokenizer: PreTrainedTokenizerBase) -> str:
    """The ``tokenizer.ggml.pre`` name of a byte-level BPE tokenizer, or a one-line ``UsageError``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UsageError("GGUF export needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise UsageError("GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2, ...); this run's "
                         f"tokenizer is {model.get('type')} with a {decoder.get('type')} decoder (sentencepiece-style "
                         "vocabularies such as Llama 2's are not supported yet)")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise UsageError("GGUF export: the tokenizer's pre-tokenizer is not one llama.cpp implements "
                         "(supported: GPT-2, SmolLM, Llama 3, Qwen2 splits)")
    return pre


def add_bos_eos(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS / EOS to a plain text, as measured on one (its config flags and
    post-processor can disagree; llama.cpp has only the two flags)."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids) and bos is not None and ids[0] == bos, len(ids) > 1 and eos is not None and ids[-1] == eos


# ----------------------------------------------------------------------------------------- vocabulary
def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def vocabulary(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types, ``vocab_size`` long (the embedding's rows: ids no token uses
    become ``[PADn]``, UNUSED). Added tokens are CONTROL when special, else USER_DEFINED (matched whole)."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if max(by_id) >= vocab_size:
        raise UsageError(f"GGUF export: the tokenizer has ids up to {max(by_id)} but the model's vocabulary is "
                         f"{vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i].special or _looks_special(token)
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Vocabulary, merges, special token ids, BOS/EOS flags and chat template, under llama.cpp's keys."""
    pre = _tokenizer_kind(tokenizer)
    tokens, types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)  # SpecialVocab reads a tokenizer folder
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    add_bos, add_eos = add_bos_eos(tokenizer)
    special.add_special_token.update(bos=add_bos, eos=add_eos)
    special.add_to_gguf(writer, quiet=True)


# -------------------------------------------------------------------------------------------- metadata
def _write_metadata(writer: gguf.GGUFWriter, config, arch: Arch, name: str, file_type: gguf.LlamaFileType) -> None:
    """The hyper-parameters llama.cpp reads (``convert_hf_to_gguf.py``'s ``set_gguf_parameters``)."""
    dim = head_dim(config)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_vocab_size(config.vocab_size)
    if arch.gguf_arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_rope_dimension_count(dim)
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --------------------------------------------------------------------------------------------- tensors
def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from (first half, second half) order to interleaved pairs (see ``Arch.permute_qk``)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_type(name: str, shape: tuple[int, ...], quant: str) -> gguf.GGMLQuantizationType:
    """The storage type of one tensor: F32 for vectors and norms (llama.cpp's kernels expect it), Q8_0 for the
    output projection in 4/5-bit files (see ``LOW_BIT``), else the requested type; F16 when the rows are not a
    whole number of quantization blocks (as llama.cpp's converter does)."""
    qtype = QUANT_TYPES[quant][0]
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if quant in LOW_BIT and name in OUTPUT_TENSORS:
        qtype = gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _gguf_tensors(model: PreTrainedModel, arch: Arch):
    """(GGUF name, fp32 numpy array) for every weight llama.cpp loads."""
    config = model.config
    names = gguf.get_tensor_name_map(arch.gguf_arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd when there is no output.weight
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UsageError(f"GGUF export: no llama.cpp tensor name for {hf_name}")
        t = tensor.detach().to(torch.float32).cpu()
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            t = _permute(t, config.num_attention_heads if "q_proj" in hf_name else kv_heads)
        yield name, t.numpy()
    factors = rope_factors(config)
    if factors is not None:
        yield ROPE_FACTORS, factors.numpy()


def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, quant: str,
               name: str) -> dict[str, int]:
    """Write ``model`` (fp32 weights) and ``tokenizer`` to ``path`` as one GGUF file in ``quant``.

    Returns how many tensors were stored in each type (``{"Q8_0": 154, "F32": 61}``).
    """
    if quant not in QUANT_TYPES:
        raise UsageError(f"--quant {quant}: choose one of {', '.join(QUANT_TYPES)}")
    arch = check_exportable(model.config, tokenizer)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    _write_metadata(writer, model.config, arch, name, QUANT_TYPES[quant][1])
    _write_tokenizer(writer, tokenizer, model.config.vocab_size)
    counts: dict[str, int] = {}
    for gguf_name, data in _gguf_tensors(model, arch):
        qtype = tensor_type(gguf_name, data.shape, quant)
        writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("wrote %s (%s): %s", path, quant, ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return counts
