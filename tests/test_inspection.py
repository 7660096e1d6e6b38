"""``lora-ft inspect``: duplicates, leakage, truncation, label balance and the rendered loss mask."""

from conftest import make_recipe, write_jsonl

from lora_ft.inspection import format_report, inspect_recipe


def _unique_chat_rows(n: int, offset: int = 0) -> list[dict]:
    """``n`` conversations no two of which are duplicates or near-duplicates (each asks about its own number)."""
    return [{"messages": [{"role": "user", "content": f"What does animal number {offset + i} say?"},
                          {"role": "assistant", "content": f"Animal {offset + i} says moo."}]} for i in range(n)]


def test_chat_report_finds_duplicates_leakage_and_truncation(tiny_llama, tmp_path):
    """Counted exactly, on data whose only duplicates and leaks are the injected ones: the clean report finds none,
    so every count below comes from an injected row."""
    train, held_out = _unique_chat_rows(20), _unique_chat_rows(3, offset=100)
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    clean = {"train": write_jsonl(tmp_path / "clean-t.jsonl", train),
             "validation": write_jsonl(tmp_path / "clean-v.jsonl", held_out)}
    report = inspect_recipe(make_recipe(tiny_llama, clean, tmp_path / "run", data={"max_length": 64}))
    tr, va = report["splits"]["train"], report["splits"]["validation"]
    counts = (tr["exact_duplicates"], tr["near_duplicates"], tr["truncated_at_max_length"], va["in_train"])
    assert counts == (0, 0, 0, 0)
    assert report["problems"] == []

    dup = {"messages": [dict(m) for m in train[0]["messages"]]}
    dup["messages"][1]["content"] = dup["messages"][1]["content"].upper() + "!"  # near-duplicate of train[0]
    files = {"train": write_jsonl(tmp_path / "t.jsonl", train + [train[1], dup, long]),
             "validation": write_jsonl(tmp_path / "v.jsonl", [train[2], train[3]] + held_out)}
    recipe = make_recipe(tiny_llama, files, tmp_path / "run", data={"max_length": 64})
    report = inspect_recipe(recipe)
    tr, va = report["splits"]["train"], report["splits"]["validation"]
    assert tr["examples"] == 23 and tr["exact_duplicates"] == 1 and tr["near_duplicates"] == 1
    assert tr["truncated_at_max_length"] == 1 and tr["tokens"]["max"] > 200
    assert va["in_train"] == 2
    text = format_report(report)
    assert "2 validation examples also occur in train" in text
    assert "1 train examples are longer than max_length=64" in text
    # the answer and its EOS carry loss, the prompt does not
    assert report["sample"].endswith("[[" + train[0]["messages"][1]["content"] + "<|im_end|>]]\n")
    assert report["sample"].count("[[") == 1


def test_text_parts_are_inspected_as_their_joined_text(tiny_llama, tmp_path):
    """The same conversations with every content a list of text parts report exactly what the strings report: token
    lengths, the rendered sample, and duplicates counted on the joined text (a parts row duplicates a string row)."""
    rows = _unique_chat_rows(6)
    def split(text: str) -> list[dict]:  # "What does ..." as "What " + "does ..."
        head, space, tail = text.partition(" ")
        return [{"type": "text", "text": head + space}, {"type": "text", "text": tail}]

    parts = [{"messages": [{"role": m["role"], "content": split(m["content"])} for m in r["messages"]]} for r in rows]
    plain = inspect_recipe(make_recipe(tiny_llama, {"train": write_jsonl(tmp_path / "p.jsonl", rows + rows[:1])},
                                       tmp_path / "run"))
    joined = inspect_recipe(make_recipe(tiny_llama, {"train": write_jsonl(tmp_path / "s.jsonl", parts + rows[:1])},
                                        tmp_path / "run"))
    assert joined == plain
    assert joined["splits"]["train"]["exact_duplicates"] == 1
    assert joined["sample"].endswith("[[Animal 0 says moo.<|im_end|>]]\n")


def test_classification_report_counts_labels_and_flags_imbalance(tiny_bert, tmp_path):
    rows = [{"text": f"rain {i}", "label": "weather"} for i in range(40)] + [{"text": "cash", "label": "money"}] * 3
    recipe = make_recipe(tiny_bert, {"train": write_jsonl(tmp_path / "c.jsonl", rows)}, tmp_path / "run",
                         model={"task": "sequence_classification"})
    report = inspect_recipe(recipe)
    assert report["splits"]["train"]["labels"] == {"money": 3, "weather": 40}
    assert any("imbalanced" in p for p in report["problems"])
    assert report["splits"]["train"]["exact_duplicates"] == 2
