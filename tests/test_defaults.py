"""The ``auto`` training rules (``recipe/defaults.py``): what each objective gets, the data-size cap, the evaluation
cadence, and the record of where every value came from."""

import pytest
import yaml

from lora_ft.recipe import Recipe, load_recipe
from lora_ft.recipe.defaults import (
    AUTO_EPOCH_EXAMPLES,
    AUTO_EVALUATIONS,
    AUTO_LR,
    AUTO_MAX_EPOCHS,
    AUTO_MIN_STEPS,
    AUTO_PATIENCE,
    AUTO_WARMUP,
    HEAD_LR_FACTOR,
    REFERENCE_BATCH,
    SMALL_SFT_LR,
    DataFacts,
    reference_batch,
    resolve_cadence,
    resolve_training,
    sources,
    sources_comment,
)


def _recipe(task: str = "causal_lm", validation: bool = True, objective: str = "auto", **train) -> Recipe:
    """``micro_batch_size`` as the launch resolves it by default: the objective's reference batch."""
    train.setdefault("micro_batch_size", 16 if task == "sequence_classification" else 4)
    data = {"train": "t.jsonl", **({"validation": "v.jsonl"} if validation else {})}
    if objective != "auto":
        data["format"] = "preference"
    return Recipe.model_validate({"model": {"task": task}, "objective": {"type": objective}, "data": data,
                                  "train": train})


def test_a_minimal_classifier_gets_the_classification_rules():
    resolved, rules = resolve_training(_recipe("sequence_classification"), DataFacts(1_700, 1_700))  # 107 steps/epoch
    tc = resolved.train
    assert (tc.lr, tc.head_lr, tc.warmup, tc.epochs) == (AUTO_LR["classification"], AUTO_LR["classification"],
                                                         AUTO_WARMUP["classification"], 3.0)
    assert tc.early_stopping_patience == AUTO_PATIENCE
    assert reference_batch(resolved) == REFERENCE_BATCH["classification"] == 16
    assert set(rules) == {"train.lr", "train.head_lr", "train.warmup", "train.epochs", "train.early_stopping_patience"}


def test_a_multi_label_head_trains_at_fifty_times_the_rate_and_a_single_label_head_at_the_rate():
    multi, rules = resolve_training(_recipe("sequence_classification"), DataFacts(800, 800, data_format="multilabel"))
    single, _ = resolve_training(_recipe("sequence_classification"), DataFacts(800, 800,
                                                                                data_format="classification"))
    assert HEAD_LR_FACTOR["multilabel"] == 50.0
    assert multi.train.head_lr == pytest.approx(50 * AUTO_LR["classification"]) and multi.train.lr == AUTO_LR[
        "classification"]
    assert single.train.head_lr == single.train.lr == AUTO_LR["classification"]
    assert rules["train.head_lr"] == "lr × 50 (multilabel head)"
    given, _ = resolve_training(_recipe("sequence_classification", head_lr=1e-3), DataFacts(800, 800,
                                                                                             data_format="multilabel"))
    assert given.train.head_lr == 1e-3  # a rate the recipe names is kept


def test_sft_and_preference_get_their_own_rates_and_epochs():
    sft, _ = resolve_training(_recipe(), DataFacts(500, 500))
    dpo, _ = resolve_training(_recipe(objective="dpo"), DataFacts(500, 500))
    assert (sft.train.lr, sft.train.epochs, sft.train.warmup) == (AUTO_LR["sft"], 3.0, AUTO_WARMUP["sft"])
    assert (dpo.train.lr, dpo.train.epochs) == (AUTO_LR["preference"], 1.0)
    assert reference_batch(sft) == reference_batch(dpo) == 4


@pytest.mark.parametrize("examples, processes, epochs", [(660, 1, 8.0), (660, 2, 10.0), (223, 1, AUTO_MAX_EPOCHS),
                                                         (1_700, 1, 3.0)])
def test_a_classifier_whose_batch_the_recipe_gives_gets_its_minimum_steps_from_more_epochs_up_to_the_cap(
        examples, processes, epochs):
    resolved, rules = resolve_training(_recipe("sequence_classification"), DataFacts(examples, examples, processes))
    assert resolved.train.epochs == epochs
    steps_per_epoch = examples // (16 * processes)
    assert steps_per_epoch * epochs >= AUTO_MIN_STEPS["classification"] or epochs == AUTO_MAX_EPOCHS
    assert ("raised to" in rules["train.epochs"]) == (epochs > 3)


@pytest.mark.parametrize("examples, processes, micro", [(660, 1, 6), (223, 1, 2), (600, 1, 6), (660, 2, 3),
                                                         (1_700, 1, 16)])
def test_a_small_classification_set_gets_its_minimum_steps_from_smaller_batches_in_three_epochs(examples, processes,
                                                                                                 micro):
    """The held-out sets: 660 examples in batches of 16 are 42 steps an epoch; batches of 6 give 110 (330 in three
    epochs); 223 examples need batches of 2. 1,700 examples already give 321 steps at 16 and keep it."""
    resolved, rules = resolve_training(_recipe("sequence_classification"),
                                       DataFacts(examples, examples, processes, batch_auto=True))
    tc = resolved.train
    assert (tc.micro_batch_size, tc.grad_accum, tc.epochs) == (micro, 1, 3.0)
    steps = -(-examples // tc.global_batch(processes)) * tc.epochs
    assert steps >= AUTO_MIN_STEPS["classification"]
    assert ("train.micro_batch_size" in rules) == (micro != 16) and "raised" not in rules["train.epochs"]
    given = _recipe("sequence_classification", micro_batch_size="auto")
    record = sources(given, resolved, rules)
    for key in ("train.micro_batch_size", "train.grad_accum", "train.global_batch_size"):
        assert ("300+ steps" in record[key]["source"]) == (micro != 16), record[key]


def test_a_classification_set_too_small_for_batches_of_one_gets_more_epochs_too():
    resolved, rules = resolve_training(_recipe("sequence_classification"), DataFacts(60, 60, batch_auto=True))
    assert (resolved.train.micro_batch_size, resolved.train.epochs) == (1, 5.0)  # 60 steps an epoch
    assert "raised to" in rules["train.epochs"] and "train.micro_batch_size" in rules


@pytest.mark.parametrize("examples, epochs", [(AUTO_EPOCH_EXAMPLES // 3, 3.0), (AUTO_EPOCH_EXAMPLES // 2, 2.0),
                                              (AUTO_EPOCH_EXAMPLES * 4, 1.0)])
def test_auto_epochs_cap_the_examples_seen_on_large_data_but_never_go_below_one(examples, epochs):
    assert resolve_training(_recipe(), DataFacts(examples, examples))[0].train.epochs == epochs


def test_values_the_recipe_gives_are_kept_and_a_given_lr_sets_the_head_rate():
    resolved, rules = resolve_training(_recipe("sequence_classification", lr=1e-3, epochs=5, warmup=0,
                                               early_stopping_patience=None), DataFacts(100, 100))
    assert (resolved.train.lr, resolved.train.head_lr, resolved.train.epochs, resolved.train.warmup) == (1e-3, 1e-3,
                                                                                                          5, 0)
    assert resolved.train.early_stopping_patience is None
    assert set(rules) == {"train.head_lr"}


def test_without_validation_there_is_no_evaluation_cadence_and_no_early_stopping():
    resolved, _ = resolve_training(_recipe(validation=False), DataFacts(100, 100))
    resolved, rules = resolve_cadence(resolved, 300)
    assert resolved.train.eval_every is None and resolved.train.early_stopping_patience is None
    assert rules == {"train.eval_every": "no validation data"}


@pytest.mark.parametrize("steps, every", [(300, 75), (301, 76), (3, 1)])
def test_with_validation_the_run_is_evaluated_auto_evaluations_times(steps, every):
    resolved, _ = resolve_cadence(_recipe(), steps)
    assert resolved.train.eval_every == every
    assert len(range(every, steps + 1, every)) in (AUTO_EVALUATIONS - 1, AUTO_EVALUATIONS, steps)


def test_sources_tell_recipe_values_from_defaults_and_rules(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {task: sequence_classification}\ndata: {train: t.jsonl, validation: v.jsonl}\n"
                    "train: {epochs: 2}\n")
    given = load_recipe(path, ["train.lr=1e-3"])
    launched = given.model_copy(update={"train": given.train.model_copy(update={"micro_batch_size": 16})})  # planner
    resolved, rules = resolve_training(launched, DataFacts(100, 100))
    resolved, cadence = resolve_cadence(resolved, 40)
    record = sources(given, resolved, {**rules, **cadence})
    assert record["train.epochs"] == {"value": 2.0, "source": "recipe"}
    assert record["train.lr"] == {"value": 1e-3, "source": "recipe"}
    assert record["train.schedule"] == {"value": "cosine", "source": "default"}
    assert record["train.warmup"]["source"] == "auto: classification"
    assert record["train.eval_every"] == {"value": 10, "source": f"auto: {AUTO_EVALUATIONS} evaluations over 40 steps"}
    assert record["train.micro_batch_size"]["source"].startswith("auto: the memory planner")
    comment = sources_comment(record)
    assert all(line.startswith("#") for line in comment.splitlines())
    assert yaml.safe_load(resolved.dump() + comment) == yaml.safe_load(resolved.dump())  # comments only


@pytest.mark.parametrize("rows, micro, expected", [(32, 4, (1, 1)), (80, 4, (2, 1)), (200, 4, (4, 1)), (80, 1, (1, 2))])
def test_a_small_sft_set_gets_its_minimum_steps_from_smaller_packed_batches_not_more_epochs(rows, micro, expected):
    """32 rows × 3 epochs in batches of 4 are 24 steps: batches of 1 row give 96; 80 rows: batches of 2, 120 steps;
    200 rows already give 150. A planner's micro-batch of 1 keeps the batch by accumulating instead."""
    recipe = _recipe(micro_batch_size=micro, grad_accum=4 // micro)
    resolved, rules = resolve_training(recipe, DataFacts(rows * 5, rows, batch_auto=True, packed_rows=True))
    tc = resolved.train
    assert (tc.micro_batch_size, tc.grad_accum) == (expected[0], expected[1] if rows != 200 else 4 // micro)
    assert tc.epochs == 3.0 and tc.global_batch_size in (None, tc.micro_batch_size * tc.grad_accum)
    steps = -(-rows // tc.global_batch(1)) * tc.epochs
    assert steps >= AUTO_MIN_STEPS["sft"] - 6 and ("train.micro_batch_size" in rules) == (rows != 200)


def test_a_batch_the_recipe_gives_is_never_lowered():
    resolved, rules = resolve_training(_recipe(micro_batch_size=4), DataFacts(100, 10, batch_auto=False))
    assert resolved.train.micro_batch_size == 4 and "train.micro_batch_size" not in rules


@pytest.mark.parametrize("parameters, lr", [(135_000_000, SMALL_SFT_LR), (7_000_000_000, AUTO_LR["sft"]),
                                            (0, AUTO_LR["sft"])])
def test_sft_on_a_small_model_gets_the_small_model_rate_and_larger_or_unknown_ones_the_qlora_rate(parameters, lr):
    resolved, rules = resolve_training(_recipe(), DataFacts(500, 500, parameters=parameters))
    assert resolved.train.lr == lr and ("under" in rules["train.lr"]) == (lr == SMALL_SFT_LR)
    cls, _ = resolve_training(_recipe("sequence_classification"), DataFacts(500, 500, parameters=parameters))
    assert cls.train.lr == AUTO_LR["classification"]  # the size rule is SFT's only


def test_the_compute_dtype_auto_chose_is_recorded_with_its_reason_and_other_model_keys_are_not():
    given = _recipe()
    resolved = given.model_copy(update={"model": given.model.model_copy(update={"compute_dtype": "bf16"})})
    reason = "CPU with avx512_bf16, bf16 GEMM 2.10× fp32 (≥ 1.3× needed)"
    record = sources(given, resolved, {"model.compute_dtype": reason})
    assert record["model.compute_dtype"] == {"value": "bf16", "source": f"auto: {reason}"}
    assert not [k for k in record if k.startswith("model.") and k != "model.compute_dtype"]
    assert "model.compute_dtype" not in sources(given, given, {})  # no rule ran: nothing to record


@pytest.mark.parametrize("examples, rows, micro, factor", [
    (240, 30, 1, 2 ** 0.5),  # whatis: 8 examples a row, one row a step: κ = 2
    (240, 36, 1, (240 / 36 / 4) ** 0.5),  # man-options: 6.7 a row
    (100, 100, 1, 1.0),  # one example a row: a step carries fewer than 4 examples, the rate is not lowered
    (8_000, 250, 4, 2 ** 0.5),  # 32 a row, 4 rows a step: κ = 32, capped at 2
])
def test_packed_steps_of_more_examples_than_the_reference_batch_get_the_square_root_rate(examples, rows, micro,
                                                                                        factor):
    """``lr: auto`` × √κ (κ = examples a packed step carries / ``REFERENCE_BATCH``, within [1, 2]); the same data
    unpacked, or a rate the recipe gives, is never scaled."""
    recipe = _recipe(micro_batch_size=micro)
    packed, rules = resolve_training(recipe, DataFacts(examples, rows, packed_rows=True, parameters=135_000_000))
    assert packed.train.lr == pytest.approx(SMALL_SFT_LR * factor, rel=1e-12)
    assert ("packed steps of" in rules["train.lr"]) == (factor > 1)
    unpacked, rules = resolve_training(recipe, DataFacts(examples, examples, parameters=135_000_000))
    assert unpacked.train.lr == SMALL_SFT_LR and "packed" not in rules["train.lr"]
    given, rules = resolve_training(_recipe(micro_batch_size=micro, lr=1e-4), DataFacts(examples, rows,
                                                                                         packed_rows=True))
    assert given.train.lr == 1e-4 and "train.lr" not in rules


def test_the_packed_rate_follows_the_batch_the_step_floor_lowered():
    """32 packed rows of 8 examples, 3 epochs: the floor lowers 4 rows a step to 1, so κ = 8 / 4, not 32 / 4."""
    resolved, rules = resolve_training(_recipe(), DataFacts(256, 32, batch_auto=True, packed_rows=True))
    assert resolved.train.micro_batch_size * resolved.train.grad_accum == 1
    assert resolved.train.lr == pytest.approx(AUTO_LR["sft"] * 2 ** 0.5, rel=1e-12)
    assert rules["train.lr"] == "sft, × 1.41 for packed steps of 8.0 examples (√ of 2.00 × 4)"
    assert "32 packed rows an epoch" in rules["train.micro_batch_size"]
