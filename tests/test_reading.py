"""Reading splits: every file type gives the same examples, Hub ids get their split, bad files one line."""

import pytest
from conftest import build_bert_tokenizer, classification_rows, prepare, write_jsonl

from lora_ft.errors import RecipeError
from lora_ft.recipe import DataConfig


def test_missing_and_unreadable_files(tmp_path, tok):
    with pytest.raises(RecipeError, match="file not found"):
        prepare(DataConfig(train=str(tmp_path / "nope.jsonl")), "causal_lm", tok, 0)
    bad = tmp_path / "bad.txt"
    bad.write_text("hello")
    with pytest.raises(RecipeError, match="cannot read '.txt' files"):
        prepare(DataConfig(train=str(bad)), "causal_lm", tok, 0)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(RecipeError, match="cannot parse"):
        prepare(DataConfig(train=str(broken)), "causal_lm", tok, 0)


# ------------------------------------------------------------------------------------ file types, Hub ids
def test_json_csv_and_parquet_give_the_same_examples_as_jsonl(tmp_path):
    import datasets

    btok = build_bert_tokenizer()
    rows = classification_rows(20, 4)
    ds = datasets.Dataset.from_list(rows)
    files = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows)}
    ds.to_json(files.setdefault("json", tmp_path / "d.json"), lines=False)  # one JSON array, not lines
    ds.to_csv(files.setdefault("csv", tmp_path / "d.csv"), index=False)
    ds.to_parquet(files.setdefault("parquet", tmp_path / "d.parquet"))
    assert (tmp_path / "d.json").read_text().lstrip().startswith("[")
    encoded = {}
    for kind, path in files.items():
        data = prepare(DataConfig(train=str(path)), "sequence_classification", btok, 0)
        encoded[kind] = ({c: data.splits["train"][c] for c in ("input_ids", "labels")}, data.id2label)
    assert encoded["jsonl"][1] == {0: "animals", 1: "money", 2: "weather"}
    assert len(encoded["jsonl"][0]["input_ids"]) == 20
    # Windows tools begin UTF-8 files with a byte-order mark: the same examples (not a parse error, nor a first
    # column named "\ufefftext")
    for kind in ("jsonl", "json", "csv"):
        marked = tmp_path / f"bom.{kind}"
        marked.write_bytes(b"\xef\xbb\xbf" + files[kind].read_bytes())
        data = prepare(DataConfig(train=str(marked)), "sequence_classification", btok, 0)
        encoded[f"bom-{kind}"] = ({c: data.splits["train"][c] for c in ("input_ids", "labels")}, data.id2label)
    for kind in ("json", "csv", "parquet", "bom-jsonl", "bom-json", "bom-csv"):
        assert encoded[kind] == encoded["jsonl"], kind


def test_blank_lines_in_a_file_whose_column_mixes_types_are_named_in_one_line(tmp_path):
    # datasets' fallback reader (labels 1 and "a": mixed types) stops at a blank line with "Expected object or value"
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a cat", "label": "a"}\n\n{"text": "a dog", "label": 3}\n')
    with pytest.raises(RecipeError, match=r"mixed.jsonl as json: line 2 is blank; remove the blank lines") as e:
        prepare(DataConfig(train=str(path)), "sequence_classification", build_bert_tokenizer(), 0)
    assert "\n" not in str(e.value)


def test_hub_dataset_ids_are_loaded_with_the_split_they_stand_for(monkeypatch):
    import datasets

    import lora_ft.data.reading

    calls = []

    def fake_load_dataset(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        return datasets.Dataset.from_list(classification_rows(6, len(calls)))

    monkeypatch.setattr(lora_ft.data.reading.datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(train="someone/topics", validation="someone/topics", test="someone/topics-test")
    data = prepare(cfg, "sequence_classification", build_bert_tokenizer(), 0)
    assert calls == [("someone/topics", (), {"split": "train"}), ("someone/topics", (), {"split": "validation"}),
                     ("someone/topics-test", (), {"split": "test"})]
    assert sorted(data.splits) == ["test", "train", "validation"] and data.stats["validation"]["examples"] == 6
