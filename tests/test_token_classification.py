"""Token classification: sub-word label alignment, spans as tags, seqeval metrics, a tiny run merged and predicting."""

import json
import random

import pytest
import torch
from conftest import FILLER, TOPICS, build_bert_tokenizer, make_recipe, prepare, write_jsonl
from seqeval.metrics import f1_score, precision_score, recall_score
from transformers import AutoModelForTokenClassification

from lora_ft.cli import main
from lora_ft.errors import DataError
from lora_ft.objectives.padding import IGNORE
from lora_ft.objectives.token_classification import TokenClassification, split_words, tags_from_spans
from lora_ft.recipe import DataConfig
from lora_ft.shipping.merge import merge_run
from lora_ft.shipping.predict_tasks import entities
from lora_ft.training.trainer import train

# Words the tiny tokenizer never saw whole: each splits into several word pieces.
WORDS = ["ada", "the", "babbage", "cat", "london"]
TAGS = ["B-PER", "O", "B-PER", "O", "B-LOC"]


def ner_rows(n: int, seed: int) -> list[dict]:
    """Filler words with animal names tagged B-ANI and two-word weather phrases (``rain storm``) tagged B-WEA I-WEA."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(3, 5)):
            kind = rng.choice(["filler", "filler", "animal", "weather"])
            if kind == "animal":
                tokens.append(rng.choice(TOPICS["animals"]))
                tags.append("B-ANI")
            elif kind == "weather":
                tokens += [rng.choice(["rain", "snow", "wind", "fog", "frost", "sun"]), rng.choice(["storm", "cloud"])]
                tags += ["B-WEA", "I-WEA"]
            else:
                tokens.append(rng.choice(FILLER))
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def _data(tmp_path, rows: list[dict], tok=None, **cfg) -> tuple[DataConfig, object]:
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "train.jsonl", rows)), **cfg)
    return cfg, prepare(cfg, "token_classification", tok or build_bert_tokenizer())


def test_the_first_sub_word_of_each_word_carries_its_tag_and_the_rest_are_ignored(tmp_path):
    tok = build_bert_tokenizer()
    cfg, data = _data(tmp_path, [{"tokens": WORDS, "tags": TAGS}], tok)
    row = data.splits["train"][0]
    ids = {n: i for i, n in data.id2label.items()}
    # Expected by hand: each word tokenized alone gives its pieces; [CLS] and [SEP] carry no label.
    pieces = [tok.tokenize(w) for w in WORDS]
    assert [len(p) > 1 for p in pieces] == [True, False, True, False, True]  # names of several sub-words
    expected = [IGNORE] + [x for p, t in zip(pieces, TAGS, strict=True)
                           for x in [ids[t]] + [IGNORE] * (len(p) - 1)] + [IGNORE]
    assert row["labels"] == expected
    assert tok.convert_ids_to_tokens(row["input_ids"]) == ["[CLS]", *[x for p in pieces for x in p], "[SEP]"]
    assert data.id2label == {0: "O", 1: "B-LOC", 2: "B-PER"}


def test_label_all_tokens_tags_the_rest_of_a_b_word_as_its_i_tag(tmp_path):
    tok = build_bert_tokenizer()
    words, tags = ["ada", "babbage"], ["B-PER", "I-PER"]
    _, data = _data(tmp_path, [{"tokens": words, "tags": tags}], tok, label_all_tokens=True)
    ids = {n: i for i, n in data.id2label.items()}
    first, second = (len(tok.tokenize(w)) for w in words)
    assert data.splits["train"][0]["labels"] == [IGNORE] + [ids["B-PER"]] + [ids["I-PER"]] * (first - 1) \
        + [ids["I-PER"]] * second + [IGNORE]


def test_character_spans_become_iob2_tags_of_the_words_they_cover():
    text = "Ada Lovelace met Babbage in London, 1833."
    words, offsets = split_words(text)
    assert words == ["Ada", "Lovelace", "met", "Babbage", "in", "London", ",", "1833", "."]
    spans = [{"start": 0, "end": 12, "label": "PER"}, {"start": 17, "end": 24, "label": "PER"},
             {"start": 28, "end": 34, "label": "LOC"}]
    assert tags_from_spans(offsets, spans) == ["B-PER", "I-PER", "O", "B-PER", "O", "B-LOC", "O", "O", "O"]


def test_a_row_with_fewer_tags_than_words_is_one_line_naming_its_row(tmp_path):
    rows = [{"tokens": WORDS, "tags": TAGS}, {"tokens": WORDS, "tags": TAGS[:-1]}]
    with pytest.raises(DataError, match=r"train.jsonl row 2, column 'tags' holds 4 tag\(s\) for 5 word\(s\)"):
        _data(tmp_path, rows)


def test_summarize_reports_seqeval_s_entity_scores_and_the_word_accuracy(tmp_path):
    cfg, _ = _data(tmp_path, [{"tokens": WORDS, "tags": TAGS}])
    objective = TokenClassification(cfg, build_bert_tokenizer())
    objective.label2id = {"O": 0, "B-PER": 1, "I-PER": 2, "B-LOC": 3}
    truth = [[1, 2, 0, 3], [0, 1, 0]]
    predicted = [[1, 0, 0, 3], [0, 2, 3]]  # row 2 opens its PER with I-: seqeval's default mode reads an entity
    pad = [[IGNORE] * 2, [IGNORE] * 3]  # positions that are no word's first sub-word
    values = {"loss": torch.tensor([2.0, 1.0]), "tokens": torch.tensor([4, 3]),
              "prediction": torch.tensor([p + q for p, q in zip(predicted, pad, strict=True)]),
              "label": torch.tensor([t + q for t, q in zip(truth, pad, strict=True)])}
    names = {i: n for n, i in objective.label2id.items()}
    t = [[names[i] for i in s] for s in truth]
    p = [[names[i] for i in s] for s in predicted]
    assert objective.summarize(values) == pytest.approx({
        "loss": 3.0 / 7, "examples": 2, "precision": precision_score(t, p), "recall": recall_score(t, p),
        "f1": f1_score(t, p), "token_accuracy": 4 / 7})
    # Entity level by hand: 3 true entities, 4 predicted (row 1's PER cut short, row 2 gains a LOC), 2 right.
    # (Strict IOB2 would drop row 2's I-PER and score 1 of 3.)
    assert (precision_score(t, p), recall_score(t, p), f1_score(t, p)) == pytest.approx((2 / 4, 2 / 3, 4 / 7))


@pytest.fixture(scope="module")
def ner_run(tiny_bert, tmp_path_factory):
    d = tmp_path_factory.mktemp("ner-data")
    splits = {"train": write_jsonl(d / "train.jsonl", ner_rows(160, 1)),
              "validation": write_jsonl(d / "validation.jsonl", ner_rows(40, 2))}
    out = tmp_path_factory.mktemp("runs") / "ner"
    train(make_recipe(tiny_bert, splits, out, model={"task": "token_classification"},
                      train={"max_steps": 100, "lr": 1e-2, "micro_batch_size": 16}))
    return out


def test_a_tiny_tagger_learns_entities_and_its_merge_reloads_as_a_token_classifier(ner_run, tmp_path):
    results = json.loads((ner_run / "eval_results.json").read_text())
    before, after = results["before"]["validation"], results["after"]["validation"]
    assert set(after) >= {"loss", "precision", "recall", "f1", "token_accuracy"}
    assert after["f1"] > before["f1"] + 0.2 and after["token_accuracy"] > before["token_accuracy"]

    entry = merge_run(ner_run, examples=16)
    assert entry["passed"] and entry["compared"] == "per-token label distributions" and entry["kl_mean"] < 1e-6
    model = AutoModelForTokenClassification.from_pretrained(ner_run / "merged")
    assert sorted(model.config.id2label.values()) == ["B-ANI", "B-WEA", "I-WEA", "O"]

    text = "the cat was near a rain storm today"
    data = write_jsonl(tmp_path / "new.jsonl", [{"text": text}, {"tokens": ["a", "dog", "and", "fog", "cloud"]}])
    predicted = []
    for merged in ([], ["--merged"]):
        out = tmp_path / f"pred{len(merged)}.jsonl"
        assert main(["predict", str(ner_run), "--data", str(data), "--out", str(out), *merged]) == 0
        predicted.append([json.loads(x) for x in out.read_text().splitlines()])
    assert predicted[0] == predicted[1]  # the adapter and the merged model tag alike
    first, second = predicted[0]
    assert first["words"] == text.split() and second["words"] == ["a", "dog", "and", "fog", "cloud"]
    assert len(first["tags"]) == len(first["words"]) and set(first["tags"]) <= {"O", "B-ANI", "B-WEA", "I-WEA"}
    # the entities are the tags' spans, with the text's character offsets
    assert first["entities"] == entities(first["words"], first["tags"], split_words(text)[1], text)
    assert all(text[e["start"]:e["end"]] == e["text"] for e in first["entities"])


def test_entities_are_read_from_iob2_tags_with_their_character_offsets():
    text = "Ada Lovelace met Babbage in London."
    words, offsets = split_words(text)
    tags = ["B-PER", "I-PER", "O", "I-PER", "O", "B-LOC", "O"]  # a stray I- starts an entity (seqeval's reading)
    assert entities(words, tags, offsets, text) == [
        {"label": "PER", "first_word": 0, "last_word": 1, "start": 0, "end": 12, "text": "Ada Lovelace"},
        {"label": "PER", "first_word": 3, "last_word": 3, "start": 17, "end": 24, "text": "Babbage"},
        {"label": "LOC", "first_word": 5, "last_word": 5, "start": 28, "end": 34, "text": "London"}]
    assert entities(words, ["B-PER", "B-PER", "O", "O", "O", "O", "O"], None, None) == [
        {"label": "PER", "first_word": 0, "last_word": 0, "text": "Ada"},
        {"label": "PER", "first_word": 1, "last_word": 1, "text": "Lovelace"}]


def test_validation_is_tokenized_again_when_the_training_tags_renumber_its_labels(tmp_path, monkeypatch):
    """A tag's id comes from the training split's tag set: a new training tag that sorts first renumbers the
    unchanged validation file's labels, so its cached tokenization must not be reused (the tag set is in the key)."""
    from lora_ft.data import cache
    from lora_ft.data import prepare as prep

    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    seen, real = [], prep._tokenize
    monkeypatch.setattr(prep, "_tokenize", lambda ds, name, *a, **k: seen.append(name) or real(ds, name, *a, **k))
    val = write_jsonl(tmp_path / "val.jsonl", ner_rows(6, 1))
    train, tok = ner_rows(12, 0), build_bert_tokenizer()  # one tokenizer: a trained WordPiece differs per build
    labels = []
    for extra in ([], [{"tokens": ["aardvark"], "tags": ["B-AAA"]}]):
        cfg = DataConfig(train=str(write_jsonl(tmp_path / "train.jsonl", train + extra)), validation=str(val))
        data = prepare(cfg, "token_classification", tok)
        labels.append((data.id2label, data.splits["validation"]["labels"]))
    assert seen == ["train", "validation", "train", "validation"]
    (names_a, ids_a), (names_b, ids_b) = labels
    assert ids_a != ids_b  # renumbered ...
    as_tags = [[[n[i] for i in row if i >= 0] for row in ids] for n, ids in ((names_a, ids_a), (names_b, ids_b))]
    assert as_tags[0] == as_tags[1]  # ... to the same tags
