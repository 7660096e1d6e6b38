"""KTO (objectives/kto.py): loss and LoRA gradients equal to TRL 1.16.0's KTOTrainer on the same tiny model and rows
(tokenized and collated by TRL itself), the KL estimate from mismatched pairs, the reference (the adapter switched
off), and whole runs: training, evaluation, resume, merge."""

import random
import tempfile

import pytest
import torch
from conftest import ANIMALS, make_recipe, resume_losses, write_jsonl
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from test_preference import (
    TOL,
    end_at_turn_end,
    grads,
    objective,
    our_loss,
    policy,
    trl_as_compared,  # noqa: F401 - a fixture
)
from test_preference import lora as lora_config
from transformers import LlamaForCausalLM

from lora_ft.data.chat import IGNORE
from lora_ft.errors import DataError, RecipeError
from lora_ft.objectives.kto import kto_losses
from lora_ft.recipe import Recipe, load_recipe
from lora_ft.shipping.merge import merge_run
from lora_ft.training.trainer import train

ROWS = [  # desirable and undesirable rows of different lengths, string and conversational prompts
    {"prompt": "What does the cow say?", "completion": "The cow says moo.", "label": True},
    {"prompt": [{"role": "user", "content": "Which sound does a dog make?"}],
     "completion": [{"role": "assistant", "content": "meow"}], "label": False},
    {"prompt": "The owl says what?", "completion": "The owl says hoot.", "label": True},
    {"prompt": "What does the duck say?", "completion": "The duck says woof, woof, woof.", "label": False},
]
WEIGHTS = {"beta": 0.3, "desirable_weight": 1.3, "undesirable_weight": 0.7}


def kto_rows(n: int, seed: int) -> list[dict]:
    """The right animal sound (desirable) or another animal's (undesirable), half and half."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        animal = rng.choice(sorted(ANIMALS))
        sound = ANIMALS[animal] if i % 2 == 0 else ANIMALS[rng.choice([a for a in sorted(ANIMALS) if a != animal])]
        rows.append({"prompt": f"What does the {animal} say?", "completion": f"The {animal} says {sound}.",
                     "label": i % 2 == 0})
    return rows


@pytest.fixture(scope="module")
def kto_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("kto-data")
    return {"train": write_jsonl(d / "train.jsonl", kto_rows(64, 1)),
            "validation": write_jsonl(d / "validation.jsonl", kto_rows(16, 2))}


def kto_objective(model_dir, **options):
    return objective(model_dir, "kto", **options)


def trl_kto_trainer(model_dir, tok, **options):
    """TRL's KTOTrainer on the tiny model with a LoRA config (reference: the adapter disabled), one batch of ROWS."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(output_dir=tempfile.mkdtemp(), bf16=False, use_cpu=True, gradient_checkpointing=False,
                     report_to="none", max_length=None, per_device_train_batch_size=len(ROWS), **options)
    def messages(value, role):
        return value if isinstance(value, list) else [{"role": role, "content": value}]

    rows = [{"prompt": messages(r["prompt"], "user"), "completion": messages(r["completion"], "assistant"),
             "label": r["label"]} for r in ROWS]
    return KTOTrainer(model=LlamaForCausalLM.from_pretrained(model_dir), args=args,
                      train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=lora_config())


def trl_kto_batch(trainer) -> dict:
    """The ROWS as TRL tokenized them (prompt, completion and its KL completion, rotated by TRL), collated by TRL,
    each completion cut after its turn end (``end_at_turn_end``: TRL also scores the template's newline)."""
    tok = trainer.processing_class
    tail = tok("\n", add_special_tokens=False)["input_ids"]
    examples = []
    for e in trainer.train_dataset:
        cut = {k: e[k][:end_at_turn_end(e[k], 0, tok, tail)] for k in ("completion_ids", "KL_completion_ids")}
        examples.append({"prompt_ids": e["prompt_ids"], **cut, "label": e["label"]})
    assert len(examples) == len(ROWS)
    return trainer.data_collator(examples)


def kl_estimate(obj, model, batch) -> float:
    with torch.no_grad():
        return obj.scores(model, batch)[1].mean().item()


# ------------------------------------------------------------------------------------- TRL equivalence
@pytest.mark.parametrize("seed", [3, 1])
def test_kto_loss_and_lora_gradients_equal_trl_kto_trainer(tiny_llama, trl_as_compared, seed):  # noqa: F811
    """Seed 3 gives a positive KL estimate (it enters the loss), seed 1 a negative one (clamped to 0, as TRL)."""
    obj = kto_objective(tiny_llama, **WEIGHTS)
    batch = obj.collate([obj.encode(r, "unpaired") for r in ROWS])
    ours = policy(tiny_llama, seed=seed)
    kl = kl_estimate(obj, ours, batch)
    assert (kl > 0.05) if seed == 3 else (kl < -0.05), kl
    loss = our_loss(obj, ours, batch)
    loss.backward()
    trainer = trl_kto_trainer(tiny_llama, obj.tokenizer, **WEIGHTS)
    set_peft_model_state_dict(trainer.model, get_peft_model_state_dict(policy(tiny_llama, seed=seed)))
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, trl_kto_batch(trainer))
    theirs.backward()
    assert abs(trainer._metrics["train"]["kl"][-1] - max(kl, 0.0)) < TOL, (trainer._metrics["train"]["kl"], kl)
    ours_g, theirs_g = grads(ours), grads(trainer.model)
    assert sorted(ours_g) == sorted(theirs_g) and len(ours_g) == 2 * 2 * 7
    diff = max((ours_g[k] - theirs_g[k]).abs().max().item() for k in ours_g)
    scale = max(g.abs().max().item() for g in ours_g.values())
    assert abs(loss.item() - theirs.item()) < TOL and diff < TOL and scale > 1e-3, (loss.item(), theirs.item(), diff,
                                                                                  scale)


def test_kl_pairs_join_each_prompt_to_the_previous_rows_completion(tiny_llama):
    obj = kto_objective(tiny_llama)
    encoded = [obj.encode(r, "unpaired") for r in ROWS]
    batch = obj.collate(encoded)
    tok = obj.tokenizer
    for i, row in enumerate(batch["kl_input_ids"]):
        ids = [t for t, m in zip(row.tolist(), batch["kl_attention_mask"][i].tolist(), strict=True) if m]
        other = encoded[i - 1]  # row 0 takes the last row's completion
        assert ids == encoded[i]["prompt_ids"] + other["answer_ids"]
        scored = [t for t, lab in zip(row.tolist(), batch["kl_labels"][i].tolist(), strict=True) if lab != IGNORE]
        assert tok.decode(scored) == tok.decode(other["answer_ids"]) and tok.decode(scored).endswith("<|im_end|>")
    assert batch["desirable"].tolist() == [True, False, True, False]


def test_the_comparison_would_catch_a_flipped_label_an_unweighted_loss_or_a_missing_kl(tiny_llama):
    """Each mistake moves the loss far beyond the tolerance of the TRL comparison above."""
    obj = kto_objective(tiny_llama, **WEIGHTS)
    batch = obj.collate([obj.encode(r, "unpaired") for r in ROWS])
    model = policy(tiny_llama, seed=3)  # a positive KL estimate
    with torch.no_grad():
        right = our_loss(obj, model, batch).item()
        logratio, kl_terms, _ = obj.scores(model, batch)
        kl = kl_terms.mean().clamp(min=0)
        n = len(ROWS)
        wrong = {"flipped labels": our_loss(obj, model, {**batch, "desirable": ~batch["desirable"]}).item(),
                 "weights ignored": kto_losses(logratio, kl, batch["desirable"], obj.beta, (1.0, 1.0)).sum().item() / n,
                 "no KL term": kto_losses(logratio, kl * 0, batch["desirable"], obj.beta, obj.weights).sum().item() / n}
    for mistake, value in wrong.items():
        assert abs(value - right) > 100 * TOL, (mistake, value, right)


def test_reference_is_the_base_model_with_the_adapter_switched_off(tiny_llama):
    """Before any training (lora_B = 0) every log-ratio and the KL estimate are 0 and each row costs its weight × ½;
    with the adapter moved, the reference is still the base model's."""
    obj = kto_objective(tiny_llama, **WEIGHTS)
    batch = obj.collate([obj.encode(r, "unpaired") for r in ROWS])
    torch.manual_seed(0)
    from peft import get_peft_model

    fresh = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_llama), lora_config())
    with torch.no_grad():
        logratio, kl_terms, _ = obj.scores(fresh, batch)
        assert logratio.abs().max().item() == 0 and kl_terms.abs().max().item() == 0
        assert our_loss(obj, fresh, batch).item() == pytest.approx((1.3 * 2 + 0.7 * 2) * 0.5 / 4)
        moved = policy(tiny_llama, seed=1)
        logratio, _, logps = obj.scores(moved, batch)
        from lora_ft.objectives.preference import sequence_logps

        base = sequence_logps(LlamaForCausalLM.from_pretrained(tiny_llama), {k: batch[k] for k in (
            "input_ids", "attention_mask", "position_ids", "labels", "logits_to_keep", "completion")})[0]
    assert torch.allclose(logps - logratio, base, atol=1e-5) and logratio.abs().max() > 0.1


# ------------------------------------------------------------------------------------------ recipe and data
@pytest.mark.parametrize("text,needle", [
    ("objective: {type: kto}\nlora: {init_from: runs/sft}\n", "lora.init_from and lora.init pissa/olora are not"),
    ("objective: {type: dpo, desirable_weight: 2}\n", "apply to kto, not dpo"),
    ("objective: {type: kto}\ndata: {packing: true}\n", "do not apply to objective.type kto"),
    ("objective: {type: kto, undesirable_weight: 0}\n", "undesirable_weight"),
    ("objective: {type: kto}\neval: {generate: true}\n", "KTO rows hold no reference answers"),
])
def test_kto_recipe_rules_name_the_field_and_the_fix(tmp_path, text, needle):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError, match=needle):
        load_recipe(tmp_path / "r.yaml")


def test_a_row_without_a_boolean_label_is_one_line_naming_file_and_row(tiny_llama, tmp_path):
    rows = kto_rows(4, 1)
    rows[2]["label"] = "maybe"
    data = {"train": write_jsonl(tmp_path / "train.jsonl", rows)}
    with pytest.raises(DataError, match=r"train.jsonl row 3: data.label: a KTO label is true .* got 'maybe'"):
        train(make_recipe(tiny_llama, data, tmp_path / "run", objective={"type": "kto"}))


# ------------------------------------------------------------------------------------------ whole runs
@pytest.fixture(scope="module")
def kto_run(tiny_llama, kto_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "kto"
    recipe = make_recipe(tiny_llama, kto_data, out, objective={"type": "kto", "beta": 0.2},
                         train={"max_steps": 12, "eval_every": 6, "checkpoint_every": 6})
    return recipe, train(recipe)


def test_kto_run_raises_the_desirable_rows_reward_over_the_undesirable(kto_run):
    recipe, results = kto_run
    before, after = results["before"]["validation"], results["after"]["validation"]
    assert set(after) == {"loss", "examples", "kl", "reward_chosen", "reward_rejected", "reward_margin",
                          "reward_accuracy", "logp_chosen", "logp_rejected"}
    assert before["loss"] == pytest.approx(0.5) and before["reward_accuracy"] == 0.5 and before["kl"] == 0
    assert after["reward_margin"] > 1.0 and after["reward_accuracy"] >= 0.7 and after["loss"] < 0.4


def test_kto_resume_reproduces_the_uninterrupted_losses(kto_run, tmp_path):
    recipe, _ = kto_run
    full, part = resume_losses(recipe, tmp_path, 6)
    assert sorted(part) == list(range(7, 13))
    assert max(abs(full[s] - part[s]) for s in part) < 1e-6


def test_kto_run_merges_faithfully(kto_run):
    recipe, _ = kto_run
    entry = merge_run(recipe.output_dir, examples=8)
    assert entry["passed"] and entry["compared"] == "next-token distributions on completion tokens"


def test_kto_on_two_processes_matches_one_process_accumulating_the_same_global_batch(tiny_llama, tmp_path):
    """Each micro-batch has its own KL estimate, from its own rows: 2 processes of one micro-batch each give what 1
    process accumulating the same 2 micro-batches gives (losses and evaluations)."""
    from test_distributed import on_two_processes, rows

    data = {"train": write_jsonl(tmp_path / "train.jsonl", kto_rows(32, 1)),
            "validation": write_jsonl(tmp_path / "validation.jsonl", kto_rows(12, 2))}
    sections = {"objective": {"type": "kto", "desirable_weight": 1.5},
                "train": {"max_steps": 4, "micro_batch_size": 4, "global_batch_size": 8, "eval_every": 2}}
    train(make_recipe(tiny_llama, data, tmp_path / "p1", **sections))
    recipe = make_recipe(tiny_llama, data, tmp_path / "p2", **sections)
    two, _ = on_two_processes(recipe, tmp_path)
    one = rows(tmp_path / "p1")
    assert [(r["step"], r.get("split")) for r in one] == [(r["step"], r.get("split")) for r in two]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a, b)
        if "kl" in a:
            assert b["examples"] == a["examples"] and b["kl"] == pytest.approx(a["kl"], abs=1e-5)
            assert b["reward_margin"] == pytest.approx(a["reward_margin"], abs=1e-5)
    assert one[-1]["loss"] < one[0]["loss"]  # it learned


def test_the_planner_counts_one_sequence_per_row_in_the_step_and_the_kl_sequences_at_evaluation(tiny_llama):
    """The KL and reference passes run without gradients before the policy's: the step holds what an SFT step of
    the same rows holds; evaluation scores both sequences of a row, as a DPO evaluation both sides of a pair."""
    from lora_ft.memory.estimate import estimate
    from lora_ft.memory.report import plan_report
    from lora_ft.memory.shape import model_shape, setting_for

    def planned(objective):
        recipe = Recipe.model_validate({"model": {"name": str(tiny_llama)}, "objective": objective,
                                        "data": {"packing": False}})
        return estimate(model_shape(recipe), setting_for(recipe, "cpu"), 4, 64, answer_fraction=0.5)

    kto, sft, dpo = planned({"type": "kto"}), planned({"type": "sft"}), planned({"type": "dpo"})
    assert kto.step_peak == sft.step_peak and kto.eval_peak == dpo.eval_peak > sft.eval_peak
    recipe = Recipe.model_validate({"model": {"name": str(tiny_llama)}, "objective": {"type": "kto"}})
    text = plan_report(recipe, "cpu", 8 * 2**30, seq_len=64, micro_batch=4)
    assert "micro-batch 4 rows (+ 1 mismatched KL sequence each, without gradients) × sequence 64" in text


def test_validate_reads_kto_rows_as_the_objective_does(tiny_llama, tmp_path, capsys):
    """``lora-ft validate`` checks the rows with the recipe's objective (conversational prompts are not text cells
    of a prompt/completion SFT set), and names a bad label."""
    from lora_ft.cli import main

    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "completion": r["completion"],
             "label": r["label"]} for r in kto_rows(6, 1)]
    recipe = make_recipe(tiny_llama, {"train": write_jsonl(tmp_path / "train.jsonl", rows)}, tmp_path / "run",
                         objective={"type": "kto"})
    path = tmp_path / "r.yaml"
    path.write_text(recipe.dump())
    assert main(["validate", str(path)]) == 0
    rows[4]["label"] = "yes"
    write_jsonl(tmp_path / "train.jsonl", rows)
    assert main(["validate", str(path)]) != 0
    assert "train.jsonl row 5: data.label: a KTO label is true (desirable) or false" in capsys.readouterr().err
