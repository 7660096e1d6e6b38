"""The data cache: a split is tokenized once per (file content, tokenizer, template, settings), reused otherwise; a
damaged entry is rebuilt with a message, never used; a failed build leaves no entry."""

import logging

import pytest
from conftest import build_bert_tokenizer, build_chat_tokenizer, chat_rows, classification_rows, prepare, write_jsonl

from lora_ft.data import cache
from lora_ft.data import prepare as prep
from lora_ft.errors import DataError
from lora_ft.objectives.causal_lm import CausalLM
from lora_ft.recipe import DataConfig


@pytest.fixture
def tokenizations(monkeypatch):
    """Every split the preparation tokenizes (rather than reads from the cache), by name."""
    seen: list[str] = []
    real = prep._tokenize

    def counting(ds, name, *args, **kwargs):
        seen.append(name)
        return real(ds, name, *args, **kwargs)

    monkeypatch.setattr(prep, "_tokenize", counting)
    return seen


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def chat_file(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", chat_rows(12, 5))


def _tok(template_suffix: str = ""):
    t = build_chat_tokenizer()
    t.pad_token = t.eos_token
    t.chat_template += template_suffix
    return t


def test_an_unchanged_split_is_tokenized_once_and_read_back_equal(chat_file, own_cache, tokenizations):
    cfg = DataConfig(train=str(chat_file), max_length=64)
    first = prepare(cfg, "causal_lm", _tok())
    again = prepare(cfg.model_copy(update={"packing": False, "group_by_length": False}), "causal_lm", _tok())
    assert tokenizations == ["train"]
    assert again.splits["train"]["input_ids"] == first.splits["train"]["input_ids"]
    assert again.splits["train"]["labels"] == first.splits["train"]["labels"]
    assert again.stats == first.stats and first.stats["train"]["examples"] == 12


@pytest.mark.parametrize("change", ["tokenizer", "template", "max_length", "file"])
def test_a_changed_tokenizer_template_max_length_or_file_tokenizes_again(change, chat_file, own_cache,
                                                                          tokenizations):
    cfg = DataConfig(train=str(chat_file), max_length=64)
    prepare(cfg, "causal_lm", _tok())
    tok = _tok()
    if change == "tokenizer":
        tok.add_tokens(["quack"])
    elif change == "template":
        tok.chat_template = _tok("{{ '' }}").chat_template  # renders the same text: only the template differs
    elif change == "max_length":
        cfg = cfg.model_copy(update={"max_length": 63})
    else:  # same size, same name, one letter different
        chat_file.write_text(chat_file.read_text().replace("says", "sAys", 1))
    prepare(cfg, "causal_lm", tok)
    assert tokenizations == ["train", "train"]
    assert len(list(own_cache.glob("*/meta.json"))) == 2


def test_a_damaged_entry_is_rebuilt_with_a_message_not_used(chat_file, own_cache, tokenizations, caplog):
    cfg = DataConfig(train=str(chat_file), max_length=64)
    first = prepare(cfg, "causal_lm", _tok())
    (arrow,) = own_cache.glob("*/*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:-100])  # cut short, as a full disk or another program would
    with caplog.at_level(logging.WARNING, logger="lora_ft"):
        again = prepare(cfg, "causal_lm", _tok())
    assert tokenizations == ["train", "train"]
    assert any("is damaged" in r.message and "preparing the split again" in r.message for r in caplog.records)
    assert again.splits["train"]["input_ids"] == first.splits["train"]["input_ids"]


def test_an_entry_of_another_key_is_not_used(chat_file, own_cache, tokenizations):
    cfg = DataConfig(train=str(chat_file), max_length=64)
    prepare(cfg, "causal_lm", _tok())
    prepare(cfg.model_copy(update={"max_length": 63}), "causal_lm", _tok())
    a, b = sorted(p.parent for p in own_cache.glob("*/meta.json"))
    (a / "meta.json").write_text((b / "meta.json").read_text())  # a folder holding another entry's files
    prepare(cfg, "causal_lm", _tok())
    prepare(cfg.model_copy(update={"max_length": 63}), "causal_lm", _tok())
    assert len(tokenizations) == 3


def test_a_failed_preparation_leaves_no_entry_and_the_next_one_succeeds(chat_file, own_cache, monkeypatch):
    cfg = DataConfig(train=str(chat_file), max_length=64)
    monkeypatch.setattr(prep, "ENCODE_BATCH", 4)  # the kill comes after a batch was written
    calls = []
    original = CausalLM.encode_batch

    def killed_in_the_second_batch(self, rows, fmt):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, rows, fmt)

    monkeypatch.setattr(CausalLM, "encode_batch", killed_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, "causal_lm", _tok())
    assert [p.name for p in own_cache.iterdir()] == ["checked"]  # no entry, no temporary folder left
    monkeypatch.setattr(CausalLM, "encode_batch", original)
    assert prepare(cfg, "causal_lm", _tok()).stats["train"]["examples"] == 12


def test_checked_cells_are_not_checked_again_and_a_bad_file_is_never_marked(tmp_path, own_cache, monkeypatch):
    good = write_jsonl(tmp_path / "good.jsonl", chat_rows(6, 1))
    bad = write_jsonl(tmp_path / "bad.jsonl", chat_rows(3, 1) + [{"messages": None}])
    checks = []
    original = CausalLM.check_rows
    monkeypatch.setattr(CausalLM, "check_rows", lambda self, ds, fmt, where: checks.append(where.source)
                        or original(self, ds, fmt, where))
    for _ in range(2):
        prepare(DataConfig(train=str(good), max_length=64), "causal_lm", _tok())
        with pytest.raises(DataError, match="row 4, column 'messages' is null"):
            prepare(DataConfig(train=str(bad), max_length=64), "causal_lm", _tok())
    assert checks == [str(good), str(bad), str(bad)]


def test_an_entry_another_process_committed_first_is_kept_and_used(chat_file, own_cache, monkeypatch):
    """Every rank of a multi-process run prepares its data: the one that commits second uses the first one's entry."""
    cfg = DataConfig(train=str(chat_file), max_length=64)
    first = prepare(cfg, "causal_lm", _tok())
    (entry,) = [p.parent for p in own_cache.glob("*/meta.json")]
    calls, real = [], cache.load_entry

    def the_first_look_misses(key):  # as it did for every rank: none had committed when they looked
        calls.append(key)
        return None if len(calls) == 1 else real(key)

    monkeypatch.setattr(cache, "load_entry", the_first_look_misses)
    second = prepare(cfg, "causal_lm", _tok())
    assert second.splits["train"]["input_ids"] == first.splits["train"]["input_ids"]
    assert [p.parent for p in own_cache.glob("*/meta.json")] == [entry] and not list(own_cache.glob(".*.tmp"))


def test_a_truncating_tokenizer_reuses_every_split_on_the_next_start(tmp_path, own_cache, tokenizations):
    """A classifier's tokenizer truncates: the call leaves truncation set on the fast tokenizer, which is not a rule
    of how it tokenizes, so the split tokenized after it must still find its entry on the next start."""
    tok = build_bert_tokenizer()  # one tokenizer: a trained WordPiece differs per build
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "train.jsonl", classification_rows(12, 0))),
                     validation=str(write_jsonl(tmp_path / "val.jsonl", classification_rows(6, 1))), max_length=32)
    prepare(cfg, "sequence_classification", tok)
    prepare(cfg, "sequence_classification", tok)
    assert tokenizations == ["train", "validation"]
