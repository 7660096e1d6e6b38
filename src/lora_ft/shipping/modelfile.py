"""The Ollama ``Modelfile`` beside an exported GGUF file: FROM, TEMPLATE, stop tokens, system prompt.

Ollama renders prompts with a Go template, not the model's Jinja chat template, and a Jinja template cannot be
translated in general. Most chat templates are simple, though: every message is wrapped in a prefix and suffix
that depend on its role (ChatML, Llama 3, Zephyr, ...), a fixed text may open the conversation when it has no
system message (SmolLM2's and Qwen2.5's default system prompts), and the prompt ends with the assistant's
opening. ``chat_format`` reads those pieces off the tokenizer's own renderings of probe conversations and accepts
them only if they reproduce every probe exactly; any other template is reported as not translated (in the
Modelfile and the log), and Ollama falls back to its own handling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# Probe contents: plain words that no template rewrites (no spaces to strip, no markup).
_PROBE = {"system": "SYSPROBEq", "user": "USRPROBEq", "assistant": "ASTPROBEq"}


def _msg(role: str, n: int = 0) -> dict[str, str]:
    return {"role": role, "content": f"{_PROBE[role]}{n}"}


# Conversations the translation must reproduce: with and without a system message, several turns.
PROBES: list[list[dict[str, str]]] = [
    [_msg("user")],
    [_msg("system"), _msg("user")],
    [_msg("user"), _msg("assistant"), _msg("user", 1)],
    [_msg("system"), _msg("user"), _msg("assistant"), _msg("user", 1), _msg("assistant", 1), _msg("user", 2)],
]


@dataclass
class ChatFormat:
    """A wrap-each-message template: ``opening`` (only when the first message is not a system message), then
    ``prefix[role] + content + suffix[role]`` per message, then ``generation`` (the assistant's opening)."""

    prefix: dict[str, str] = field(default_factory=dict)
    suffix: dict[str, str] = field(default_factory=dict)
    generation: str = ""
    opening: str = ""

    def render(self, messages: list[dict[str, str]]) -> str:
        text = self.opening if messages[0]["role"] != "system" else ""
        for m in messages:
            text += self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]]
        return text + self.generation

    def go_template(self) -> str:
        """The same rendering in Ollama's template language (one line: no trim markers to eat the newlines)."""
        branches = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{r}" }}}}{self.prefix[r]}'
                           f"{{{{ .Content }}}}{self.suffix[r]}" for i, r in enumerate(ROLES))
        opening = f'{{{{ if ne (index .Messages 0).Role "system" }}}}{self.opening}{{{{ end }}}}' \
            if self.opening else ""
        return f"{opening}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{self.generation}"


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _after(longer: str, shorter: str) -> str | None:
    return longer[len(shorter):] if longer.startswith(shorter) else None


def _wrapper(text: str, content: str) -> tuple[str, str] | None:
    """(prefix, suffix) around the one occurrence of ``content`` in ``text``."""
    if text is None or text.count(content) != 1:
        return None
    before, after = text.split(content)
    return before, after


def chat_format(tokenizer: PreTrainedTokenizerBase, lead: str = "") -> ChatFormat | None:
    """The tokenizer's chat template as a ``ChatFormat``, or None when it is not one (or fails a probe).

    Args:
        tokenizer: with a chat template.
        lead: text every rendering starts with that the runtime adds itself (the BOS token's text, when the
            tokenizer adds BOS): kept out of the format.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        strip = (lambda t: _after(t, lead)) if lead else (lambda t: t)
        system = strip(_render(tokenizer, [_msg("system")], False))
        su = strip(_render(tokenizer, [_msg("system"), _msg("user")], False))
        sua = strip(_render(tokenizer, [_msg("system"), _msg("user"), _msg("assistant")], False))
        su_gen = strip(_render(tokenizer, [_msg("system"), _msg("user")], True))
        u = strip(_render(tokenizer, [_msg("user")], False))
    except Exception as e:  # a template may raise for any conversation shape it rejects (roles must alternate, …)
        log.debug("chat template probe failed: %s", e)
        return None
    if None in (system, su, sua, su_gen, u):
        return None
    fmt = ChatFormat()
    parts = {"system": _wrapper(system, _PROBE["system"] + "0"),
             "user": _wrapper(_after(su, system), _PROBE["user"] + "0"),
             "assistant": _wrapper(_after(sua, su), _PROBE["assistant"] + "0")}
    if None in parts.values():
        return None
    for role, (pre, suf) in parts.items():
        fmt.prefix[role], fmt.suffix[role] = pre, suf
    fmt.generation = _after(su_gen, su)
    user_block = fmt.prefix["user"] + _PROBE["user"] + "0" + fmt.suffix["user"]
    fmt.opening = u[: -len(user_block)] if u.endswith(user_block) else None
    if fmt.generation is None or fmt.opening is None:
        return None
    for messages in PROBES:
        expected = strip(_render(tokenizer, messages, True))
        if expected != fmt.render(messages):
            log.debug("chat template probe mismatch: %r vs %r", expected, fmt.render(messages))
            return None
    return fmt


def stop_tokens(tokenizer: PreTrainedTokenizerBase, fmt: ChatFormat | None) -> list[str]:
    """The texts that end a reply: the EOS token, and the special token that closes an assistant turn."""
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if fmt is not None:
        specials = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()}
        closing = [t for t in specials if fmt.suffix["assistant"].lstrip().startswith(t)]
        stops += sorted(closing, key=len, reverse=True)[:1]
    return list(dict.fromkeys(s for s in stops if s))


def _quoted(text: str) -> str:
    return '"""' + text + '"""'


def modelfile(gguf_name: str, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None,
              lead: str = "") -> tuple[str, bool]:
    """The Modelfile text for ``gguf_name`` (a path relative to the Modelfile) and whether the chat template
    was translated. ``lead``: see ``chat_format``."""
    fmt = chat_format(tokenizer, lead)
    lines = ["# Ollama Modelfile written by lora_ft: ollama create NAME -f Modelfile && ollama run NAME",
             f"FROM ./{gguf_name}"]
    template = fmt.go_template() if fmt is not None else None
    if template is not None and '"""' not in template:
        lines.append(f"TEMPLATE {_quoted(template)}")
    else:
        fmt = None
        lines.append("# TEMPLATE: this model's chat template could not be translated to Ollama's template "
                     "language; Ollama will fall back to its own handling of the GGUF's chat template, "
                     "which may differ from the one the model was trained with.")
        log.warning("the chat template could not be translated to an Ollama TEMPLATE; the Modelfile has none")
    lines += [f'PARAMETER stop "{s}"' for s in stop_tokens(tokenizer, fmt) if '"' not in s]
    if system_prompt:
        lines.append(f"SYSTEM {_quoted(system_prompt)}")
    return "\n".join(lines) + "\n", fmt is not None
