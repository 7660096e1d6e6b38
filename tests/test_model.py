"""Model loading: bitsandbytes layers for each quant, fresh heads never quantized, pad token, sources."""

import bitsandbytes as bnb
import pytest
import torch

from lora_ft.config import ModelConfig, RecipeError
from lora_ft.model import load_model, load_tokenizer, new_head_modules, resolve_source

LABELS = {0: "a", 1: "b", 2: "c"}


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_quantized_decoder_has_bitsandbytes_layers_and_full_precision_head(tiny_llama, quant):
    m = load_model(ModelConfig(name=str(tiny_llama), quant=quant), "fp32").model
    q = m.model.layers[0].self_attn.q_proj
    if quant == "int8":
        assert isinstance(q, bnb.nn.Linear8bitLt) and q.weight.dtype == torch.int8
    else:
        assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_state.quant_type == quant
    assert type(m.lm_head) is torch.nn.Linear  # output head stays unquantized


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_new_classifier_head_is_never_quantized(tiny_bert, quant):
    loaded = load_model(ModelConfig(name=str(tiny_bert), task="sequence_classification", quant=quant), "fp32",
                        id2label=LABELS)
    m = loaded.model
    assert loaded.head_modules == ["classifier"]
    assert type(m.classifier) is torch.nn.Linear and m.classifier.weight.dtype == torch.float32
    assert isinstance(m.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)
    assert m.config.id2label == LABELS and m.classifier.out_features == 3


def test_reinitialised_pooler_counts_as_new_head(tiny_bert, tmp_path):
    # A checkpoint without pooler weights: the pooler is created fresh, so it must be trained and kept.
    import shutil

    from safetensors.torch import load_file, save_file
    folder = tmp_path / "nopooler"
    shutil.copytree(tiny_bert, folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "pooler" not in k}, folder / "model.safetensors",
              metadata={"format": "pt"})
    from transformers import AutoConfig

    heads, _ = new_head_modules(AutoConfig.from_pretrained(folder), "sequence_classification", str(folder))
    assert sorted(heads) == ["bert.pooler.dense", "classifier"]


def test_pad_token_is_set_when_missing(tiny_llama):
    tok = load_tokenizer(str(tiny_llama), ModelConfig(name=str(tiny_llama)))
    assert tok.pad_token is not None and tok.pad_token_id == tok.convert_tokens_to_ids(tok.pad_token)


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(RecipeError, match="GGUF file not found"):
        resolve_source(str(tmp_path / "m.gguf"))
    with pytest.raises(RecipeError, match="no config.json"):
        resolve_source(str(tmp_path))
    with pytest.raises(RecipeError, match="does not exist"):
        resolve_source("./missing/model")
    assert resolve_source("org/model") == "org/model"  # a Hub id is passed through


def test_unknown_example_is_rejected():
    with pytest.raises(RecipeError, match="unknown example model .nope.; choose one of: minilm-l6"):
        resolve_source("example:nope")
