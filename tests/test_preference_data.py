"""Preference rows: TRL's explicit and implicit prompt layouts, strings or messages, and the loss mask on the final
answer only."""

import json
import re

import pytest
from conftest import labelled_text

from lora_ft.data.preference import encode_answer, read_pair
from lora_ft.data.prepare import prepare_data
from lora_ft.errors import DataError, RecipeError
from lora_ft.objectives.preference import Preference
from lora_ft.recipe import DataConfig, ObjectiveConfig

CFG = DataConfig()
COW = [{"role": "user", "content": "What does the cow say?"}]


def test_string_and_conversational_rows_give_the_same_pair():
    strings = read_pair({"prompt": "What does the cow say?", "chosen": "moo", "rejected": "woof"}, CFG)
    messages = read_pair({"prompt": COW, "chosen": [{"role": "assistant", "content": "moo"}],
                          "rejected": [{"role": "assistant", "content": "woof"}]}, CFG)
    assert strings == messages
    assert (strings.prompt, strings.chosen, strings.rejected) == (COW, "moo", "woof")


def _parts(*texts: str) -> list[dict]:
    return [{"type": "text", "text": t} for t in texts]


def test_text_part_contents_give_the_pair_of_the_same_strings_in_both_layouts():
    """Contents as lists of text parts (the OpenAI/transformers layout) are their joined text, in the prompt, the
    one-message answers and the implicit layout's shared conversation."""
    explicit = read_pair({"prompt": [{"role": "user", "content": _parts("What does the ", "cow say?")}],
                          "chosen": [{"role": "assistant", "content": _parts("mo", "o")}],
                          "rejected": [{"role": "assistant", "content": _parts("woof")}]}, CFG)
    assert (explicit.prompt, explicit.chosen, explicit.rejected) == (COW, "moo", "woof")
    user = {"role": "user", "content": _parts("What does the cow say?")}
    implicit = read_pair({"chosen": [user, {"role": "assistant", "content": _parts("moo")}],
                          "rejected": [user, {"role": "assistant", "content": "woof"}]}, CFG)
    assert implicit == explicit


def test_implicit_prompt_is_the_shared_conversation_before_the_last_answer():
    turns = [*COW, {"role": "assistant", "content": "moo"}, {"role": "user", "content": "And the dog?"}]
    pair = read_pair({"chosen": [*turns, {"role": "assistant", "content": "woof"}],
                      "rejected": [*turns, {"role": "assistant", "content": "meow"}]}, CFG)
    assert (pair.prompt, pair.chosen, pair.rejected) == (turns, "woof", "meow")


def test_system_prompt_goes_first_and_renamed_columns_are_read():
    cfg = DataConfig(system_prompt="Be brief.", prompt_column="q", chosen_column="good", rejected_column="bad")
    pair = read_pair({"q": "Hi", "good": "Hello.", "bad": "Go away."}, cfg)
    assert pair.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (pair.chosen, pair.rejected) == ("Hello.", "Go away.")


@pytest.mark.parametrize("row,message", [
    ({"chosen": "moo", "rejected": "woof"}, "whole conversations"),
    ({"chosen": [*COW, {"role": "assistant", "content": "moo"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "x"}]}, "share every"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "moo"}], "rejected": "woof"}, "one assistant message"),
])
def test_malformed_pairs_are_one_line_errors_naming_the_fix(row, message):
    with pytest.raises(RecipeError, match=message):
        read_pair(row, CFG)


def test_only_the_final_answer_and_its_eos_carry_labels_not_earlier_assistant_turns(tok):
    prompt = [*COW, {"role": "assistant", "content": "The cow says moo."}, {"role": "user", "content": "And the dog?"}]
    enc = encode_answer(tok, prompt, "The dog says woof.")
    assert labelled_text(tok, enc) == "The dog says woof.<|im_end|>"
    assert enc["input_ids"][-1] != enc["labels"][-1]  # the template's newline after the EOS is not scored


def test_without_a_chat_template_string_pairs_render_as_prompt_newline_answer_eos(tok):
    template, tok.chat_template = tok.chat_template, None
    try:
        enc = encode_answer(tok, COW, "moo")
        assert tok.decode(enc["input_ids"]) == "What does the cow say?\nmoo<|im_end|>"
        assert labelled_text(tok, enc) == "moo<|im_end|>"
        with pytest.raises(RecipeError, match="no chat template"):
            encode_answer(tok, [*COW, {"role": "assistant", "content": "moo"}, *COW], "moo")
    finally:
        tok.chat_template = template


def test_shipped_preference_pairs_are_rebuilt_exactly_from_the_shipped_docstrings(monkeypatch):
    """data/docstring_prefs is build_preferences() of data/docstrings: real summaries only, the rejected one another
    function's of the same split."""
    import importlib
    import json
    from pathlib import Path

    root = Path(__file__).parents[1]
    data = root / "data"
    monkeypatch.syspath_prepend(str(root / "scripts"))
    build = importlib.import_module("build_example_data")

    def read(name, split):
        return [json.loads(line) for line in (data / name / f"{split}.jsonl").read_text().splitlines()]

    docstrings = {s: read("docstrings", s) for s in build.SPLITS}
    shipped = {s: read("docstring_prefs", s) for s in build.SPLITS}
    assert build.build_preferences(docstrings, seed=0) == shipped
    for split, pairs in shipped.items():
        summaries = {r["messages"][1]["content"] for r in docstrings[split]}
        assert all(p["chosen"][0]["content"] != p["rejected"][0]["content"] for p in pairs)
        assert {p["rejected"][0]["content"] for p in pairs} <= summaries


@pytest.mark.parametrize("bad,message", [
    ({"chosen": None}, "row 3: column 'chosen' is empty; every example needs this text"),
    ({"chosen": 3}, "row 3: data.chosen: a completion is a string or one assistant message"),
    ({"rejected": "  "}, "row 3, column 'rejected' is empty; every example needs this text"),
    ({"prompt": None}, "row 3: data: without a 'prompt' column, 'chosen' and 'rejected' must be whole conversations"),
    ({"prompt": [{"role": "user", "content": [{"type": "image", "url": "cow.png"}, {"type": "text", "text": "Hm?"}]}]},
     "row 3: data.prompt: message 1 (user) has a part of type 'image' (part 1): only text parts are read, as lora-ft "
     "trains text models; remove the part or the row"),
    ({"chosen": [{"role": "assistant", "content": [{"type": "audio", "path": "moo.wav"}]}]},
     "row 3: data.chosen: message 1 (assistant) has a part of type 'audio' (part 1): only text parts are read, as "
     "lora-ft trains text models; remove the part or the row"),
])
def test_a_bad_pair_is_one_data_error_naming_file_and_row_before_anything_is_tokenized(tok, tmp_path, bad, message):
    rows = [{"prompt": "What does the cow say?", "chosen": "moo", "rejected": "woof"} for _ in range(4)]
    rows[2].update(bad)
    file = tmp_path / "prefs.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=str(file))
    objective = Preference(cfg, tok, ObjectiveConfig(type="dpo"))
    with pytest.raises(DataError, match=re.escape(f"data.train: {file} {message}")):
        prepare_data(cfg, objective, seed=0)
