"""Reward models (objectives/reward.py, ``model.task: reward``): loss and gradients equal to TRL 1.16.0's
RewardTrainer on the same tiny model and pairs (tokenized and collated by TRL), the head (new, trained in full,
never quantized), and whole runs: training, selection by reward accuracy, resume, merge into a folder that
``AutoModelForSequenceClassification`` loads, scoring with ``predict``."""

import json
import tempfile
from dataclasses import replace

import pytest
import torch
from conftest import make_recipe, metrics_rows, resume_losses, write_jsonl
from datasets import Dataset
from test_preference import (
    ROWS,
    TOL,
    grads,
    pref_rows,
    trl_as_compared,  # noqa: F401 - a fixture
)
from transformers import AutoModelForSequenceClassification

from lora_ft.cli import main
from lora_ft.errors import DataError, RecipeError
from lora_ft.modeling.adapters import attach_adapters
from lora_ft.modeling.loading import load_model, load_tokenizer, new_head_modules
from lora_ft.objectives import objective_for
from lora_ft.objectives.reward import RewardModel
from lora_ft.recipe import LoraConfigSection, ModelConfig, Recipe, load_recipe
from lora_ft.run import MERGED, load_adapter_model, load_run_tokenizer, open_run
from lora_ft.shipping.merge import merge_run
from lora_ft.training.trainer import train

MARGINS = [0.5, 0.0, 1.2]


def reward_objective(model_dir) -> RewardModel:
    recipe = Recipe.model_validate({"model": {"name": str(model_dir)}, "objective": {"type": "reward"}})
    return objective_for(recipe, load_tokenizer(str(model_dir), recipe.model))


def reward_policy(model_dir, quant: str = "none"):
    """The tiny Llama with a one-label head and LoRA r=4 whose B is random: built by lora_ft's own loading."""
    torch.manual_seed(0)
    loaded = load_model(ModelConfig(name=str(model_dir), task="reward", quant=quant), "fp32")
    model = attach_adapters(loaded.model, LoraConfigSection(r=4, alpha=8, dropout=0.0), "reward",
                            loaded.head_modules, False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, loaded.head_modules


def rows_with(margins: list[float] | None) -> list[dict]:
    return [dict(r, margin=m) for r, m in zip(ROWS, margins, strict=True)] if margins else ROWS


def trl_rows(rows: list[dict]) -> list[dict]:
    """TRL's conversational layout: lora_ft renders string prompts and answers with the chat template."""
    def messages(value, role):
        return value if isinstance(value, list) else [{"role": role, "content": value}]

    return [{"prompt": messages(r["prompt"], "user"), "chosen": messages(r["chosen"], "assistant"),
             "rejected": messages(r["rejected"], "assistant"), **({"margin": r["margin"]} if "margin" in r else {})}
            for r in rows]


# ------------------------------------------------------------------------------------- TRL equivalence
@pytest.mark.parametrize("margins", [None, MARGINS], ids=["no-margin", "margin"])
def test_reward_loss_and_every_lora_and_head_gradient_equal_trl_reward_trainer(tiny_llama, trl_as_compared,  # noqa: F811
                                                                               margins):
    from trl import RewardConfig, RewardTrainer

    obj = reward_objective(tiny_llama)
    rows = rows_with(margins)
    batch = obj.collate([obj.encode(r, "preference") for r in rows])
    ours, heads = reward_policy(tiny_llama)
    assert heads == ["score"], heads
    loss = (obj.loss(ours, batch) / obj.items(batch)).sum()
    loss.backward()
    theirs_model, _ = reward_policy(tiny_llama)
    args = RewardConfig(output_dir=tempfile.mkdtemp(), bf16=False, use_cpu=True, gradient_checkpointing=False,
                        report_to="none", max_length=None)
    trainer = RewardTrainer(model=theirs_model, args=args, train_dataset=Dataset.from_list(trl_rows(rows)),
                            processing_class=obj.tokenizer)
    examples = list(trainer.train_dataset)
    # The same tokens: the whole conversation as the chat template renders it.
    assert [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples] == [
        ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator(
        [{k: e[k] for k in ("chosen_ids", "rejected_ids", *(["margin"] if margins else []))} for e in examples]))
    theirs.backward()
    ours_g, theirs_g = grads(ours), grads(trainer.model)
    assert sorted(ours_g) == sorted(theirs_g) and len(ours_g) == 2 * 2 * 7 + 1  # LoRA A, B and the score head
    assert any("score" in k for k in ours_g)
    diff = max((ours_g[k] - theirs_g[k]).abs().max().item() for k in ours_g)
    scale = max(g.abs().max().item() for g in ours_g.values())
    assert abs(loss.item() - theirs.item()) < TOL and diff < TOL and scale > 1e-2, (loss.item(), theirs.item(), diff,
                                                                                  scale)


def test_the_comparison_would_catch_flipped_sides_a_dropped_margin_or_a_reward_read_one_token_early(tiny_llama):
    """Each mistake moves the loss far beyond the tolerance above. (Left padding is not one: transformers 5 derives
    Llama's positions from the attention mask, so a left-padded batch scores the same to 1e-6.)"""
    obj = reward_objective(tiny_llama)
    rows = rows_with(MARGINS)
    batch = obj.collate([obj.encode(r, "preference") for r in rows])
    model, _ = reward_policy(tiny_llama)
    n = len(rows)
    with torch.no_grad():
        right = obj.loss(model, batch).item() / n
        flipped = {**batch, **{k: torch.cat([batch[k][n:], batch[k][:n]]) for k in ("input_ids", "attention_mask")}}
        last = batch["attention_mask"].sum(-1) - 1  # the template's newline after the turn end: read at the EOS
        mask = batch["attention_mask"].scatter(1, last[:, None], 0)
        early = {**batch, "attention_mask": mask, "input_ids": batch["input_ids"].masked_fill(mask == 0,
                                                                                          obj.tokenizer.pad_token_id)}
        wrong = {"flipped sides": obj.loss(model, flipped).item() / n,
                 "margin dropped": obj.loss(model, {k: v for k, v in batch.items() if k != "margin"}).item() / n,
                 "read one token early": obj.loss(model, early).item() / n}
    for mistake, value in wrong.items():
        assert abs(value - right) > 100 * TOL, (mistake, value, right)


def test_the_head_is_new_full_precision_and_trained_in_full_under_nf4(tiny_llama):
    from lora_ft.modeling.loading import load_config

    config = load_config(str(tiny_llama), ModelConfig(name=str(tiny_llama)))
    assert new_head_modules(config, "reward", str(tiny_llama))[0] == ["score"], new_head_modules(config, "reward",
                                                                                                str(tiny_llama))
    model, heads = reward_policy(tiny_llama, quant="nf4")
    score = model.base_model.model.score
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "score" in n}
    assert trainable and all("modules_to_save" in n for n in trainable)
    assert score.modules_to_save["default"].weight.dtype == torch.float32
    assert score.modules_to_save["default"].weight.shape == (1, 64)
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"


# ------------------------------------------------------------------------------------------ recipe and data
def test_objective_reward_alone_makes_a_reward_model_and_a_contradicting_task_is_refused(tmp_path):
    (tmp_path / "r.yaml").write_text("objective: {type: reward}\n")
    assert load_recipe(tmp_path / "r.yaml").model.task == "reward"
    (tmp_path / "r.yaml").write_text("model: {task: reward}\n")
    assert load_recipe(tmp_path / "r.yaml").objective.type == "auto"
    for text, needle in [("model: {task: causal_lm}\nobjective: {type: reward}\n", "needs model.task reward"),
                         ("model: {task: reward}\nobjective: {type: dpo}\n", "trains a reward model"),
                         ("objective: {type: reward, beta: 0.2}\n", "do not apply to a reward model")]:
        (tmp_path / "r.yaml").write_text(text)
        with pytest.raises(RecipeError, match=needle):
            load_recipe(tmp_path / "r.yaml")


def test_a_margin_that_is_not_a_number_is_one_line_naming_file_and_row(tiny_llama, tmp_path):
    rows = [dict(r, margin=1.0) for r in pref_rows(4, 1)]
    rows[1]["margin"] = None
    data = {"train": write_jsonl(tmp_path / "train.jsonl", rows)}
    with pytest.raises(DataError, match=r"train.jsonl.* row 2.*margin.* is None: a margin is a number"):
        train(make_recipe(tiny_llama, data, tmp_path / "run", objective={"type": "reward"}))


# ------------------------------------------------------------------------------------------ whole runs
@pytest.fixture(scope="module")
def reward_run(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("reward-data")
    data = {"train": write_jsonl(d / "train.jsonl", pref_rows(64, 1)),
            "validation": write_jsonl(d / "validation.jsonl", pref_rows(16, 2))}
    out = tmp_path_factory.mktemp("runs") / "reward"
    recipe = make_recipe(tiny_llama, data, out, objective={"type": "reward"},
                         train={"max_steps": 12, "eval_every": 6, "checkpoint_every": 6})
    return recipe, train(recipe), data


def test_reward_run_learns_to_rank_held_out_pairs_and_selects_by_reward_accuracy(reward_run):
    recipe, results, _ = reward_run
    before, after = results["before"]["validation"], results["after"]["validation"]
    assert set(after) == {"loss", "examples", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"}
    assert after["reward_accuracy"] >= 0.8 and after["reward_margin"] > 1.0 and after["loss"] < before["loss"] - 0.3
    # The kept adapter is the one of highest validation reward accuracy (not of lowest loss).
    validations = {r["step"]: r for r in metrics_rows(recipe.output_dir)
                   if r.get("split") == "validation" and not r.get("final")}
    best = open_run(recipe.output_dir).info["best_step"]
    assert validations[best]["reward_accuracy"] == max(r["reward_accuracy"] for r in validations.values())
    assert RewardModel.selected_by == ("reward_accuracy", "loss")


def test_reward_resume_reproduces_the_uninterrupted_losses(reward_run, tmp_path):
    recipe, _, _ = reward_run
    full, part = resume_losses(recipe, tmp_path, 6)
    assert sorted(part) == list(range(7, 13))
    assert max(abs(full[s] - part[s]) for s in part) < 1e-6


def test_merged_reward_model_loads_as_sequence_classification_and_scores_as_the_adapter(reward_run):
    recipe, _, _ = reward_run
    entry = merge_run(recipe.output_dir, examples=8)
    assert entry["passed"] and entry["compared"].startswith("Bradley-Terry") and entry["kl_mean"] < 1e-9
    run = open_run(recipe.output_dir)
    tok = load_run_tokenizer(run)
    merged = AutoModelForSequenceClassification.from_pretrained(run.dir / MERGED, num_labels=1).eval()
    adapter = load_adapter_model(run, "cpu", tok)
    obj = reward_objective(recipe.model.name)
    batch = obj.collate([obj.encode(r, "preference") for r in pref_rows(6, 5)])
    with torch.no_grad():
        ours = adapter(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        theirs = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # to fp32 rounding at the logits' scale: W + BA and Wx + B(Ax) round differently (1.2e-5 on a logit of 0.08
    # beside logits of 5 on an AVX-512 Intel Xeon; a wrong merge is off by tenths)
    assert theirs.shape == (12, 1) and ours.std() > 0.1
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5 * ours.abs().max().item())
    assert main(["push", recipe.output_dir, "--repo", "alice/tiny-rm", "--dry-run", "--merged"]) == 0
    card = (run.dir / "hub" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "logits[0, 0])  # the reward" in card
    assert "reward model (Bradley-Terry" in card


def test_predict_scores_a_prompt_and_completion_with_the_reward_model(reward_run, tmp_path, capsys):
    recipe, _, _ = reward_run
    rows = [{"prompt": "What does the cow say?", "completion": "The cow says moo."},
            {"prompt": "What does the cow say?", "completion": "The cow says quack."}]
    path = write_jsonl(tmp_path / "score.jsonl", rows)
    capsys.readouterr()
    assert main(["predict", recipe.output_dir, "--data", str(path), "--out", str(tmp_path / "out.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 2
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [set(r) >= {"prompt", "completion", "reward"} for r in out] == [True, True]
    assert out[0]["reward"] > out[1]["reward"] + 0.5  # the right sound scores higher


def test_reward_model_on_two_processes_matches_one_process(tiny_llama, tmp_path):
    """The same global batches on 2 processes as on 1 (accumulating 2 micro-batches): the same losses and
    evaluations, margins included."""
    from test_distributed import on_two_processes, rows

    margins = [dict(r, margin=0.25 * (i % 3)) for i, r in enumerate(pref_rows(44, 1))]
    data = {"train": write_jsonl(tmp_path / "train.jsonl", margins[:32]),
            "validation": write_jsonl(tmp_path / "validation.jsonl", margins[32:])}
    sections = {"objective": {"type": "reward"},
                "train": {"max_steps": 4, "micro_batch_size": 4, "global_batch_size": 8, "eval_every": 2}}
    train(make_recipe(tiny_llama, data, tmp_path / "p1", **sections))
    recipe = make_recipe(tiny_llama, data, tmp_path / "p2", **sections)
    two, _ = on_two_processes(recipe, tmp_path)
    one = rows(tmp_path / "p1")
    assert [(r["step"], r.get("split")) for r in one] == [(r["step"], r.get("split")) for r in two]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a, b)
        if "reward_accuracy" in a:
            assert (b["reward_accuracy"], b["examples"]) == (a["reward_accuracy"], a["examples"])
            assert b["reward_margin"] == pytest.approx(a["reward_margin"], abs=1e-5)
    assert one[-1]["loss"] < one[0]["loss"]  # it learned


def test_the_planner_counts_both_sides_of_a_pair_and_the_head(tiny_llama):
    from lora_ft.memory.estimate import estimate
    from lora_ft.memory.shape import model_shape, setting_for

    recipe = Recipe.model_validate({"model": {"name": str(tiny_llama)}, "objective": {"type": "reward"}})
    shape, s = model_shape(recipe), setting_for(recipe, "cpu")
    assert shape.task == "reward" and shape.head_params == 64 and s.sequences == 2  # score: hidden 64 → 1
    # 4 pairs are 8 sequences with gradients.
    assert estimate(shape, s, 4, 64).step_peak == estimate(shape, replace(s, sequences=1), 8, 64).step_peak
