"""Streaming training data (``data.streaming``): the same batches as the map-style samplers over the same order, an
exact resume from a checkpoint's stream position, distinct batches per process, and one-line refusals."""

from itertools import islice
from pathlib import Path

import pytest
import torch
from conftest import chat_rows, make_recipe, metrics_rows, prepare, resume_losses, write_jsonl

from lora_ft.data import packing, streaming
from lora_ft.data.batching import LengthGroupedBatches, lengths_of
from lora_ft.data.reading import open_stream
from lora_ft.data.streaming import TrainStream
from lora_ft.errors import DataError, RecipeError
from lora_ft.modeling.loading import load_tokenizer
from lora_ft.objectives import CausalLM
from lora_ft.recipe import DataConfig, ModelConfig, load_recipe
from lora_ft.training.checkpoint import STATE_FILE


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return load_tokenizer(str(tiny_llama), ModelConfig(name=str(tiny_llama)))


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    rows = chat_rows(90, 5)
    rows[7]["messages"][1]["content"] = " ".join(["moo"] * 30)  # past max_length: truncated
    rows[40]["messages"][0]["content"] = " ".join(["why"] * 80)  # no answer token left: dropped
    return write_jsonl(tmp_path_factory.mktemp("stream") / "train.jsonl", rows)


@pytest.fixture
def small_windows(monkeypatch):
    """Windows of 16 examples and reads of 10 rows: rows and micro-batches cross windows and reads."""
    monkeypatch.setattr(packing, "PACK_WINDOW", 16)
    monkeypatch.setattr(streaming, "STREAM_BATCH", 10)


def _batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])), k


@pytest.mark.parametrize("mode", ["packed", "unpacked", "unpacked-capped"])
def test_streaming_gives_the_map_style_first_batches_in_the_file_order(mode, tok, chat_file, small_windows):
    cfg = DataConfig(train=str(chat_file), max_length=64)
    objective = CausalLM(cfg, tok)
    train = prepare(cfg, "causal_lm", tok).splits["train"]
    assert len(train) == 89  # one example lost its answer to truncation
    lengths = lengths_of(train)
    if mode == "packed":
        sampler = packing.PackedBatches(lengths, 64, rows=3, in_order=True)
        collate, capacity, batch, cap = lambda rows: objective.collate_packed(rows, capacity=64), 64, 3, None
    else:
        cap = 150 if mode == "unpacked-capped" else None
        sampler = LengthGroupedBatches(lengths, 4, True, max_tokens=cap, in_order=True)
        collate, capacity, batch = objective.collate, None, 4
    reference = [collate([train[i] for i in b]) for b in sampler.batches()]
    stream = TrainStream(open_stream(str(chat_file)), objective, "messages", collate, capacity, batch, cap)
    got = list(stream)
    _batches_equal(got, reference)  # every batch of the epoch, the last short one too
    assert len(stream) == len(reference) > 8
    if mode == "packed":  # rows really are packed: several examples a row, positions restarting
        assert (got[0]["position_ids"] == 0).sum() > got[0]["input_ids"].shape[0]


def test_a_different_window_gives_other_rows(tok, chat_file, small_windows, monkeypatch):
    """The property above can fail: packing boundaries that differ from the map-style packer's show."""
    cfg = DataConfig(train=str(chat_file), max_length=64)
    objective = CausalLM(cfg, tok)
    train = prepare(cfg, "causal_lm", tok).splits["train"]
    ref = packing.PackedBatches(lengths_of(train), 64, rows=3, in_order=True).batches()
    monkeypatch.setattr(packing, "PACK_WINDOW", 20)
    stream = TrainStream(open_stream(str(chat_file)), objective, "messages",
                         lambda rows: [r["idx"] for r in rows], 64, 3)
    idx = train["idx"]
    assert list(stream)[:6] != [[idx[i] for i in b] for b in ref][:6]


@pytest.mark.parametrize("capacity", [64, None])
def test_a_stream_restored_at_its_point_continues_with_the_same_batches(capacity, tok, chat_file, small_windows):
    cfg = DataConfig(train=str(chat_file), max_length=64)
    objective = CausalLM(cfg, tok)

    def make():  # batches as the examples' token ids (idx counts rows of the shuffled stream)
        return TrainStream(open_stream(str(chat_file)), objective, "messages",
                           lambda rows: [tuple(r["input_ids"]) for r in rows], capacity, 3 if capacity else 4,
                           buffer=25, seed=3)

    whole = make()
    whole.set_epoch(1)
    everything = list(whole)
    unshuffled = TrainStream(open_stream(str(chat_file)), objective, "messages",
                             lambda rows: [tuple(r["input_ids"]) for r in rows], capacity, 3 if capacity else 4)
    assert list(unshuffled) != everything
    for k in (1, 4, 7):
        first = make()
        first.set_epoch(1)
        assert list(islice(first, k)) == everything[:k]
        saved = first.state()
        resumed = make()
        resumed.set_epoch(1)
        resumed.restore(saved)
        assert list(resumed.from_position(k)) == everything[k:]
        again = make()  # no point recorded: the epoch's first k micro-batches are made again and skipped
        again.set_epoch(1)
        assert list(again.from_position(k)) == everything[k:]
    other = make()  # another epoch, another order
    assert list(other) != everything


def test_each_process_gets_every_other_batch_and_no_short_round(tok, chat_file, small_windows):
    cfg = DataConfig(train=str(chat_file), max_length=64)
    objective = CausalLM(cfg, tok)

    def ids(rows: int, process: int, processes: int) -> list:
        return list(TrainStream(open_stream(str(chat_file)), objective, "messages",
                                lambda ex: [r["idx"] for r in ex], 64, rows, process=process, processes=processes))

    short_rounds = 0
    for rows in (2, 3, 4):
        one = ids(rows, 0, 1)
        p0, p1 = ids(rows, 0, 2), ids(rows, 1, 2)
        even = len(one) - len(one) % 2  # a last round short of a batch is dropped: both processes end together
        assert p0 == one[0:even:2] and p1 == one[1:even:2] and len(p0) == len(p1) > 3
        short_rounds += len(one) % 2
    assert short_rounds


def test_resume_under_streaming_reproduces_the_uninterrupted_losses(tiny_llama, chat_data, tmp_path, small_windows):
    from lora_ft.training.trainer import train

    # 96 examples pack into about 24 rows, 2 rows a micro-batch: the run crosses an epoch, the resume point is
    # inside a window, the buffer shuffles.
    recipe = make_recipe(tiny_llama, {"train": chat_data["train"]}, tmp_path / "full",
                         data={"streaming": True, "shuffle_buffer": 32},
                         train={"max_steps": 16, "micro_batch_size": 2, "checkpoint_every": 5,
                                "keep_checkpoints": 5})
    train(recipe)
    saved = torch.load(tmp_path / "full" / "checkpoints" / "step-00000005" / STATE_FILE, weights_only=True)
    assert saved["epoch"] == 0 and saved["stream"]["examples"] > 0 and saved["stream"]["batches"] == 5
    full, resumed = resume_losses(recipe, tmp_path, 5)
    assert sorted(resumed) == list(range(6, 17))
    assert resumed == pytest.approx({s: full[s] for s in resumed}, abs=1e-6)
    assert full[16] < full[1] and metrics_rows(tmp_path / "full")[-1]["epoch"] >= 1  # a second epoch was read


def _problems(tmp_path: Path, text: str) -> str:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_streaming_refuses_what_needs_the_whole_split_in_one_line(tmp_path):
    msg = _problems(tmp_path, "data: {train: t.jsonl, streaming: true, validation_split: 0.1, group_by_length: true}\n")
    assert "train.max_steps is needed" in msg and "data.validation_split" in msg and "data.group_by_length" in msg
    msg = _problems(tmp_path, "model: {task: sequence_classification}\ndata: {train: t.jsonl, streaming: true}\n"
                              "train: {max_steps: 5}\n")
    assert "data.streaming true: objective.type auto on model.task sequence_classification" in msg
    assert "set data.streaming: false" in msg
    assert "data.shuffle_buffer" in _problems(tmp_path, "data: {shuffle_buffer: -1}\n")
    (tmp_path / "t.yaml").write_text("data: {shuffle_buffer: 5}\n")
    assert "data.shuffle_buffer orders a stream" in load_recipe(tmp_path / "t.yaml").inert_settings()[1][0]


def test_a_bad_row_deep_in_a_stream_names_its_row(tok, tmp_path, small_windows):
    rows = chat_rows(30, 1)
    rows[23]["messages"][1]["role"] = "robot"
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    objective = CausalLM(DataConfig(train=str(path)), tok)
    stream = TrainStream(open_stream(str(path)), objective, "messages", objective.collate, None, 4, source=str(path))
    with pytest.raises(DataError, match=r"data.train: .*bad.jsonl row 24 of the stream, column 'messages'.*robot"):
        list(stream)


def test_validate_and_inspect_read_a_bounded_prefix_of_a_stream(tiny_llama, tmp_path, monkeypatch):
    from lora_ft.inspection import format_report, inspect_recipe
    from lora_ft.preflight import preflight

    monkeypatch.setattr(streaming, "PREFIX_EXAMPLES", 12)
    rows = chat_rows(30, 1)
    rows[23]["messages"][1]["role"] = "robot"  # past the prefix: training finds it, validate does not read it
    recipe = make_recipe(tiny_llama, {"train": write_jsonl(tmp_path / "t.jsonl", rows)}, tmp_path / "run",
                         data={"streaming": True})
    problems, notes = preflight(recipe)
    assert not problems and "data.train: data.streaming: checked the first 12 rows only" in " ".join(notes)
    report = inspect_recipe(recipe)
    assert report["splits"]["train"]["examples"] == 12 and "the first ones only" in format_report(report)
    rows[3]["messages"][1]["role"] = "robot"
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(
        update={"train": str(write_jsonl(tmp_path / "u.jsonl", rows))})})
    assert "u.jsonl row 4, column 'messages'" in " ".join(preflight(recipe)[0])


@pytest.mark.slow
def test_two_processes_train_on_the_batches_one_process_accumulates(tiny_llama, chat_data, tmp_path):
    """Under a real launch (2 CPU processes, gloo): each process keeps every other micro-batch of the stream, so a
    step of 2 processes × 1 micro-batch sees what 1 process × 2 accumulated micro-batches sees."""
    from test_distributed import on_two_processes

    from lora_ft.training.trainer import train

    sections = {"data": {"streaming": True, "shuffle_buffer": 8, "max_length": 56},
                "train": {"max_steps": 4, "micro_batch_size": 2, "global_batch_size": 4}}
    one = make_recipe(tiny_llama, {"train": chat_data["train"]}, tmp_path / "p1", **sections)
    train(one)
    rows2, _ = on_two_processes(make_recipe(tiny_llama, {"train": chat_data["train"]}, tmp_path / "p2", **sections),
                                tmp_path)
    loss1 = {r["step"]: r["loss"] for r in metrics_rows(tmp_path / "p1") if "split" not in r}
    loss2 = {r["step"]: r["loss"] for r in rows2 if "split" not in r}
    assert sorted(loss1) == sorted(loss2) == [1, 2, 3, 4]
    assert loss2 == pytest.approx(loss1, abs=1e-6)
