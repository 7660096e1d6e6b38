"""Length-grouped batches: every example once, less padding, classifier batches still mixed."""

from conftest import build_bert_tokenizer, prepare

from lora_ft.data.batching import LengthGroupedBatches
from lora_ft.objectives import CausalLM, SequenceClassification
from lora_ft.recipe import DataConfig


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


# ------------------------------------------------------------------------------- classifier batching
def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    computed = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / computed


def test_auto_groups_classifier_batches_in_small_windows_that_still_mix_labels():
    # The shipped fortunes data (here with the tiny test tokenizer: 12 to 128 tokens), four labels.
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    btok = build_bert_tokenizer()
    data = prepare(DataConfig(train=str(root / "data/fortunes/train.jsonl"), max_length=128),
                        "sequence_classification", btok, 0)
    train = data.splits["train"]
    lengths, labels = [len(x) for x in train["input_ids"]], train["labels"]
    assert max(lengths) > 5 * min(lengths)
    window = LengthGroupedBatches.window_for("auto", SequenceClassification.length_window)
    assert (window, LengthGroupedBatches.window_for("auto", CausalLM.length_window)) == (4, 64)
    assert LengthGroupedBatches.window_for(False, CausalLM.length_window) == 0
    assert LengthGroupedBatches.window_for(True, SequenceClassification.length_window) == 64
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


def test_a_token_cap_bounds_every_padded_batch_and_keeps_every_example_once():
    import random

    rng = random.Random(1)
    lengths = [rng.randint(4, 200) for _ in range(500)]
    for shuffle in (True, False):
        sampler = LengthGroupedBatches(lengths, 32, shuffle=shuffle, seed=3, window=8, max_tokens=1024)
        batches = sampler.batches()
        assert sorted(i for b in batches for i in b) == list(range(500))
        assert all(len(b) * max(lengths[i] for i in b) <= 1024 and len(b) <= 32 for b in batches)
        assert any(len(b) == 32 for b in batches) and any(len(b) < 8 for b in batches)  # short fill up, long don't
        assert sampler.batch_size is None and len(sampler) == len(batches)  # accelerate: sizes vary
    assert LengthGroupedBatches(lengths, 32, True, 3, 8).batch_size == 32
