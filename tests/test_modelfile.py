"""The Ollama Modelfile: its TEMPLATE renders conversations into the same tokens as the tokenizer's chat template.

Ollama's templates are Go ``text/template``s. Each test runs twice: rendering the written TEMPLATE with a small
interpreter of the constructs a Modelfile uses (below, ``[mini]``), and with Go's own text/template (``[go]``, a
program built with the Go toolchain). Without ``go`` on PATH the ``[go]`` runs are skipped with a message saying
so, and fail under CI (``CI`` set; ``.ci/run`` installs Debian's golang-go): the claim "tested against Go's
text/template" rests on the ``[go]`` runs, not on the interpreter.
"""

import json
import logging
import os
import re
import shutil
import subprocess

import pytest
from conftest import build_chat_tokenizer
from tokenizers import processors

from lora_ft.shipping.modelfile import chat_format, modelfile

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
           "trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
          "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Mistral's style: the system prompt is folded into the first user turn; not a wrap-each-message template.
FOLDED = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% if loop.index == 2 %}"
          "{{ messages[0]['content'] + '\n\n' }}{% endif %}{{ m['content'] }} [/INST]"
          "{% elif m['role'] == 'assistant' %}"
          "{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}")
CONVERSATIONS = [
    [{"role": "user", "content": "What does the cow say?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "And the owl?\nBe quick."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "What does the duck say?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
]


# ------------------------------------------------------------------------ Go text/template, two ways
def _parse(tokens: list[str], i: int = 0, stop=("end",)):
    """Nodes of a Go template up to one of the ``stop`` keywords: (nodes, index, keyword that stopped it)."""
    nodes = []
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("{{"):
            nodes.append(("text", tok))
            i += 1
            continue
        action = tok[2:-2].strip()
        word = action.split()[0]
        if word in ("end", "else"):
            return nodes, i, action
        if word == "range":
            body, i, _ = _parse(tokens, i + 1)
            nodes.append(("range", action.split()[1], body))
        elif word == "if":
            branches, cond = [], action[3:]
            while True:
                body, i, stopped = _parse(tokens, i + 1)
                branches.append((cond, body))
                if stopped == "end":
                    break
                cond = stopped[len("else if "):] if stopped.startswith("else if") else "true"
            nodes.append(("if", branches))
        else:
            nodes.append(("value", action))
        i += 1
    return nodes, i, None


def _value(expr: str, dot: dict, root: dict):
    expr = expr.strip()
    if expr.startswith('"'):
        return json.loads(expr)
    if expr == "true":
        return True
    if m := re.fullmatch(r"\(index \.Messages (\d+)\)\.(\w+)", expr):
        return root["Messages"][int(m[1])][m[2].lower()]
    if m := re.fullmatch(r"(eq|ne) (\(.*?\)\.\w+|\.\w+) (\".*\")", expr):
        same = _value(m[2], dot, root) == _value(m[3], dot, root)
        return same if m[1] == "eq" else not same
    return dot[expr.lstrip(".").lower()]


def _run(nodes, dot: dict, root: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "value":
            out.append(str(_value(node[1], dot, root)))
        elif node[0] == "range":
            out += [_run(node[2], item, root) for item in root[node[1].lstrip(".")]]
        else:
            out.append(next((_run(body, dot, root) for cond, body in node[1] if _value(cond, dot, root)), ""))
    return "".join(out)


def mini_go(template: str, messages: list[dict]) -> str:
    """The subset of Go's text/template a Modelfile TEMPLATE uses: range, if / else if / else, eq, ne, index."""
    assert "{{-" not in template and "-}}" not in template  # trim markers would need whitespace handling
    tokens = [t for t in re.split(r"({{.*?}})", template, flags=re.S) if t]
    nodes, _, _ = _parse(tokens)
    root = {"Messages": messages}
    return _run(nodes, root, root)


GO_MAIN = """package main
import ("encoding/json"; "os"; "text/template")
type Message struct { Role string `json:"role"`; Content string `json:"content"` }
func main() {
    tpl, err := os.ReadFile(os.Args[1])
    if err != nil { panic(err) }
    var msgs []Message
    if err := json.Unmarshal([]byte(os.Args[2]), &msgs); err != nil { panic(err) }
    // Execute's error (an unknown field, a wrong argument) must fail the test, not leave a partial rendering.
    tmpl := template.Must(template.New("m").Parse(string(tpl)))
    if err := tmpl.Execute(os.Stdout, map[string]any{"Messages": msgs}); err != nil {
        os.Stderr.WriteString(err.Error()); os.Exit(1)
    }
}
"""


NO_GO = ("Go's text/template check needs `go` on PATH (Debian: apt-get install golang-go); only the in-repo "
         "interpreter ran, which does not show that Ollama renders the TEMPLATE")


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """A renderer with Go's own text/template (Ollama's); skipped without a Go toolchain, a failure under CI."""
    if shutil.which("go") is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {NO_GO}")
        pytest.skip(NO_GO)
    d = tmp_path_factory.mktemp("go")
    (d / "main.go").write_text(GO_MAIN)
    env = {"HOME": str(d), "GOCACHE": str(d / "cache"), "GOPATH": str(d / "gopath"), "PATH": os.environ["PATH"],
           "GO111MODULE": "off"}
    subprocess.run(["go", "build", "-o", str(d / "render"), str(d / "main.go")], check=True, env=env, cwd=d)

    def render(template: str, messages: list[dict]) -> str:
        (d / "tpl").write_text(template)
        r = subprocess.run([str(d / "render"), str(d / "tpl"), json.dumps(messages)], capture_output=True, text=True)
        assert r.returncode == 0, f"Go's text/template refused the TEMPLATE: {r.stderr}"
        return r.stdout
    return render


@pytest.fixture(params=["mini", "go"])
def render(request):
    """Each test once with the in-repo interpreter and once with Go's text/template."""
    return mini_go if request.param == "mini" else request.getfixturevalue("go_render")


def template_of(text: str) -> str:
    return re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)[1]


def assert_same_tokens(tok, template: str, render, add_bos: bool = False):
    """For every conversation: the rendering tokenized as llama.cpp does (special tokens parsed, BOS added
    when the tokenizer adds it) gives the ids of the chat template's rendering."""
    for messages in CONVERSATIONS:
        expected = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
        text = render(template, messages)
        assert tok(text, add_special_tokens=add_bos)["input_ids"] == expected, text


@pytest.fixture
def tok():
    return build_chat_tokenizer()


def test_chatml_template_becomes_an_ollama_template_with_the_same_tokens(tok, render):
    text, translated = modelfile("run-Q8_0.gguf", tok, "Answer like a farmer.")
    assert translated and text.splitlines()[1] == "FROM ./run-Q8_0.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in text.splitlines()
    assert 'SYSTEM """Answer like a farmer."""' in text
    assert_same_tokens(tok, template_of(text), render)


def test_a_default_system_prompt_in_the_template_is_kept_for_conversations_without_one(tok, render):
    tok.chat_template = SMOLLM2
    text, translated = modelfile("m.gguf", tok, None)
    assert translated and "SYSTEM" not in text  # the default lives in the template, as in the Jinja one
    assert "named SmolLM" in template_of(text)
    assert_same_tokens(tok, template_of(text), render)


def test_a_bos_the_runtime_adds_is_not_written_twice(tok, render):
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.bos_token_id)])
    tok.chat_template = LLAMA3
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    text, translated = modelfile("m.gguf", tok, None, lead="<|begin_of_text|>")
    template = template_of(text)
    assert translated and "<|begin_of_text|>" not in template
    assert 'PARAMETER stop "<|eot_id|>"' in text.splitlines()
    assert_same_tokens(tok, template, render, add_bos=True)


def test_a_template_that_cannot_be_translated_is_said_so_in_the_file_and_the_log(tok, caplog):
    tok.chat_template = FOLDED
    assert chat_format(tok) is None
    with caplog.at_level(logging.WARNING, logger="lora_ft"):
        text, translated = modelfile("m.gguf", tok, "Be brief.")
    assert not translated and "TEMPLATE " not in text and "could not be translated" in text
    assert "FROM ./m.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text and 'SYSTEM """Be brief."""' in text
    assert "could not be translated" in caplog.text

