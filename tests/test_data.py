"""Data: formats, label masks, classification labels, truncation, batching."""

import pytest
import torch
import torch.nn.functional as F
from conftest import build_bert_tokenizer, build_chat_tokenizer, chat_rows, classification_rows, write_jsonl

from lora_ft.config import DataConfig, RecipeError
from lora_ft.data import IGNORE, Collator, LengthGroupedBatches, encode_chat, prepare_data


@pytest.fixture(scope="module")
def tok():
    t = build_chat_tokenizer()
    t.pad_token = t.eos_token  # the hardest case: pad == eos
    return t


def labelled_text(tok, enc):
    return tok.decode([i for i, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != IGNORE])


def test_loss_only_on_every_assistant_answer_including_eos(tok):
    msgs = [{"role": "user", "content": "What does the cow say?"},
            {"role": "assistant", "content": "The cow says moo."},
            {"role": "user", "content": "And the dog?"},
            {"role": "assistant", "content": "The dog says woof."}]
    enc = encode_chat(tok, msgs, train_on_prompt=False)
    assert labelled_text(tok, enc) == "The cow says moo.<|im_end|>The dog says woof.<|im_end|>"
    # exactly the answer tokens: re-tokenising the answers gives the same count
    n_answer = sum(len(tok(m["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"])
                   for m in msgs if m["role"] == "assistant")
    assert sum(lab != IGNORE for lab in enc["labels"]) == n_answer
    assert tok.eos_token_id in [lab for lab in enc["labels"] if lab != IGNORE]


def test_train_on_prompt_labels_everything(tok):
    enc = encode_chat(tok, chat_rows(1, 0)[0]["messages"], train_on_prompt=True)
    assert enc["labels"] == enc["input_ids"]


def test_chat_without_answer_is_rejected(tok):
    with pytest.raises(RecipeError, match="assistant turn"):
        encode_chat(tok, [{"role": "user", "content": "hi"}], False)


def test_formats_detected_and_masked(tmp_path, tok):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "What does the owl say?", "completion": "hoot"}])
    alp = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Name the sound", "input": "owl", "output": "hoot"}])
    txt = write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat says meow"}])
    for path, fmt in ((pc, "prompt_completion"), (alp, "alpaca"), (txt, "text")):
        data = prepare_data(DataConfig(train=str(path)), "causal_lm", tok, 0)
        assert data.format == fmt
        row = data.splits["train"][0]
        if fmt == "text":
            assert row["labels"] == row["input_ids"]
        else:
            assert labelled_text(tok, row) == "hoot<|im_end|>"


def test_missing_columns_list_the_present_ones(tmp_path, tok):
    p = write_jsonl(tmp_path / "x.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(RecipeError, match=r"columns \['question', 'answer'\]"):
        prepare_data(DataConfig(train=str(p)), "causal_lm", tok, 0)
    with pytest.raises(RecipeError, match=r"column\(s\) \['msgs'\] not found; columns present"):
        prepare_data(DataConfig(train=str(p), format="messages", messages_column="msgs"), "causal_lm", tok, 0)


def test_missing_and_unreadable_files(tmp_path, tok):
    with pytest.raises(RecipeError, match="file not found"):
        prepare_data(DataConfig(train=str(tmp_path / "nope.jsonl")), "causal_lm", tok, 0)
    bad = tmp_path / "bad.txt"
    bad.write_text("hello")
    with pytest.raises(RecipeError, match="cannot read '.txt' files"):
        prepare_data(DataConfig(train=str(bad)), "causal_lm", tok, 0)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(RecipeError, match="cannot parse"):
        prepare_data(DataConfig(train=str(broken)), "causal_lm", tok, 0)


def test_truncation_is_counted_and_answerless_examples_dropped(tmp_path, tok):
    rows = chat_rows(4, 0) + [{"messages": [{"role": "user", "content": "word " * 80},
                                            {"role": "assistant", "content": "ok"}]}]
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    data = prepare_data(DataConfig(train=str(p), max_length=40), "causal_lm", tok, 0)
    assert data.stats["train"]["truncated"] == 1 and data.stats["train"]["dropped"] == 1
    assert data.stats["train"]["examples"] == 4
    with pytest.raises(RecipeError, match="raise max_length"):
        prepare_data(DataConfig(train=str(p), max_length=8), "causal_lm", tok, 0)


def test_classification_labels_from_train_and_unseen_labels_rejected(tmp_path):
    btok = build_bert_tokenizer()
    tr = write_jsonl(tmp_path / "tr.jsonl", [{"text": "rain", "label": "weather"}, {"text": "cash", "label": "money"}])
    va = write_jsonl(tmp_path / "va.jsonl", [{"text": "snow", "label": "sport"}])
    data = prepare_data(DataConfig(train=str(tr)), "sequence_classification", btok, 0)
    assert data.id2label == {0: "money", 1: "weather"}
    assert [r["labels"] for r in data.splits["train"]] == [1, 0]
    with pytest.raises(RecipeError, match=r"label\(s\) \['sport'\] never occur in the training data"):
        prepare_data(DataConfig(train=str(tr), validation=str(va)), "sequence_classification", btok, 0)


def test_validation_split_is_carved_with_the_seed(tmp_path, tok):
    p = write_jsonl(tmp_path / "t.jsonl", chat_rows(50, 0))
    a = prepare_data(DataConfig(train=str(p), validation_split=0.2), "causal_lm", tok, 7)
    b = prepare_data(DataConfig(train=str(p), validation_split=0.2), "causal_lm", tok, 7)
    assert len(a.splits["validation"]) == 10 and len(a.splits["train"]) == 40
    assert a.splits["validation"]["input_ids"] == b.splits["validation"]["input_ids"]


def test_length_grouped_batches_cover_every_example_once_and_reduce_padding():
    lengths = [(i * 37) % 97 + 1 for i in range(400)]
    s = LengthGroupedBatches(lengths, 8, shuffle=True, seed=3)
    batches = s.batches()
    assert sorted(i for b in batches for i in b) == list(range(400))
    pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    naive = [list(range(i, i + 8)) for i in range(0, 400, 8)]
    naive_pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in naive)
    assert pad < naive_pad / 4
    s.set_epoch(1)
    assert s.batches() != batches and LengthGroupedBatches(lengths, 8, True, 3).batches() == batches
    for seed in range(6):  # 90 examples, batch 8: the short batch (2 examples) always comes last
        odd = LengthGroupedBatches(lengths[:90], 8, shuffle=True, seed=seed).batches()
        assert [len(b) for b in odd] == [8] * 11 + [2]


def test_collator_left_pads_and_logits_to_keep_gives_the_full_loss(tiny_llama, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    rows = [encode_chat(tok, r["messages"], False) for r in chat_rows(3, 5)]
    rows[0] = encode_chat(tok, [{"role": "user", "content": "hi " * 9}, {"role": "assistant", "content": "x"}], False)
    batch = Collator(tok.pad_token_id, causal=True)(rows)
    assert batch["logits_to_keep"] < batch["input_ids"].shape[1]
    from lora_ft.evaluation import causal_loss

    loss, n = causal_loss(model, batch)
    # reference: full logits, standard shift, right here
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"]).logits
    ref_loss = F.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
    assert n == (batch["labels"][:, 1:] != IGNORE).sum()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    # left padding + position ids: a padded row gives the logits of the same row alone
    alone = model(input_ids=torch.tensor([rows[1]["input_ids"]])).logits[0, -1]
    torch.testing.assert_close(ref[1, -1], alone, rtol=1e-4, atol=1e-4)


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
        data = prepare_data(DataConfig(train=str(path)), "sequence_classification", btok, 0)
        encoded[kind] = ({c: data.splits["train"][c] for c in ("input_ids", "labels")}, data.id2label)
    assert encoded["jsonl"][1] == {0: "animals", 1: "money", 2: "weather"}
    assert len(encoded["jsonl"][0]["input_ids"]) == 20
    for kind in ("json", "csv", "parquet"):
        assert encoded[kind] == encoded["jsonl"], kind


def test_hub_dataset_ids_are_loaded_with_the_split_they_stand_for(monkeypatch):
    import datasets

    import lora_ft.data

    calls = []

    def fake_load_dataset(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        return datasets.Dataset.from_list(classification_rows(6, len(calls)))

    monkeypatch.setattr(lora_ft.data.datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(train="someone/topics", validation="someone/topics", test="someone/topics-test")
    data = prepare_data(cfg, "sequence_classification", build_bert_tokenizer(), 0)
    assert calls == [("someone/topics", (), {"split": "train"}), ("someone/topics", (), {"split": "validation"}),
                     ("someone/topics-test", (), {"split": "test"})]
    assert sorted(data.splits) == ["test", "train", "validation"] and data.stats["validation"]["examples"] == 6


def test_text_pairs_get_segment_ids_and_two_separators(tmp_path):
    btok = build_bert_tokenizer()
    rows = [{"question": "what does the cat say", "answer": "the cat says meow", "label": "yes"},
            {"question": "is the rain big", "answer": "the stock market is small today", "label": "no"}]
    p = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = DataConfig(train=str(p), text_column="question", text_pair_column="answer")
    data = prepare_data(cfg, "sequence_classification", btok, 0)
    sep = btok.sep_token_id
    for row, raw in zip(data.splits["train"], rows, strict=True):
        ids, types = row["input_ids"], row["token_type_ids"]
        assert ids.count(sep) == 2 and ids[-1] == sep and ids[0] == btok.cls_token_id
        first_sep = ids.index(sep)
        # segment 0: [CLS] question [SEP]; segment 1: answer [SEP]
        assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
        assert btok.decode(ids[1:first_sep]) == raw["question"]
        assert btok.decode(ids[first_sep + 1 : -1]) == raw["answer"]
    batch = Collator(btok.pad_token_id, causal=False)([data.splits["train"][i] for i in range(2)])
    assert batch["token_type_ids"].shape == batch["input_ids"].shape and (batch["token_type_ids"] == 1).any()
    # a pair longer than max_length is truncated, and counted
    short = prepare_data(cfg.model_copy(update={"max_length": 8}), "sequence_classification", btok, 0)
    assert short.stats["train"]["truncated"] == 2 and short.stats["train"]["max_tokens"] == 8


# ------------------------------------------------------------------------------- classifier batching
def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    computed = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / computed


def test_auto_groups_classifier_batches_in_small_windows_that_still_mix_labels():
    # The shipped fortunes data (here with the tiny test tokenizer: 12 to 128 tokens), four labels.
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    btok = build_bert_tokenizer()
    data = prepare_data(DataConfig(train=str(root / "data/fortunes/train.jsonl"), max_length=128),
                        "sequence_classification", btok, 0)
    train = data.splits["train"]
    lengths, labels = [len(x) for x in train["input_ids"]], train["labels"]
    assert max(lengths) > 5 * min(lengths)
    window = LengthGroupedBatches.window_for("auto", causal=False)
    assert (window, LengthGroupedBatches.window_for("auto", causal=True)) == (4, 64)
    assert LengthGroupedBatches.window_for(False, causal=True) == 0
    assert LengthGroupedBatches.window_for(True, causal=False) == 64
    grouped, shuffled = [], []
    for epoch in range(4):
        for w, out in ((window, grouped), (0, shuffled)):
            sampler = LengthGroupedBatches(lengths, 16, shuffle=True, seed=42, window=w)
            sampler.set_epoch(epoch)
            out += sampler.batches()
    assert sorted(i for b in grouped[: len(sampler)] for i in b) == list(range(len(lengths)))
    assert padding_fraction(lengths, grouped) < padding_fraction(lengths, shuffled) / 2
    assert padding_fraction(lengths, shuffled) > 0.4
    # Batches still mix labels: a full batch holds at least 3 of the 4 labels, as shuffled ones do.
    assert min(len({labels[i] for i in b}) for b in grouped if len(b) == 16) >= 3
