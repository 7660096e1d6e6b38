"""Preparing task data through the objective: formats, columns, truncation, labels, carved validation."""

import logging

import pytest
from conftest import build_bert_tokenizer, chat_rows, labelled_text, prepare, write_jsonl

from lora_ft.data import cache
from lora_ft.data import prepare as prep
from lora_ft.errors import RecipeError
from lora_ft.memory.launch import answer_tokens_of
from lora_ft.recipe import DataConfig


def test_formats_detected_and_masked(tmp_path, tok):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "What does the owl say?", "completion": "hoot"}])
    alp = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Name the sound", "input": "owl", "output": "hoot"}])
    txt = write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat says meow"}])
    for path, fmt in ((pc, "prompt_completion"), (alp, "alpaca"), (txt, "text")):
        data = prepare(DataConfig(train=str(path)), "causal_lm", tok, 0)
        assert data.format == fmt
        row = data.splits["train"][0]
        if fmt == "text":
            assert row["labels"] == row["input_ids"]
        else:
            assert labelled_text(tok, row) == "hoot<|im_end|>"


def test_missing_columns_list_the_present_ones(tmp_path, tok):
    p = write_jsonl(tmp_path / "x.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(RecipeError, match=r"columns \['question', 'answer'\]"):
        prepare(DataConfig(train=str(p)), "causal_lm", tok, 0)
    with pytest.raises(RecipeError, match=r"column\(s\) \['msgs'\] not found; columns present: \['question', "
                                          r"'answer'\] \(set data.messages_column to the column that holds them\)"):
        prepare(DataConfig(train=str(p), format="messages", messages_column="msgs"), "causal_lm", tok, 0)
    # the setting that names the column, and the present column it most likely means
    with pytest.raises(RecipeError, match=r"\['prompt'\] not found; .* \(set data.prompt_column: prompts\)"):
        prepare(DataConfig(train=str(write_jsonl(tmp_path / "y.jsonl", [{"prompts": "a", "completion": "b"}])),
                           format="prompt_completion"), "causal_lm", tok, 0)


def test_truncation_is_counted_and_answerless_examples_dropped(tmp_path, tok):
    rows = chat_rows(4, 0) + [{"messages": [{"role": "user", "content": "word " * 80},
                                            {"role": "assistant", "content": "ok"}]}]
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    data = prepare(DataConfig(train=str(p), max_length=40), "causal_lm", tok, 0)
    assert data.stats["train"]["truncated"] == 1 and data.stats["train"]["dropped"] == 1
    assert data.stats["train"]["examples"] == 4
    with pytest.raises(RecipeError, match="raise max_length"):
        prepare(DataConfig(train=str(p), max_length=8), "causal_lm", tok, 0)


def test_classification_labels_from_train_and_unseen_labels_rejected(tmp_path):
    btok = build_bert_tokenizer()
    tr = write_jsonl(tmp_path / "tr.jsonl", [{"text": "rain", "label": "weather"}, {"text": "cash", "label": "money"}])
    va = write_jsonl(tmp_path / "va.jsonl", [{"text": "snow", "label": "sport"}])
    data = prepare(DataConfig(train=str(tr)), "sequence_classification", btok, 0)
    assert data.id2label == {0: "money", 1: "weather"}
    assert [r["labels"] for r in data.splits["train"]] == [1, 0]
    with pytest.raises(RecipeError, match=r"label\(s\) \['sport'\] never occur in the training data"):
        prepare(DataConfig(train=str(tr), validation=str(va)), "sequence_classification", btok, 0)


def test_validation_split_is_carved_with_the_seed(tmp_path, tok):
    p = write_jsonl(tmp_path / "t.jsonl", chat_rows(50, 0))
    a = prepare(DataConfig(train=str(p), validation_split=0.2), "causal_lm", tok, 7)
    b = prepare(DataConfig(train=str(p), validation_split=0.2), "causal_lm", tok, 7)
    assert len(a.splits["validation"]) == 10 and len(a.splits["train"]) == 40
    assert a.splits["validation"]["input_ids"] == b.splits["validation"]["input_ids"]


def test_max_eval_examples_auto_spreads_the_cap_over_a_large_split_and_keeps_a_small_one_whole(tmp_path, tok,
                                                                                                 monkeypatch, caplog):
    monkeypatch.setattr(prep, "AUTO_EVAL_EXAMPLES", 4)
    rows = chat_rows(7, 3)
    train, val = write_jsonl(tmp_path / "t.jsonl", chat_rows(6, 1)), write_jsonl(tmp_path / "v.jsonl", rows)
    small = write_jsonl(tmp_path / "s.jsonl", rows[:4])
    cfg = DataConfig(train=str(train), validation=str(val), max_length=64)
    with caplog.at_level(logging.INFO, logger="lora_ft"):
        data = prepare(cfg, "causal_lm", tok)
    assert data.raw["validation"]["messages"] == [rows[i]["messages"] for i in (0, 2, 4, 6)]  # first, evenly, last
    assert len(data.splits["validation"]) == 4 and len(data.splits["train"]) == 6
    assert any("evaluating on 4 of its 7 examples" in r.message for r in caplog.records)
    assert len(prepare(cfg.model_copy(update={"validation": str(small)}), "causal_lm", tok).splits["validation"]) == 4
    assert prepare(cfg.model_copy(update={"max_eval_examples": 2}), "causal_lm", tok).raw["validation"][
        "messages"] == [r["messages"] for r in rows[:2]]
    assert len(prepare(cfg.model_copy(update={"max_eval_examples": None}), "causal_lm", tok).splits["validation"]) == 7


def test_tokenizing_on_two_processes_gives_what_one_process_gives(tmp_path, tok, monkeypatch):
    rows = chat_rows(40, 4) + [{"messages": [{"role": "user", "content": "word " * 80},
                                             {"role": "assistant", "content": "ok"}]}]
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "t.jsonl", rows)), max_length=40)
    monkeypatch.setattr(prep, "ENCODE_BATCH", 8)
    out = {}
    for n in (1, 2):
        monkeypatch.setenv("LORA_FT_DATA_WORKERS", str(n))
        monkeypatch.setenv(cache.ENV, str(tmp_path / f"cache-{n}"))
        out[n] = prepare(cfg, "causal_lm", tok)
    assert len(list((tmp_path / "cache-2").glob("*/encoded_0000[01]_of_00002.arrow"))) == 2  # two workers wrote
    one, two = out[1].splits["train"], out[2].splits["train"]
    assert two["input_ids"] == one["input_ids"] and two["labels"] == one["labels"] and two["idx"] == one["idx"]
    assert out[2].stats == out[1].stats and out[1].stats["train"]["dropped"] == 1


def test_the_longest_answer_stretch_is_read_from_its_column_as_the_labels_say(tmp_path, tok):
    """The planner's ``answer_tokens_of``: from the ``answer_tokens`` column the preparation wrote, equal to counting
    from each example's first label to its end."""
    rows = chat_rows(9, 2) + [{"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "word " * 30}]}]
    data = prepare(DataConfig(train=str(write_jsonl(tmp_path / "t.jsonl", rows)), max_length=64), "causal_lm", tok)
    train = data.splits["train"]
    counted = max(len(r["labels"]) - next(k for k, v in enumerate(r["labels"]) if v != -100) for r in train)
    assert answer_tokens_of(train) == counted == data.stats["train"]["answer_tokens"] > 30
