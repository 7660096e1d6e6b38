"""Token augmentation: seeded per example and epoch, training only."""


from conftest import metrics_rows

from lora_ft.data.augment import Augmenter
from lora_ft.recipe import AugmentConfig


def test_augmentation_is_seeded_per_example_and_epoch_and_keeps_specials():
    aug = Augmenter(AugmentConfig(token_dropout=0.3, random_swap=0.3, random_deletion=0.2), seed=1,
                    special_ids={101, 102}, unk_id=100)
    row = {"idx": 7, "input_ids": [101, *range(1, 30), 102], "attention_mask": [1] * 31, "labels": 1}
    a, b = aug(row), aug(dict(row))
    assert a == b and a["input_ids"] != row["input_ids"]
    assert a["input_ids"][0] == 101 and a["input_ids"][-1] == 102 and a["labels"] == 1
    assert len(a["attention_mask"]) == len(a["input_ids"]) < 31
    aug.epoch = 1
    assert aug(row)["input_ids"] != a["input_ids"]
    assert not Augmenter(AugmentConfig(), 0, set(), 0)


def test_augmentation_is_training_only_and_reproducible(tiny_bert, cls_data, tmp_path):
    from conftest import make_recipe

    from lora_ft.training.trainer import train

    def run(name, **augment):
        recipe = make_recipe(tiny_bert, cls_data, tmp_path / name, model={"task": "sequence_classification"},
                             train={"max_steps": 5, "micro_batch_size": 16}, data={"augment": augment})
        results = train(recipe)
        return results, [r["loss"] for r in metrics_rows(tmp_path / name) if "split" not in r and "loss" in r]

    plain, plain_losses = run("plain")
    aug1, losses1 = run("aug1", token_dropout=0.3, random_swap=0.3)
    aug2, losses2 = run("aug2", token_dropout=0.3, random_swap=0.3)
    assert losses1 == losses2  # seeded
    assert losses1 != plain_losses  # and active in training
    assert aug1["before"] == plain["before"]  # validation and test never augmented
