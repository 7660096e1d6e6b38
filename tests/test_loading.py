"""Model loading: bitsandbytes layers for each quant, fresh heads never quantized, pad token, sources."""

import json
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import build_chat_tokenizer

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
    assert sorted(heads) == ["bert.pooler", "classifier"]


def test_a_head_made_of_several_layers_is_one_new_module(tiny_roberta):
    # RoBERTa's classifier holds no parameter itself, only its `dense` and `out_proj` do: one head, trained whole.
    from transformers import AutoConfig

    heads, _ = new_head_modules(AutoConfig.from_pretrained(tiny_roberta), "sequence_classification", str(tiny_roberta))
    assert heads == ["classifier"]


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
    assert heads == ["bert.pooler", "classifier"]
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


CUSTOM_CONFIG = '''
from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tinycustom"
'''
CUSTOM_MODEL = '''
import os

from transformers import LlamaForCausalLM

from .configuration_tinycustom import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig

    def __init__(self, config):
        super().__init__(config)
        with open(os.environ["LORA_FT_TEST_REMOTE_CODE"], "a") as f:  # proof that this code ran
            f.write("ran\\n")
'''


@pytest.fixture
def remote_code_model(tiny_llama, tmp_path, monkeypatch):
    """The tiny Llama as a model whose class lives in its own folder (``auto_map``): loading it runs that code,
    which appends a line to a marker file each time."""
    folder = Path(shutil.copytree(tiny_llama, tmp_path / "custom"))
    (folder / "configuration_tinycustom.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_tinycustom.py").write_text(CUSTOM_MODEL)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tinycustom", architectures=["TinyCustomForCausalLM"], auto_map={
        "AutoConfig": "configuration_tinycustom.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tinycustom.TinyCustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran.txt"
    marker.write_text("")
    monkeypatch.setenv("LORA_FT_TEST_REMOTE_CODE", str(marker))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    return folder, marker


def test_trust_remote_code_is_applied_at_every_load_and_warned_about(remote_code_model, chat_data, tmp_path, capsys,
                                                                     monkeypatch):
    """One recipe flag, the same at every load: training (config, meta model for the heads and the planner, model,
    tokenizer), merge, and inference on the merged folder each run the model's own code when the recipe trusts it,
    and never otherwise; code from a folder someone else made is warned about every time."""
    import yaml

    from lora_ft.cli import main
    from lora_ft.memory import shape
    from lora_ft.modeling import loading as model_mod

    folder, marker = remote_code_model
    recipe, out = tmp_path / "r.yaml", tmp_path / "run"

    def write(trust: bool):
        recipe.write_text(yaml.safe_dump({
            "model": {"name": str(folder), "trust_remote_code": trust}, "lora": {"r": 2},
            "data": {"train": str(chat_data["train"]), "validation": str(chat_data["validation"]), "max_length": 64,
                     "max_eval_examples": 4},
            "train": {"max_steps": 1, "micro_batch_size": 8}, "output_dir": str(out)}))

    def ran() -> int:
        return len(marker.read_text().splitlines())

    write(False)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"lora-ft: error: model.name: cannot load '{folder}' (") and "trust_remote_code" in err
    assert ran() == 0 and not out.exists()

    write(True)
    model_mod._warn_once.cache_clear()
    counts = {}
    for name, argv in {"train": ["train", str(recipe)], "plan": ["plan", str(recipe), "--device", "cpu"],
                       "merge": ["merge", str(out), "--examples", "4"],
                       "generate --merged": ["generate", str(out), "--merged", "--prompt", "hi",
                                             "--max-new-tokens", "2"]}.items():
        shape._model_shape.cache_clear()  # the planner caches the meta model it builds: build it again
        before = ran()
        assert main(argv) == 0, name
        counts[name] = ran() - before
        assert f"model.trust_remote_code is on: code from {folder}" in capsys.readouterr().err or name != "train"
    assert all(n > 0 for n in counts.values()), counts
    assert (out / "merged" / "modeling_tinycustom.py").is_file()  # the merged folder carries the code it needs

    # A folder someone else made: warned at every load from it, not once per process.
    import pwd

    owner = pwd.getpwuid((out / "merged").stat().st_uid).pw_name
    monkeypatch.setattr(model_mod.os, "getuid", lambda: 4242)  # this process now runs as another user
    for _ in range(2):
        assert main(["generate", str(out), "--merged", "--prompt", "hi", "--max-new-tokens", "2"]) == 0
        err = capsys.readouterr().err
        assert f"code from {out / 'merged'}, a folder made by {owner} (not by you), will run" in err
    monkeypatch.undo()
    # A bare merged folder has no recipe to trust it: its code never runs.
    before = ran()
    assert main(["generate", str(out / "merged"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"lora-ft: error: {out / 'merged'}: cannot open the model without running its own code (")
    assert ran() == before


# ------------------------------------------------------------------ damaged model files: one line naming the file
REFETCH = "download or save the model again (an interrupted download or copy leaves such files)"


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _sharded_llama(tiny_llama: Path, dest: Path) -> Path:
    """tiny_llama saved again in shards of 100 kB (a dozen files and model.safetensors.index.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(dest, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(dest)
    return dest


def _break(how: str, tiny_llama: Path, dest: Path) -> str:
    """Damage a copy of tiny_llama at ``dest`` as ``how`` says; returns the message's middle (file + problem)."""
    if how.startswith("shard"):
        _sharded_llama(tiny_llama, dest)
        index = json.loads((dest / "model.safetensors.index.json").read_text())
        shard = sorted(set(index["weight_map"].values()))[1]
        if how == "shard missing":
            (dest / shard).unlink()
            return f"{dest / shard} is missing (model.safetensors.index.json names it)"
        _cut(dest / shard, 0.9)
        return f"{dest / shard} is cut short or corrupt (header: incomplete metadata, file not fully covered)"
    shutil.copytree(tiny_llama, dest)
    if how == "safetensors cut short":
        _cut(dest / "model.safetensors")
        return f"{dest / 'model.safetensors'} is cut short or corrupt (header: incomplete metadata, file not fully " \
               "covered)"
    if how == "safetensors empty":
        (dest / "model.safetensors").write_bytes(b"")
        return f"{dest / 'model.safetensors'} is cut short or corrupt (header: header too small)"
    name = {"tokenizer.json garbage": "tokenizer.json", "tokenizer_config.json cut short": "tokenizer_config.json",
            "config.json cut short": "config.json"}[how]
    if how == "tokenizer.json garbage":
        (dest / name).write_text("\x00\x01 not a tokenizer")
        return f"{dest / name} is not valid JSON (Expecting value: line 1 column 1 (char 0))"
    (dest / name).write_text((dest / name).read_text()[:20])
    try:  # the parser's own words are the message's
        json.loads((dest / name).read_text())
    except ValueError as e:
        return f"{dest / name} is not valid JSON ({e})"
    raise AssertionError("the cut file still parses")


BROKEN = ["safetensors cut short", "safetensors empty", "shard missing", "shard cut short", "tokenizer.json garbage",
          "tokenizer_config.json cut short", "config.json cut short"]


@pytest.mark.parametrize("how", BROKEN)
def test_a_damaged_model_file_is_one_line_naming_it_and_the_fix(how, tiny_llama, chat_data, tmp_path, capsys):
    """An interrupted download or copy of the base model: `train` ends with one line that names the damaged file
    (never safetensors' or json's traceback), exits 2, and leaves the model folder as it was."""
    from test_errors import _digest, error_line

    from lora_ft.cli import main

    folder = tmp_path / "model"
    what = _break(how, tiny_llama, folder)
    before = _digest(folder)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"name": str(folder)}, "data": {"train": str(chat_data["train"])},
                                  "train": {"max_steps": 1}, "output_dir": str(tmp_path / "run")}))
    assert main(["train", str(recipe)]) == 2
    assert error_line(capsys.readouterr().err) == f"lora-ft: error: model.name: {what}; {REFETCH}"
    assert _digest(folder) == before
    assert not (tmp_path / "run" / "run_config.yaml").exists()


def test_a_damaged_file_in_the_hub_cache_says_to_delete_the_repos_cache_folder(tiny_llama, tmp_path, monkeypatch):
    """A Hub id is checked in its cached snapshot; deleting the one file would not do (its blob would be linked
    again), so the message names the repo's cache folder."""
    import lora_ft.modeling.loading

    repo = tmp_path / "hub" / "models--someone--llama"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(tiny_llama, snapshot)
    (snapshot / "tokenizer.json").write_text('{"version": "1.0", "trunc')

    def fake_cached_file(name, filename, revision=None, local_files_only=False, **kwargs):
        """transformers' cache lookup, serving 'someone/llama' from the snapshot above."""
        assert name == "someone/llama"
        return str(snapshot / filename) if (snapshot / filename).is_file() else None

    monkeypatch.setattr(lora_ft.modeling.loading, "cached_file", fake_cached_file)
    with pytest.raises(RecipeError) as caught:  # offline, transformers itself finds nothing: an OSError first
        load_tokenizer("someone/llama", ModelConfig(name="someone/llama"))
    assert str(caught.value) == (f"model.name: {snapshot / 'tokenizer.json'} is not valid JSON (Unterminated string "
                                 f"starting at: line 1 column 20 (char 19)); delete {repo} to download the model again")


def test_a_model_that_fails_to_load_for_another_reason_keeps_the_old_message(tmp_path):
    """Every file reads: the failure is not a damaged file, and the message stays 'cannot load'."""
    with pytest.raises(RecipeError, match="model.name: cannot load 'nobody/nothing' .*check the name, or the network"):
        load_tokenizer("nobody/nothing", ModelConfig(name="nobody/nothing"))


def _net_allocation_peak(fn) -> int:
    from lora_ft.training.measure import cpu_allocation_peak

    return cpu_allocation_peak(fn)


def test_an_nf4_load_of_a_sharded_bf16_checkpoint_holds_one_tensor_beside_the_quantized_model(tmp_path):
    """The memory a quantized load allocates is the quantized model plus one tensor being converted (read, cast
    to fp32, quantized): never the checkpoint, let alone the model in fp32. Reading through transformers' own
    memory maps held every shard's tensors until the end (peak 88% of the fp32 size here); the weights loaded
    are the same either way."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_ft.training.measure import _held_bytes

    cfg = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="1MB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 6  # really sharded
    build_chat_tokenizer().save_pretrained(tmp_path)
    loaded = {}
    peak = _net_allocation_peak(lambda: loaded.update(m=load_model(ModelConfig(name=str(tmp_path), quant="nf4"),
                                                                   "fp32").model))
    model = loaded["m"]
    fp32 = 4 * sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    held = _held_bytes(model, None)
    assert held < fp32 / 4  # NF4 weights, fp32 embeddings and head
    assert peak < held + fp32 / 4, (peak, held, fp32)
    assert model.name_or_path == str(tmp_path)
    # The same weights as transformers' own loading of the folder (compared stored values: the forward of a
    # model lora_ft loaded takes another CPU kernel, see _keep_cpu_weights_trainable).
    quant = quantization_config(ModelConfig(name=str(tmp_path), quant="nf4"), torch.float32, ["lm_head"])
    own = dict(LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantization_config=quant,
                                                device_map={"": "cpu"}).named_parameters())
    ours = dict(model.named_parameters())
    assert ours.keys() == own.keys()
    for name, p in ours.items():
        assert p.dtype == own[name].dtype and torch.equal(p.data, own[name].data), name
        if hasattr(p, "quant_state"):
            assert torch.equal(p.quant_state.absmax, own[name].quant_state.absmax), name
