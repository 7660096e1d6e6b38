"""model.chat_template: chat data on a base model whose tokenizer has no template and no ChatML tokens."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CHATML, TINY_LLAMA, build_chat_tokenizer, make_recipe, save_random_llama
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_ft.data.chat import encode_chat
from lora_ft.errors import RecipeError
from lora_ft.modeling.chat_template import fit_embeddings, template_token_ids, token_modules
from lora_ft.modeling.loading import load_tokenizer
from lora_ft.recipe import ModelConfig
from lora_ft.run import load_adapter_model, load_run_tokenizer, open_run
from lora_ft.scoring.generation import own_stop_token_ids
from lora_ft.shipping import export
from lora_ft.shipping.merge import merge_run
from lora_ft.training.trainer import train

CONVERSATION = [{"role": "user", "content": "What does the cow say?"},
                {"role": "assistant", "content": "The cow says moo."}]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """The tiny Llama with a base model's tokenizer (no template, no ChatML tokens): a base model, as downloaded."""
    return save_random_llama(tmp_path_factory, "tiny-base", build_chat_tokenizer(base=True), **TINY_LLAMA)


def _tokenizer(folder: Path, template: str):
    return load_tokenizer(str(folder), ModelConfig(name=str(folder), chat_template=template))


def test_chatml_on_a_base_tokenizer_adds_its_two_tokens_and_answers_end_with_the_new_eos(tiny_base):
    base = AutoTokenizer.from_pretrained(tiny_base)
    tok = _tokenizer(tiny_base, "chatml")
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert len(tok) == len(base) + 2 and {start, end} == {len(base), len(base) + 1}
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == end
    assert template_token_ids(tok) == sorted([start, end])
    enc = encode_chat(tok, CONVERSATION, train_on_prompt=False)
    answer = [i for i, label in zip(enc["input_ids"], enc["labels"], strict=True) if label != -100]
    assert tok.decode(answer) == "The cow says moo.<|im_end|>"  # the turn end is learned, the newline is not
    assert enc["input_ids"].count(start) == 2 and answer[-1] == end  # each a single token, not text pieces


def test_a_template_file_that_ends_answers_with_eos_adds_nothing(tiny_base, tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                    "{% if add_generation_prompt %}assistant: {% endif %}")
    base = AutoTokenizer.from_pretrained(tiny_base)
    tok = _tokenizer(tiny_base, str(path))
    assert len(tok) == len(base) and tok.eos_token == "<|endoftext|>"
    assert template_token_ids(tok) == [tok.eos_token_id]
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == (
        "user: What does the cow say?\nassistant: The cow says moo.<|endoftext|>\n")


def test_a_tokenizer_folder_lends_its_template_and_only_the_special_tokens_it_writes(tiny_base, tmp_path):
    source = AutoTokenizer.from_pretrained(tiny_base)
    source.add_tokens(["<|im_start|>", "<|im_end|>", "<|tool|>"], special_tokens=True)
    source.chat_template = CHATML
    source.save_pretrained(tmp_path / "chat-tokenizer")
    tok = _tokenizer(tiny_base, str(tmp_path / "chat-tokenizer"))
    assert tok.chat_template == CHATML and tok.eos_token == "<|im_end|>"
    assert "<|tool|>" not in tok.get_vocab() and len(tok) == len(source) - 1


def test_new_rows_start_at_the_mean_and_the_new_eos_becomes_a_stop_token(tiny_base):
    tok = _tokenizer(tiny_base, "chatml")
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    old_in, old_out = model.get_input_embeddings().weight.clone(), model.get_output_embeddings().weight.clone()
    fit_embeddings(model, tok)
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    n = len(old_in)
    assert new_in.shape[0] == len(tok) == new_out.shape[0] == model.config.vocab_size
    assert torch.equal(new_in[:n], old_in) and torch.equal(new_out[:n], old_out)
    for row in range(n, len(tok)):
        torch.testing.assert_close(new_in[row], old_in.mean(0))
        torch.testing.assert_close(new_out[row], old_out.mean(0))
    assert model.generation_config.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")]
    assert model.config.eos_token_id == tok.eos_token_id
    rows = template_token_ids(tok)
    assert token_modules(model, rows) == {"model.embed_tokens": rows, "lm_head": rows}  # untied: both layers


@pytest.mark.parametrize("value, message", [
    ("chatlm", "model.chat_template: 'chatlm' is no built-in template (did you mean 'chatml'?)"),
    ("./missing.jinja", "model.chat_template: template file not found: ./missing.jinja"),
    ("./no-such-folder", "model.chat_template: ./no-such-folder does not exist; give a built-in name (chatml), a "
                         ".jinja file or a tokenizer folder"),
    ("BASE", "model.chat_template: the tokenizer of 'BASE' has no chat template to take"),
    ("NOEND", "model.chat_template: the template ends an answer with '\\n', not with a special token, so the model "
              "could not learn where an answer ends: end assistant turns with {{ eos_token }} or a token of the "
              "vocabulary such as <|im_end|>"),
    ("BROKEN", "model.chat_template: the template of 'BROKEN' does not render a user/assistant conversation "
               "(unexpected end of template, expected 'end of print statement'.)"),
    ("USERS", "model.chat_template: the template of 'users.jinja' does not write the assistant's answer as given "
              "(it renders conversations for inference only); use one that writes every turn"),
])
def test_a_template_that_cannot_serve_is_refused_in_one_line(value, message, tiny_base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "noend.jinja").write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
                                          "{% endfor %}")
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m.role ")
    (tmp_path / "users.jinja").write_text("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
                                          "{{ eos_token }}{% endif %}{% endfor %}")
    names = {"BASE": str(tiny_base), "NOEND": "noend.jinja", "BROKEN": "broken.jinja", "USERS": "users.jinja"}
    with pytest.raises(RecipeError) as e:
        _tokenizer(tiny_base, names.get(value, value))
    assert str(e.value) == message.replace("BROKEN", "broken.jinja").replace("BASE", str(tiny_base))


@pytest.fixture(scope="module")
def base_chat_run(tiny_base, chat_data, tmp_path_factory) -> Path:
    """The answering fixture's run (40 steps, generation evaluated) on the base model with ``chat_template:
    chatml``."""
    out = tmp_path_factory.mktemp("base-chat") / "run"
    splits = {k: v for k, v in chat_data.items() if k != "test"}
    train(make_recipe(tiny_base, splits, out, model={"chat_template": "chatml"},
                      eval={"generate": "auto", "examples": 12}, train={"max_steps": 40, "eval_every": None}))
    return out


def test_a_base_model_learns_to_end_its_answers_with_the_template_turn_end(base_chat_run):
    # Training only the LoRA layers (the token rows left at their mean start) gave stop_rate 0.0, exact_match 0.0:
    # the untrained output row never makes <|im_end|> the likeliest token (checked by switching the rows off).
    after = json.loads((base_chat_run / "eval_results.json").read_text())["after"]["validation"]
    assert after["stop_rate"] >= 0.9 and after["exact_match"] >= 0.5
    adapter = json.loads((base_chat_run / "adapter/adapter_config.json").read_text())
    tok = load_run_tokenizer(open_run(base_chat_run))
    rows = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert adapter["trainable_token_indices"] == {"model.embed_tokens": rows, "lm_head": rows}
    weights = load_file(base_chat_run / "adapter/adapter_model.safetensors")
    rows_saved = {k: v.shape for k, v in weights.items() if "lora_" not in k}
    assert rows_saved == {f"base_model.model.{m}.token_adapter.trainable_tokens_delta": (2, 64)
                          for m in ("model.embed_tokens", "lm_head")}  # the two rows, not the whole layers


def test_the_merged_base_chat_model_answers_and_stops_in_plain_transformers(base_chat_run):
    run = open_run(base_chat_run)
    tok = load_run_tokenizer(run)
    adapter_model = load_adapter_model(run, "cpu", tok).eval()
    merged = Path(merge_run(base_chat_run)["out"])
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    hf_tok = AutoTokenizer.from_pretrained(merged)
    inputs = hf_tok.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        torch.testing.assert_close(model(**inputs).logits, adapter_model(**inputs).logits, atol=1e-4, rtol=1e-4)
    assert hf_tok.decode(out) == "The cow says moo.<|im_end|>"  # generate stopped at the new EOS by itself


def test_a_run_continued_from_the_base_chat_run_starts_where_it_ended(base_chat_run, tiny_base, chat_data, tmp_path):
    splits = {k: v for k, v in chat_data.items() if k != "test"}
    recipe = make_recipe(tiny_base, splits, tmp_path / "more", model={"chat_template": "chatml"},
                         lora={"init_from": str(base_chat_run)}, train={"max_steps": 1, "eval_every": None})
    before = train(recipe)["before"]["validation"]["loss"]
    ended = json.loads((base_chat_run / "eval_results.json").read_text())["after"]["validation"]["loss"]
    assert before == pytest.approx(ended, rel=1e-5)  # the trained token rows came along, not the mean start


def test_continuing_a_base_chat_run_without_its_template_is_refused_in_one_line(base_chat_run, tiny_base, chat_data,
                                                                                 tmp_path):
    from lora_ft.run import adopt_start_adapter

    splits = {k: v for k, v in chat_data.items() if k != "test"}
    folder = shutil.copytree(base_chat_run / "adapter", tmp_path / "adapter-only")
    for start, message in ((base_chat_run, "that run used model.chat_template chatml, not None: set the same "
                                           "template"),
                           (folder, "the adapter trained the rows of a chat template's tokens: set "
                                    "model.chat_template to the template it was trained with")):
        recipe = make_recipe(tiny_base, splits, tmp_path / "more", lora={"init_from": str(start)})
        with pytest.raises(RecipeError) as e:
            adopt_start_adapter(recipe)
        assert str(e.value) == f"lora.init_from {start}: {message}"


def test_the_base_chat_model_exports_to_a_gguf_that_ends_answers_with_the_new_eos(base_chat_run, tmp_path):
    entry = export.export_run(base_chat_run, "q8_0", out=tmp_path / "model.gguf", examples=12)
    assert entry["passed"] and entry["kl_mean"] < 0.02
    model, tok = export.load_gguf(tmp_path / "model.gguf", "cpu")
    assert tok.eos_token == "<|im_end|>" and len(tok) == model.config.vocab_size
    assert own_stop_token_ids(model, tok) == [tok.eos_token_id]  # what llama.cpp stops at
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == (
        "<|im_start|>user\nWhat does the cow say?<|im_end|>\n<|im_start|>assistant\nThe cow says moo.<|im_end|>\n")
