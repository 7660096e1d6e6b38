"""``model.chat_template``: chat data on a base model whose tokenizer has no template, or another template.

Base checkpoints increasingly ship without a chat template (Llama 3.x, Mistral, Qwen2.5-Coder and DeepSeek bases),
so conversations cannot be rendered. As TRL's ``chat_template_path`` / ``clone_chat_template`` do, the setting names
a template: a built-in one (``chatml``), a Jinja file, or a tokenizer folder / Hub id whose template is taken.

Taken further than TRL here, because a base model has never seen the template:
- only the special tokens the template writes are added (TRL adds every added token of the source tokenizer);
- the answers' turn-end token becomes the tokenizer's EOS, found by rendering a probe conversation, so the answer
  masks, generation stops, the merged config and the GGUF all end answers where the template does; a template
  whose answers end with no special token is refused (the model would never learn to stop);
- every special token the template writes (except BOS) gets trainable embedding and output rows (peft's
  ``trainable_token_indices``), new ones and those a base model has but never trained (Llama 3's
  ``<|eot_id|>``): with LoRA alone, an untrained output row keeps the turn-end logit where it was.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from jinja2 import TemplateError
from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import RecipeError, closest, first_line
from ..recipe import looks_local

log = logging.getLogger(__name__)

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML (SmolLM2-Instruct's and Qwen's turns, without their default system prompts): the most widely used
template, and the one llama.cpp and Ollama recognise without being told."""
BUILT_IN = {"chatml": (CHATML, ["<|im_start|>", "<|im_end|>"])}
"""name → (template, the special tokens it writes)."""

_ANSWER = "lora-ft probe answer"
_PROBE = [{"role": "system", "content": "lora-ft probe system"}, {"role": "user", "content": "lora-ft probe user"},
          {"role": "assistant", "content": _ANSWER}]


def _source(value: str, trust_remote_code: bool) -> tuple[str, list[str]]:
    """The template text of ``value`` and the special tokens its source spells (which may need adding)."""
    if value.lower() in BUILT_IN:
        return BUILT_IN[value.lower()]
    path = Path(value).expanduser()
    if path.suffix in (".jinja", ".j2"):
        if not path.is_file():
            raise RecipeError(f"model.chat_template: template file not found: {value}")
        return path.read_text(encoding="utf-8"), []
    if looks_local(value) and not path.is_dir():
        raise RecipeError(f"model.chat_template: {value} does not exist; give a built-in name ({', '.join(BUILT_IN)}), "
                          "a .jinja file or a tokenizer folder")
    if "/" not in value and (near := closest(value.lower(), list(BUILT_IN))):
        raise RecipeError(f"model.chat_template: '{value}' is no built-in template (did you mean '{near}'?)")
    try:
        source = AutoTokenizer.from_pretrained(value, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise RecipeError(f"model.chat_template: '{value}' is not a built-in template ({', '.join(BUILT_IN)}), a "
                          f".jinja file or a tokenizer folder or Hub id that loads ({first_line(e)})") from None
    if not source.chat_template:
        raise RecipeError(f"model.chat_template: the tokenizer of '{value}' has no chat template to take")
    return source.get_chat_template(), [t.content for t in source.added_tokens_decoder.values() if t.special]


def _render(tok: PreTrainedTokenizerBase, value: str) -> str:
    """The probe conversation rendered, without its system turn if the template refuses one (Gemma's)."""
    try:
        try:
            return tok.apply_chat_template(_PROBE, tokenize=False)
        except TemplateError:
            return tok.apply_chat_template(_PROBE[1:], tokenize=False)
    except TemplateError as e:
        raise RecipeError(f"model.chat_template: the template of '{value}' does not render a user/assistant "
                          f"conversation ({first_line(e)})") from None


def _special(tok: PreTrainedTokenizerBase, token_id: int) -> bool:
    added = tok.added_tokens_decoder.get(token_id)
    return token_id in tok.all_special_ids or (added is not None and added.special)


def use_chat_template(tok: PreTrainedTokenizerBase, value: str, trust_remote_code: bool = False) -> None:
    """Give ``tok`` the template ``value``: its missing special tokens added, EOS its answers' turn end.

    Args:
        tok: the base model's tokenizer, changed in place.
        value: the ``model.chat_template`` setting.
        trust_remote_code: ``model.trust_remote_code``, for a source tokenizer with code of its own.
    """
    template, spelled = _source(value, trust_remote_code)
    if tok.chat_template and tok.chat_template != template:
        log.info("model.chat_template: %s replaces the tokenizer's own template", value)
    tok.chat_template = template
    rendered = _render(tok, value)
    if _ANSWER not in rendered:
        raise RecipeError(f"model.chat_template: the template of '{value}' does not write the assistant's answer "
                          "as given (it renders conversations for inference only); use one that writes every turn")
    vocab = tok.get_vocab()
    missing = [t for t in dict.fromkeys(spelled) if t in rendered and t not in vocab]
    if missing:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        log.info("model.chat_template: added the tokens %s (their embeddings are trained)", ", ".join(missing))
    after = rendered[rendered.index(_ANSWER) + len(_ANSWER):]
    ids = tok(after, add_special_tokens=False)["input_ids"]
    if not ids or not _special(tok, ids[0]):
        raise RecipeError(f"model.chat_template: the template ends an answer with {after[:24]!r}, not with a "
                          "special token, so the model could not learn where an answer ends: end assistant turns "
                          "with {{ eos_token }} or a token of the vocabulary such as <|im_end|>")
    end = tok.convert_ids_to_tokens(ids[0])
    if end != tok.eos_token:
        log.info("model.chat_template: answers end with %s, now the tokenizer's EOS (was %s)", end, tok.eos_token)
        tok.eos_token = end


def template_token_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the template writes in a conversation with a generation prompt, BOS excepted (a base
    model has trained it): the embedding rows a base model learns for its new template."""
    text = tok.apply_chat_template(_PROBE[1:2], tokenize=False, add_generation_prompt=True) + _render(tok, "")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return sorted({i for i in ids if _special(tok, i) and i != tok.bos_token_id})


def fit_embeddings(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    """Rows for the tokens the template added, and the tokenizer's EOS among the model's stop tokens.

    New rows start at the mean of the existing ones, written by hand: transformers' ``mean_resizing`` samples them
    from a normal with the embeddings' covariance, which draws from the global random stream (a run's seed would
    no longer give the same run) and costs a hidden × hidden covariance; the mean is deterministic and keeps the
    new tokens' logits at the average (Hewitt, "Initializing new word embeddings", 2021).
    """
    rows = model.get_input_embeddings().num_embeddings
    if len(tok) > rows:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())
                          if m is not None}.values():
                layer.weight[rows:] = layer.weight[:rows].mean(0)
    model.config.eos_token_id = tok.eos_token_id
    if model.can_generate():
        stops = model.generation_config.eos_token_id
        stops = [stops] if isinstance(stops, int) else list(stops or [])
        if tok.eos_token_id not in stops:
            model.generation_config.eos_token_id = [tok.eos_token_id, *stops]


def token_modules(model: PreTrainedModel, ids: list[int]) -> dict[str, list[int]]:
    """peft's ``trainable_token_indices``: ``ids`` in the input embedding and, when not tied to it, the output
    layer (whose row decides whether the model ever predicts the token)."""
    names = {id(m): n for n, m in model.named_modules()}
    embed, out = model.get_input_embeddings(), model.get_output_embeddings()
    modules = {names[id(embed)]: list(ids)}
    if out is not None and out.weight is not embed.weight:
        modules[names[id(out)]] = list(ids)
    return modules
