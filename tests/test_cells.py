"""Every documented column, in every JSON type a user can produce, in every reader: one line naming the file, the
row and the column, exit status 2, nothing written — or supported on purpose, with the meaning shown.

The tables go through ``lora-ft validate`` (the same checks ``train`` runs, without weights); a few rows also
through ``train``, to show it refuses the same way before writing anything.
"""

import csv
import json
import math

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import classification_rows, labelled_text, prepare, write_jsonl

from lora_ft.cli import main
from lora_ft.data.cells import (
    BLANK,
    Where,
    candidates,
    check_column,
    check_columns,
    conversation_problem,
    number_problem,
)
from lora_ft.errors import DataError
from lora_ft.recipe import DataConfig

TEXT = "every example needs this text"
NOT_TEXT = {
    "null": (None, f"is null (empty); {TEXT}"),
    "empty string": ("", f"is empty; {TEXT}"),
    "blank string": ("  ", f"is empty; {TEXT}"),
    "list": (["a", "b"], "is a list, not text"),
    "object": ({"a": 1}, "is an object, not text"),
    "JSON string of a list": ('[{"role": "user", "content": "hi"}]',
                              "holds a JSON list of objects, not text (a conversation belongs in the messages column, "
                              "with data.format messages)"),
    "boolean": (True, "is the boolean true, not text"),
}
LABEL = "every example needs a label"
NOT_LABEL = {
    "null": (None, f"is empty; {LABEL}"),
    "empty string": ("", f"is empty; {LABEL}"),
    "list": (["a", "b"], "is a list: several labels per example are multi-label data (set data.format multilabel, "
                         "or auto)"),
    "object": ({"a": 1}, "is an object, not a label"),
    "JSON string of a list": ('["a", "b"]', "holds a JSON list: several labels per example are multi-label data "
                                            "(set data.format multilabel, or auto)"),
}
NOT_CONVERSATION = {
    "null": (None, "is null; every example needs a conversation"),
    "empty string": ("", "is text, not a list of messages (nor a JSON string of one)"),
    "number": (3, "is int, not a list of messages"),
    "object": ({"role": "user", "content": "hi"}, "is dict, not a list of messages"),
    "empty list": ([], "is an empty list of messages"),
    "list of strings": (["hi", "yo"], "message 1 is str, not an object with role and content"),
    "null content": ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
                     "message 2 (assistant) has no content (null)"),
    "empty content": ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
                      "message 2 (assistant) is empty"),
    "object content": ([{"role": "user", "content": {"text": "hi"}}, {"role": "assistant", "content": "yo"}],
                       "message 1 (user) has content of type dict: give its text, or a list of text parts (tool calls "
                       "are not supported)"),
    "image part": ([{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                 {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]},
                    {"role": "assistant", "content": "A cat."}],
                   "message 1 (user) has a part of type 'image_url' (part 2): only text parts are read, as lora-ft "
                   "trains text models; remove the part or the row"),
    "audio part": ([{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [{"type": "input_audio",
                                                       "input_audio": {"data": "UklGRg==", "format": "wav"}}]}],
                   "message 2 (assistant) has a part of type 'input_audio' (part 1): only text parts are read, as "
                   "lora-ft trains text models; remove the part or the row"),
    "part without a type": ([{"role": "user", "content": [{"text": "hi"}]}, {"role": "assistant", "content": "yo"}],
                            "message 1 (user) has a part without a 'type' (keys present: ['text']) (part 1): only "
                            "text parts are read, as lora-ft trains text models; remove the part or the row"),
    "text part without text": ([{"role": "user", "content": [{"type": "text", "text": None}]},
                                {"role": "assistant", "content": "yo"}],
                               "message 1 (user) part 1 (text) has no string 'text'"),
    "unknown role": ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}],
                     "message 2 has the role 'robot'; use one of system, user, assistant, tool, human, gpt"),
    "no answer": ([{"role": "user", "content": "hi"}],
                  "has no assistant answer after the prompt; every conversation needs one"),
    "JSON string, no answer": ('[{"role": "user", "content": "hi"}]',
                               "has no assistant answer after the prompt; every conversation needs one"),
}
CHAT = [{"role": "user", "content": "What does the cow say?"}, {"role": "assistant", "content": "moo"}]
SHAREGPT = [{"from": "human", "value": "What does the cow say?"}, {"from": "gpt", "value": "moo"}]

# column → (recipe changes, task model, a good row, kind of cell, column name in the file)
COLUMNS = {
    "prompt": ({}, "llama", {"prompt": "hi", "completion": "yo"}, NOT_TEXT, "prompt"),
    "completion": ({}, "llama", {"prompt": "hi", "completion": "yo"}, NOT_TEXT, "completion"),
    "instruction": ({}, "llama", {"instruction": "do", "input": "x", "output": "done"}, NOT_TEXT, "instruction"),
    "output": ({}, "llama", {"instruction": "do", "input": "x", "output": "done"}, NOT_TEXT, "output"),
    "input": ({}, "llama", {"instruction": "do", "input": "x", "output": "done"},
              {k: v for k, v in NOT_TEXT.items() if k in ("list", "object", "boolean")}, "input"),
    "text (causal_lm)": ({}, "llama", {"text": "hello there"}, NOT_TEXT, "text"),
    "text (classification)": ({}, "bert", {"text": "rain", "label": "weather"}, NOT_TEXT, "text"),
    "text_pair": ({"text_pair_column": "pair"}, "bert", {"text": "rain", "pair": "snow", "label": "weather"},
                  NOT_TEXT, "pair"),
    "label": ({}, "bert", {"text": "rain", "label": "weather"}, NOT_LABEL, "label"),
    "messages": ({}, "llama", {"messages": CHAT}, NOT_CONVERSATION, "messages"),
    "conversations (sharegpt)": ({}, "llama", {"conversations": SHAREGPT}, NOT_CONVERSATION, "conversations"),
}


def _rows(good: dict, column: str, value, n: int = 3) -> list[dict]:
    """``n`` good rows (two classes) with ``value`` in ``column`` of row 2."""
    rows = [dict(good, **({"label": ("weather", "money", "weather")[i]} if "label" in good else {})) for i in range(n)]
    rows[1][column] = value
    return rows


def _write(path, rows: list[dict]):
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows([{k: ("" if v is None else json.dumps(v) if isinstance(v, list | dict) else v)
                          for k, v in r.items()} for r in rows])
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _recipe(tmp_path, models, model: str, data: dict, file) -> tuple:
    recipe = tmp_path / "r.yaml"
    task = {"model": {"name": str(models[model])}}
    if model == "bert":
        task["model"]["task"] = "sequence_classification"
    recipe.write_text(yaml.safe_dump({**task, "data": {"train": str(file), "max_length": 64, **data},
                                      "output_dir": str(tmp_path / "run")}))
    return recipe


CASES = [(column, kind, ".jsonl") for column, (*_, kinds, _name) in COLUMNS.items() for kind in kinds]
# The other readers: what each can hold. CSV cells are text (an empty cell is how CSV says null; a list is written
# as its JSON string); parquet columns are typed (a null in a text column; a NaN in a float label column).
CASES += [(c, k, ".json") for c in ("completion", "label") for k in ("null", "list", "object")]
CASES += [("messages", k, ".json") for k in ("null", "number", "object")]
CASES += [(c, "empty string", ".csv") for c in ("prompt", "completion", "text (classification)", "label",
                                                 "messages")]
CASES += [("label", "JSON string of a list", ".csv"), ("messages", "JSON string, no answer", ".csv")]
CASES += [(c, "null", ".parquet") for c in ("completion", "text (classification)", "label", "messages")]


@pytest.fixture
def models(tiny_llama, tiny_bert):
    return {"llama": tiny_llama, "bert": tiny_bert}


@pytest.mark.parametrize("column, kind, suffix", CASES, ids=[f"{c}-{k}-{s[1:]}" for c, k, s in CASES])
def test_a_bad_cell_is_one_line_naming_file_row_and_column(column, kind, suffix, models, tmp_path, capsys):
    data, model, good, kinds, name = COLUMNS[column]
    value, problem = kinds[kind]
    file = _write(tmp_path / f"d{suffix}", _rows(good, name, value))
    recipe = _recipe(tmp_path, models, model, data, file)
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"lora-ft: error: {recipe}: 1 problem(s): data.train: {file} row 2, column '{name}' {problem}"
    assert not (tmp_path / "run").exists()


def test_a_nan_label_in_parquet_and_the_count_of_bad_rows(models, tmp_path, capsys):
    rows = [{"text": f"t{i}", "label": float(i % 2)} for i in range(5)]
    rows[2]["label"] = math.nan
    rows[4]["label"] = math.nan
    file = _write(tmp_path / "d.parquet", rows)
    recipe = _recipe(tmp_path, models, "bert", {}, file)
    assert main(["validate", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lora-ft: error: {recipe}: 1 problem(s): data.train: {file} row 3, column 'label' is empty (NaN); every "
        "example needs a label (1 more row(s) like it)")


@pytest.mark.parametrize("column, kind", [("label", "null"), ("completion", "null"), ("messages", "null content")])
def test_train_refuses_the_same_cells_before_writing_anything(column, kind, models, tmp_path, capsys):
    data, model, good, kinds, name = COLUMNS[column]
    value, problem = kinds[kind]
    file = _write(tmp_path / "d.jsonl", _rows(good, name, value))
    assert main(["train", str(_recipe(tmp_path, models, model, data, file))]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"lora-ft: error: data.train: {file} row 2, column '{name}' {problem}"
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ supported on purpose
def test_numbers_are_text_and_optional_input_may_be_empty(tok, tmp_path):
    """A number in a text column is its text (JSON 42 → "42"); alpaca's input may be null or empty."""
    rows = [{"instruction": "Add 40 and 2", "input": None, "output": 42},
            {"instruction": "Say hi", "input": "", "output": "hi"},
            {"instruction": 7, "input": 3.5, "output": "ok"}]
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "a.jsonl", rows)), max_length=64)
    data = prepare(cfg, "causal_lm", tok)
    texts = [tok.decode(ids) for ids in data.splits["train"]["input_ids"]]
    assert labelled_text(tok, data.splits["train"][0]) == "42<|im_end|>"
    assert texts[0].startswith("<|im_start|>user\nAdd 40 and 2<|im_end|>")  # no "None" input
    assert "<|im_start|>user\n7\n\n3.5<|im_end|>" in texts[2]


def test_sharegpt_and_json_string_conversations_train_like_messages(tok, tmp_path):
    """ShareGPT rows (``conversations`` with from/value, roles human/gpt/system) and conversations stored as JSON
    strings (how CSV holds them) are detected and give exactly the tokens of the same ``messages`` rows."""
    system = {"role": "system", "content": "Be brief."}
    messages = [{"messages": [system, *CHAT]}] * 2
    sharegpt = [{"conversations": [{"from": "system", "value": "Be brief."}, *SHAREGPT]}] * 2
    as_csv = tmp_path / "m.csv"
    _write(as_csv, [{"messages": r["messages"]} for r in messages])
    encoded = {}
    for name, path in {"messages": write_jsonl(tmp_path / "m.jsonl", messages),
                       "sharegpt": write_jsonl(tmp_path / "s.jsonl", sharegpt), "csv": as_csv}.items():
        data = prepare(DataConfig(train=str(path), max_length=64), "causal_lm", tok)
        encoded[name] = (data.format, data.splits["train"]["input_ids"], data.splits["train"]["labels"])
    assert encoded["sharegpt"][0] == "sharegpt" and encoded["messages"][0] == encoded["csv"][0] == "messages"
    assert encoded["sharegpt"][1:] == encoded["messages"][1:] == encoded["csv"][1:]
    assert labelled_text(tok, {"input_ids": encoded["sharegpt"][1][0], "labels": encoded["sharegpt"][2][0]}) == \
        "moo<|im_end|>"


def _parts(*texts: str) -> list[dict]:
    return [{"type": "text", "text": t} for t in texts]


# The same conversation as ``[system, *CHAT]`` with every content a list of text parts (the OpenAI/transformers
# multimodal layout), the user's split in two mid-sentence: joined with nothing in between it is the plain text.
PARTS_CHAT = [{"role": "system", "content": _parts("Be brief.")},
              {"role": "user", "content": _parts("What does the ", "cow say?")},
              {"role": "assistant", "content": _parts("m", "oo")}]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_text_parts_are_their_joined_text_in_every_reader(suffix, tok, tmp_path):
    """Contents given as lists of text parts tokenize exactly as the same conversation written with strings (labels
    included), in each reader; in ShareGPT's ``value`` too."""
    plain = prepare(DataConfig(train=str(write_jsonl(tmp_path / "plain.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, *CHAT]}] * 2)), max_length=64), "causal_lm", tok)
    parts = prepare(DataConfig(train=str(_write(tmp_path / f"parts{suffix}", [{"messages": PARTS_CHAT}] * 2)),
                               max_length=64), "causal_lm", tok)
    sharegpt = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                for m in PARTS_CHAT]
    shared = prepare(DataConfig(train=str(_write(tmp_path / f"s{suffix}", [{"conversations": sharegpt}] * 2)),
                                max_length=64), "causal_lm", tok)
    for data in (parts, shared):
        assert data.splits["train"]["input_ids"] == plain.splits["train"]["input_ids"]
        assert data.splits["train"]["labels"] == plain.splits["train"]["labels"]
    assert tok.decode(parts.splits["train"][0]["input_ids"]).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat does the cow say?<|im_end|>")
    assert labelled_text(tok, parts.splits["train"][0]) == "moo<|im_end|>"


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_an_image_part_is_refused_by_its_type_in_every_reader(suffix, models, tmp_path, capsys):
    """Every row in the parts layout (a parquet column has one type), row 2 with an image beside its text: one line
    naming file, row, column and the part's type, from validate and from train, before anything is written."""
    rows = [{"messages": PARTS_CHAT} for _ in range(3)]
    rows[1] = {"messages": [PARTS_CHAT[0], {"role": "user", "content": [
        {"type": "image", "url": "http://x/cow.png"}, *_parts("What does it say?")]}, PARTS_CHAT[2]]}
    file = _write(tmp_path / f"d{suffix}", rows)
    problem = (f"data.train: {file} row 2, column 'messages' message 2 (user) has a part of type 'image' (part 1): "
               "only text parts are read, as lora-ft trains text models; remove the part or the row")
    recipe = _recipe(tmp_path, models, "llama", {}, file)
    assert main(["validate", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"lora-ft: error: {recipe}: 1 problem(s): {problem}"
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"lora-ft: error: {problem}"
    assert not (tmp_path / "run").exists()


def test_csv_labels_stay_as_written_and_sort_as_numbers(tiny_bert, tmp_path):
    """CSV cells are read as text: numeric labels keep their spelling ("1", not "1.0") and sort as numbers."""
    from transformers import AutoTokenizer

    rows = [{"text": f"t{i}", "label": v} for i, v in enumerate(["2", "10", "1", "2", "10"])]
    cfg = DataConfig(train=str(_write(tmp_path / "c.csv", rows)), max_length=32)
    data = prepare(cfg, "sequence_classification", AutoTokenizer.from_pretrained(tiny_bert))
    assert data.id2label == {0: "1", 1: "2", 2: "10"}
    assert data.splits["train"]["labels"] == [1, 2, 0, 1, 2]


# ------------------------------------------------------------------------- data that cannot train the task
LABELS_AND_FORMATS = {
    "a single class": (
        "bert", [{"text": f"t{i}", "label": "spam"} for i in range(4)], {},
        "data.train: column 'label' holds a single class ['spam']: a classifier needs examples of at least 2 classes "
        "to learn anything (its accuracy would be 1.0 by construction)"),
    "text with labels under causal_lm": (
        "llama", classification_rows(4, 0), {},
        "data.train: the columns ['text', 'label'] look like classification data ('text' with 'label'), but "
        "model.task is causal_lm, which would train on the text alone and drop the labels: set model.task: "
        "sequence_classification, or data.format: text to train on the text"),
}


@pytest.mark.parametrize("case", list(LABELS_AND_FORMATS))
def test_data_that_cannot_train_the_task_is_refused(case, models, tmp_path, capsys):
    model, rows, data, message = LABELS_AND_FORMATS[case]
    recipe = _recipe(tmp_path, models, model, data, write_jsonl(tmp_path / "d.jsonl", rows))
    assert main(["validate", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"lora-ft: error: {recipe}: 1 problem(s): {message}"
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"lora-ft: error: {message}"
    assert not (tmp_path / "run").exists()
    # Training the text alone is still possible, when asked for by name.
    if model == "llama":
        recipe = _recipe(tmp_path, models, model, {"format": "text"}, tmp_path / "d.jsonl")
        assert main(["validate", str(recipe)]) == 0


def test_the_vectorised_blank_rule_knows_every_character_python_strips():
    spaces = [c for c in map(chr, range(0x110000)) if c.isspace()]
    others = ["\u200b", "\ufeff", "a", "\u00ad", "\x00"]  # zero-width space, BOM, soft hyphen: not white space
    assert pc.match_substring_regex(pa.array(spaces + ["".join(spaces)]), BLANK).to_pylist() == [True] * 30
    assert pc.match_substring_regex(pa.array(others), BLANK).to_pylist() == [False] * 5


MESSAGES = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    None,
    [],
    [{"role": "user", "content": "hi"}, {"role": None, "content": "yo"}],
    [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\u3000\x1c "}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
    [{"role": "assistant", "content": "first"}, {"role": "user", "content": "then"}],
    [{"role": "user", "content": "hi"}, None, {"role": "assistant", "content": "yo"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "yo"}],
    [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}],
]


@pytest.mark.parametrize("layout", ["role", "from"])
def test_the_vectorised_rules_pick_every_row_the_row_by_row_check_refuses(layout):
    """The candidates are a superset of the bad rows (they may not miss one), and the error is the row-by-row one."""
    rename = {"role": "from", "content": "value", "assistant": "gpt", "user": "human"}
    rows = [m if m is None or layout == "role" else
            [x if x is None else {rename[k]: rename.get(v, v) for k, v in x.items()} for x in m] for m in MESSAGES]
    ds = datasets.Dataset.from_dict({"messages": rows * 50})
    picked = candidates(ds.with_format("arrow")["messages"], "conversation")
    refused = [conversation_problem(v) is not None for v in ds["messages"]]
    assert picked is not None and refused.count(True) == 450
    assert all(picked[i] for i, bad in enumerate(refused) if bad)
    where = Where("data.train", "f.jsonl")
    with pytest.raises(DataError) as vectorised:
        check_columns(ds, {"messages": "conversation"}, where)
    with pytest.raises(DataError) as row_by_row:
        check_column(ds["messages"], "conversation", where, "messages")
    assert str(vectorised.value) == str(row_by_row.value) and "(449 more row(s) like it)" in str(vectorised.value)


def test_the_vectorised_number_rule_picks_every_text_cell_that_is_not_a_number():
    # CSV reads a regression column holding one word as text; the text rule alone (blank or list) let 'abc' through
    # to a ValueError in the middle of tokenization.
    cells = ["3.5", " 4 ", "-.5", "1e3", "+2.", "abc", "", "  ", "3,5", "nan", "inf", "1_000", "\u00a03", "0x10",
             "1e", ".", None, "4\n"] * 20
    column = pa.chunked_array([pa.array(cells, pa.string())])
    picked = candidates(column, "number")
    refused = [number_problem(v) is not None for v in cells]
    assert refused.count(True) == 20 * 10
    assert all(picked[i] for i, bad in enumerate(refused) if bad)
    assert not any(picked[i] for i, v in enumerate(cells) if v in ("3.5", " 4 ", "-.5", "1e3", "+2."))
    with pytest.raises(DataError, match=r"row 6, column 'label' is 'abc', not a finite number .199 more row"):
        check_columns(datasets.Dataset.from_dict({"label": cells}), {"label": "number"}, Where("data.train", "f.csv"))
