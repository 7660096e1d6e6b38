"""The classification objective: text pairs get segment ids, right padding; evaluation metrics."""

import pytest
import torch
from conftest import build_bert_tokenizer, prepare, write_jsonl
from sklearn.metrics import f1_score

from lora_ft.objectives.classification import SequenceClassification, pad_right
from lora_ft.recipe import DataConfig


def test_text_pairs_get_segment_ids_and_two_separators(tmp_path):
    btok = build_bert_tokenizer()
    rows = [{"question": "what does the cat say", "answer": "the cat says meow", "label": "yes"},
            {"question": "is the rain big", "answer": "the stock market is small today", "label": "no"}]
    p = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = DataConfig(train=str(p), text_column="question", text_pair_column="answer")
    data = prepare(cfg, "sequence_classification", btok, 0)
    sep = btok.sep_token_id
    for row, raw in zip(data.splits["train"], rows, strict=True):
        ids, types = row["input_ids"], row["token_type_ids"]
        assert ids.count(sep) == 2 and ids[-1] == sep and ids[0] == btok.cls_token_id
        first_sep = ids.index(sep)
        # segment 0: [CLS] question [SEP]; segment 1: answer [SEP]
        assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
        assert btok.decode(ids[1:first_sep]) == raw["question"]
        assert btok.decode(ids[first_sep + 1 : -1]) == raw["answer"]
    batch = pad_right([data.splits["train"][i] for i in range(2)], btok.pad_token_id)
    assert batch["token_type_ids"].shape == batch["input_ids"].shape and (batch["token_type_ids"] == 1).any()
    # a pair longer than max_length is truncated, and counted
    short = prepare(cfg.model_copy(update={"max_length": 8}), "sequence_classification", btok, 0)
    assert short.stats["train"]["truncated"] == 2 and short.stats["train"]["max_tokens"] == 8


def test_summarize_reports_the_loss_and_scikit_learn_s_accuracy_f1_precision_and_recall(tmp_path):
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}])))
    objective = SequenceClassification(cfg, build_bert_tokenizer())
    objective.label2id = {"a": 0, "b": 1, "c": 2, "d": 3}  # "d" never occurs below: it must not count as F1 0
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    got = objective.summarize({"loss": torch.tensor([0.5, 1.0, 0.5, 1.0, 0.5, 1.5]),
                               "prediction": torch.tensor(preds), "label": torch.tensor(labels)})
    assert got == pytest.approx({"loss": 5.0 / 6, "examples": 6, "accuracy": 4 / 6,
                                 "f1_macro": f1_score(labels, preds, average="macro"), "f1_micro": 4 / 6,
                                 "precision_macro": (2 / 3 + 1 / 2 + 1) / 3, "recall_macro": (1 / 2 + 1 + 1 / 2) / 3})


def test_a_packed_training_batch_holds_the_micro_batch_s_examples_unpadded_and_gives_the_padded_loss(
        tmp_path, tiny_bert, bert_lora):
    from conftest import make_recipe

    from lora_ft.training.session import make_train_loader

    btok = build_bert_tokenizer()
    words = "cat dog horse bird fish mouse lion tiger rain snow".split()  # lengths 1-10 words: padding to save
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": " ".join(words[: 1 + i * 7 % 10]), "label": "ab"[i % 2]}
                                                  for i in range(24)])
    cfg = DataConfig(train=str(path))
    data = prepare(cfg, "sequence_classification", btok, 0)
    objective = SequenceClassification(cfg, btok)
    objective.label2id = {"a": 0, "b": 1}
    model = bert_lora[0].eval()  # eval: the same dropout (none) on both layouts
    recipe = make_recipe(tiny_bert, {"train": path}, tmp_path / "run", model={"task": "sequence_classification"},
                         train={"micro_batch_size": 8})
    loader, packing, _ = make_train_loader(data.splits["train"], objective, model, recipe)
    assert packing and len(loader) == 3
    train = data.splits["train"]
    for indices, batch in zip(loader.batch_sampler, loader, strict=True):
        rows = [train[i] for i in indices]
        lengths = [len(r["input_ids"]) for r in rows]
        assert len(indices) == 8 and batch["labels"].shape == (8,) and batch["segments"].max().item() == 7
        assert objective.tokens(batch).item() == sum(lengths) == (batch["segments"] >= 0).sum().item()
        assert batch["input_ids"].numel() < len(rows) * max(lengths)  # rows are shared: fewer than padded
        padded = objective.loss(model, pad_right(rows, btok.pad_token_id))
        torch.testing.assert_close(objective.loss(model, batch), padded, atol=1e-5, rtol=1e-6)
