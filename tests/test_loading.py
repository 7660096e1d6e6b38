"""Model loading: bitsandbytes layers for each quant, fresh heads never quantized, pad token, sources."""

import bitsandbytes as bnb
import pytest
import torch

from lora_ft.errors import RecipeError
from lora_ft.modeling.loading import load_model, load_tokenizer, new_head_modules, quantization_config, resolve_source
from lora_ft.recipe import ModelConfig

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


@pytest.mark.parametrize("double_quant", [True, False])
def test_double_quant_reaches_the_nf4_layers(tiny_llama, double_quant):
    m = load_model(ModelConfig(name=str(tiny_llama), quant="nf4", double_quant=double_quant), "fp32").model
    for layer in (m.model.layers[0].self_attn.q_proj, m.model.layers[1].mlp.down_proj):
        assert layer.weight.quant_state.nested is double_quant


def _without_pooler(tiny_bert, folder, sharded: bool):
    """A copy of the tiny BERT checkpoint lacking the pooler, as one safetensors file or with an index."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_bert, folder)
    weights = {k: v for k, v in load_file(folder / "model.safetensors").items() if "pooler" not in k}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    if sharded:  # the index alone names the tensors; the shard must not even be opened
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        index = {"metadata": {}, "weight_map": dict.fromkeys(weights, "model-00001-of-00001.safetensors")}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("sharded", [False, True])
def test_hub_checkpoint_without_pooler_keeps_the_pooler_as_a_new_unquantized_head(tiny_bert, tmp_path, monkeypatch,
                                                                                   sharded):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    import lora_ft.modeling.loading

    folder = _without_pooler(tiny_bert, tmp_path / "hub", sharded)
    calls = []

    def fake_cached_file(repo, filename, revision=None, local_files_only=False, **kwargs):
        """transformers' Hub resolution, serving the repo 'someone/bert-nopooler' from ``folder``."""
        assert repo == "someone/bert-nopooler" and kwargs["_raise_exceptions_for_missing_entries"] is False
        calls.append((filename, revision, local_files_only))
        path = folder / filename
        return str(path) if path.is_file() else None

    monkeypatch.setattr(lora_ft.modeling.loading, "cached_file", fake_cached_file)
    config = AutoConfig.from_pretrained(folder)
    heads, keep = new_head_modules(config, "sequence_classification", "someone/bert-nopooler", "v1", fetch=True)
    assert heads == ["bert.pooler.dense", "classifier"]
    assert calls[0] == ("model.safetensors.index.json", "v1", False)
    assert all(revision == "v1" for _, revision, _ in calls) and len(calls) == (1 if sharded else 2)
    # Without the tensor names (offline, nothing cached) only modules outside the backbone count as new.
    monkeypatch.setattr(lora_ft.modeling.loading, "cached_file", lambda *a, **k: None)
    assert new_head_modules(config, "sequence_classification", "someone/bert-nopooler")[0] == ["classifier"]
    # The skip list load_model builds from these heads keeps the fresh pooler out of bitsandbytes.
    config.num_labels = 3
    q = quantization_config(ModelConfig(quant="nf4"), torch.float32, sorted(set(heads) | set(keep)))
    m = AutoModelForSequenceClassification.from_pretrained(folder, config=config, quantization_config=q,
                                                           device_map={"": "cpu"}, dtype=torch.float32)
    assert type(m.bert.pooler.dense) is torch.nn.Linear and m.bert.pooler.dense.weight.dtype == torch.float32
    assert type(m.classifier) is torch.nn.Linear
    assert isinstance(m.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_rewriting_init_trains_and_reloads_to_the_same_logits(tiny_llama, chat_data, tmp_path, monkeypatch,
                                                                      init):
    """PiSSA/OLoRA move the base weights' principal part into the adapter; peft redoes that (deterministic)
    split on load, so the saved adapter on a freshly loaded base must be the trained model."""
    import json

    from conftest import make_recipe
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lora_ft.training.checkpoint
    from lora_ft.training.trainer import train

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tok.apply_chat_template([{"role": "user", "content": "What does the owl say?"},
                                   {"role": "assistant", "content": "The owl says hoot."}], return_tensors="pt",
                                  return_dict=True)["input_ids"]
    trained = {}
    save = lora_ft.training.checkpoint.save_adapter

    def logits_then_save(model, folder, *args, **kwargs):  # the trained model, as it is written out
        model.eval()
        with torch.no_grad():
            trained["logits"] = model(input_ids=ids).logits
        return save(model, folder, *args, **kwargs)

    monkeypatch.setattr(lora_ft.training.checkpoint, "save_adapter", logits_then_save)
    out = tmp_path / "run"
    recipe = make_recipe(tiny_llama, {"train": chat_data["train"], "validation": chat_data["validation"]}, out,
                         lora={"init": init}, train={"max_steps": 4, "lr": 1e-3}, data={"max_eval_examples": 8})
    results = train(recipe)
    assert results["after"]["validation"]["loss"] < results["before"]["validation"]["loss"]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] == init

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    reloaded = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    assert (trained["logits"] - base_logits).abs().max() > 1e-2  # training changed the model
    assert (again - trained["logits"]).abs().max() < 1e-4


def test_remote_code_runs_only_when_the_recipe_says_so_and_is_warned_first(tiny_llama, caplog, monkeypatch):
    from transformers import AutoTokenizer

    from lora_ft.modeling import loading as model_mod
    from lora_ft.recipe import ModelConfig

    seen = []
    real = AutoTokenizer.from_pretrained

    def spy(source, **kwargs):
        warned = any("trust_remote_code is on" in r.getMessage() for r in caplog.records)
        seen.append((kwargs["trust_remote_code"], warned))
        return real(source, **kwargs)

    monkeypatch.setattr(model_mod.AutoTokenizer, "from_pretrained", spy)
    model_mod._warn_once.cache_clear()
    with caplog.at_level("WARNING", logger="lora_ft.modeling.loading"):
        model_mod.load_tokenizer(str(tiny_llama), ModelConfig(name=str(tiny_llama)))
        model_mod.load_tokenizer(str(tiny_llama), ModelConfig(name=str(tiny_llama), trust_remote_code=True))
    assert seen == [(False, False), (True, True)]  # off by default; when on, the warning comes before any code


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_an_evaluation_pass_leaves_4bit_weights_and_lora_gradients_unchanged(tiny_llama, quant):
    """On AVX512-BF16 CPUs bitsandbytes re-packs 4-bit weights in its first eval-mode no-grad forward, and its
    backward then computes wrong gradients; lora_ft's models must keep the trainable layout. (On other CPUs
    bitsandbytes never re-packs, so there this holds either way.)"""
    from lora_ft.modeling.adapters import attach_adapters
    from lora_ft.recipe import LoraConfigSection

    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))

    def gradients(evaluate_first: bool):
        loaded = load_model(ModelConfig(name=str(tiny_llama), quant=quant), "fp32")
        torch.manual_seed(0)
        model = attach_adapters(loaded.model, LoraConfigSection(r=4, dropout=0.0, init="gaussian"), "causal_lm", [],
                                False)
        weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        stored = weight.detach().clone()
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            assert torch.equal(weight.detach(), stored)  # not re-packed
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = gradients(False), gradients(True)
    assert any(g.abs().max() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(after_eval[name], plain[name], rtol=0, atol=1e-6)
