"""Preference tuning (objectives/preference.py): losses and LoRA gradients equal to TRL 1.16.0's trainers on the same
tiny model and pairs (tokenized and collated by TRL itself), the reference (the base with the adapter off, or the
starting adapter), and whole runs: training, evaluation, resume, SFT → DPO, merge and push."""

import json
import math
import random
import shutil
import tempfile

import pytest
import torch
from conftest import ANIMALS, make_recipe, write_jsonl
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from lora_ft.cli import main
from lora_ft.data.chat import IGNORE
from lora_ft.errors import RecipeError, RunError
from lora_ft.objectives import objective_for
from lora_ft.objectives.preference import reference_logps, sequence_logps
from lora_ft.recipe import Recipe
from lora_ft.run import OBJECTIVE_CACHE, START_ADAPTER, open_run
from lora_ft.shipping.merge import merge_run
from lora_ft.training.evaluation import evaluate_run
from lora_ft.training.trainer import train

TOL = 1e-5  # loss values and every LoRA gradient element, against TRL (observed differences: ~2e-6)
ROWS = [  # pairs of different lengths, string and conversational, so masks and normalisations matter
    {"prompt": "What does the cow say?", "chosen": "The cow says moo.", "rejected": "The cow says woof, woof."},
    {"prompt": [{"role": "user", "content": "Which sound does a dog make?"}],
     "chosen": [{"role": "assistant", "content": "The dog says woof."}],
     "rejected": [{"role": "assistant", "content": "meow"}]},
    {"prompt": "The owl says what?", "chosen": "The owl says hoot.", "rejected": "The owl says quack quack quack."},
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def pref_rows(n: int, seed: int) -> list[dict]:
    """The right animal sound (chosen) against another animal's (rejected)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        animal = rng.choice(sorted(ANIMALS))
        other = rng.choice([a for a in sorted(ANIMALS) if a != animal])
        rows.append({"prompt": f"What does the {animal} say?", "chosen": f"The {animal} says {ANIMALS[animal]}.",
                     "rejected": f"The {animal} says {ANIMALS[other]}."})
    return rows


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref-data")
    return {"train": write_jsonl(d / "train.jsonl", pref_rows(64, 1)),
            "validation": write_jsonl(d / "validation.jsonl", pref_rows(16, 2)),
            "test": write_jsonl(d / "test.jsonl", pref_rows(16, 3))}


def objective(model_dir, kind: str, **options):
    recipe = Recipe.model_validate({"model": {"name": str(model_dir)}, "objective": {"type": kind, **options}})
    from lora_ft.modeling.loading import load_tokenizer

    return objective_for(recipe, load_tokenizer(str(model_dir), recipe.model))


def policy(model_dir, seed: int = 1) -> PeftModel:
    """The tiny Llama with LoRA whose B is random (seeded): the adapter is not a no-op, so policy ≠ reference."""
    torch.manual_seed(0)  # peft draws lora_A from the global generator
    model = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir), lora())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def our_loss(obj, model, batch) -> torch.Tensor:
    """The loss as the trainer forms it: each term's sum over its global count."""
    return (obj.loss(model, batch) / obj.items(batch).clamp(min=1)).sum()


TRL_COMPARED = "1.16.0"
"""The TRL release these comparisons were made against (README: "Equal to TRL 1.16")."""


@pytest.fixture
def trl_as_compared():
    """Skips a TRL comparison, naming both versions, where another TRL is installed: its trainers may tokenize or
    reduce differently, and the README's claim is about this one."""
    import trl

    if trl.__version__ != TRL_COMPARED:
        pytest.skip(f"the losses and gradients were compared against TRL {TRL_COMPARED}, and TRL {trl.__version__} "
                    f"is installed: compare against it, then update TRL_COMPARED and the README's 'Equal to TRL'")


def as_conversation(row: dict) -> dict:
    """A pair in TRL's conversational layout. lora_ft renders a string prompt as one user message and a string answer
    as one assistant message with the chat template (data/preference.py); given strings, TRL would tokenize them
    as plain text, without the template."""
    def messages(value, role):
        return value if isinstance(value, list) else [{"role": role, "content": value}]

    return {"prompt": messages(row["prompt"], "user"), "chosen": messages(row["chosen"], "assistant"),
            "rejected": messages(row["rejected"], "assistant")}


def trl_dataset() -> Dataset:
    return Dataset.from_list([as_conversation(r) for r in ROWS])


def end_at_turn_end(ids: list[int], start: int, tok, tail: list[int]) -> int:
    """Where TRL's tokens of an answer (from ``start``) end if cut after the answer's turn-end token (the EOS).

    lora_ft scores an answer up to and including its turn-end token, the token that stops generation. TRL scores
    the rest of the rendered conversation too: ChatML's newline after ``<|im_end|>``, and the CPO/ORPO trainers
    append one more EOS after that. ``tail`` is exactly what may follow; anything else fails here.
    """
    end = ids.index(tok.eos_token_id, start) + 1
    assert ids[end:] == tail, (tok.decode(ids[:end]), tok.decode(ids[end:]))
    return end


def trl_dpo_batch(trainer) -> dict:
    """The ROWS as TRL's DPOTrainer tokenized them (its own dataset processing, from the raw pairs) and its own
    collator, each answer cut after its turn end (``end_at_turn_end``)."""
    tok, tail = trainer.processing_class, trainer.processing_class("\n", add_special_tokens=False)["input_ids"]
    examples = []
    for e in trainer.train_dataset:
        cut = {k: e[k][:end_at_turn_end(e[k], 0, tok, tail)] for k in ("chosen_ids", "rejected_ids")}
        examples.append({"prompt_ids": e["prompt_ids"], **cut})
    assert len(examples) == len(ROWS)
    return trainer.data_collator(examples)


def trl_pair_batch(trainer) -> dict:
    """The ROWS as TRL's CPO/ORPO trainer tokenized them (``tokenize_row``, from the raw pairs) and its own collator,
    each side cut after its answer's turn end (``end_at_turn_end``)."""
    tok = trainer.processing_class
    tail = tok("\n", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    examples = []
    for e in trainer.train_dataset:
        for side in ("chosen", "rejected"):
            ids = e[f"{side}_input_ids"]
            end = end_at_turn_end(ids, len(e["prompt_input_ids"]), tok, tail)
            e = {**e, **{f"{side}_{k}": e[f"{side}_{k}"][:end] for k in ("input_ids", "attention_mask", "labels")}}
        examples.append(e)
    assert len(examples) == len(ROWS)
    return trainer.data_collator(examples)


def trl_dpo_trainer(model_dir, tok, loss_type: str, beta: float, model=None):
    """TRL's DPOTrainer on the tiny model and the ROWS: with a base model and a LoRA config (reference: the adapter
    disabled), or with ``model`` a PeftModel holding a trained adapter (reference: TRL's frozen copy of it)."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=tempfile.mkdtemp(), beta=beta, loss_type=[loss_type], bf16=False, use_cpu=True,
                     gradient_checkpointing=False, report_to="none", max_length=None)
    if model is None:
        return DPOTrainer(model=LlamaForCausalLM.from_pretrained(model_dir), args=args, train_dataset=trl_dataset(),
                          processing_class=tok, peft_config=lora())
    return DPOTrainer(model=model, args=args, train_dataset=trl_dataset(), processing_class=tok)


def trl_pair_trainer(kind: str, model, tok, **options):
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    config, trainer = (CPOConfig, CPOTrainer) if kind == "simpo" else (ORPOConfig, ORPOTrainer)
    args = config(output_dir=tempfile.mkdtemp(), bf16=False, use_cpu=True, gradient_checkpointing=False,
                  report_to="none", max_length=512, **({"loss_type": "simpo"} if kind == "simpo" else {}), **options)
    return trainer(model=model, args=args, train_dataset=trl_dataset(), processing_class=tok)


def assert_equal_to_trl(ours: float, our_grads: dict, theirs: float, their_grads: dict) -> None:
    assert sorted(our_grads) == sorted(their_grads) and len(our_grads) == 2 * 2 * len(TARGETS)
    diff = max((our_grads[k] - their_grads[k]).abs().max().item() for k in our_grads)
    scale = max(g.abs().max().item() for g in our_grads.values())
    assert abs(ours - theirs) < TOL and diff < TOL and scale > 0.1, (ours, theirs, diff, scale)


# ------------------------------------------------------------------------------------- TRL equivalence
@pytest.mark.parametrize("kind,loss_type,beta", [("dpo", "sigmoid", 0.3), ("ipo", "ipo", 0.3)])
def test_dpo_and_ipo_loss_and_lora_gradients_equal_trl_dpo_trainer(tiny_llama, trl_as_compared, kind, loss_type,
                                                                   beta):
    obj = objective(tiny_llama, kind, beta=beta)
    encoded = [obj.encode(r, "preference") for r in ROWS]
    ours = policy(tiny_llama)
    loss = our_loss(obj, ours, obj.collate(encoded))
    loss.backward()
    trainer = trl_dpo_trainer(tiny_llama, obj.tokenizer, loss_type, beta)
    set_peft_model_state_dict(trainer.model, get_peft_model_state_dict(policy(tiny_llama)))
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, trl_dpo_batch(trainer))
    theirs.backward()
    assert_equal_to_trl(loss.item(), grads(ours), theirs.item(), grads(trainer.model))


@pytest.mark.parametrize("kind,options", [("simpo", {"beta": 2.0, "simpo_gamma": 0.7}),
                                          ("simpo", {"beta": 2.0, "simpo_gamma": 0.7, "cpo_alpha": 0.5}),
                                          ("orpo", {"beta": 0.25})])
def test_simpo_and_orpo_loss_and_lora_gradients_equal_trl_cpo_and_orpo_trainers(tiny_llama, trl_as_compared, kind,
                                                                                 options):
    obj = objective(tiny_llama, kind, **options)
    encoded = [obj.encode(r, "preference") for r in ROWS]
    ours = policy(tiny_llama)
    loss = our_loss(obj, ours, obj.collate(encoded))
    loss.backward()
    # lora_ft's simpo defaults to cpo_alpha 0 (SimPO), TRL's CPOConfig to 1 (CPO-SimPO): told explicitly.
    trl_options = {**options, "cpo_alpha": options.get("cpo_alpha", 0.0)} if kind == "simpo" else options
    trainer = trl_pair_trainer(kind, policy(tiny_llama), obj.tokenizer, **trl_options)
    trainer.model.train()
    theirs, _ = trainer.get_batch_loss_metrics(trainer.model, trl_pair_batch(trainer))
    theirs.backward()
    assert_equal_to_trl(loss.item(), grads(ours), theirs.item(), grads(trainer.model))


@pytest.mark.parametrize("kind", ["dpo", "ipo", "simpo", "orpo"])
def test_the_comparison_would_catch_a_flipped_pair_a_wrong_mask_or_a_wrong_count(tiny_llama, kind):
    """Each mistake moves the loss far beyond the tolerance of the TRL comparisons above."""
    obj = objective(tiny_llama, kind)
    batch = obj.collate([obj.encode(r, "preference") for r in ROWS])
    model = policy(tiny_llama)
    with torch.no_grad():
        right = our_loss(obj, model, batch).item()
        n = len(ROWS)
        flipped = {k: (torch.cat([v[n:], v[:n]]) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        # Every answer's EOS left out of the mask. (A prompt token added to both answers of a pair would cancel
        # in DPO's difference of log-ratios: DPO does not see it, the length-normalised losses do.)
        answer = batch["completion"]
        narrower = answer & torch.roll(answer, -1, dims=1)
        masked = {**batch, "completion": narrower, "labels": batch["labels"].masked_fill(answer & ~narrower, IGNORE)}
        wrong = {"flipped pair": our_loss(obj, model, flipped).item(),
                 "EOS left out of the mask": our_loss(obj, model, masked).item(),
                 "summed instead of averaged over pairs": (obj.loss(model, batch)[0]).item() + 0.0}
    for mistake, value in wrong.items():
        assert abs(value - right) > 100 * TOL, (mistake, value, right)


# --------------------------------------------------------------------------------------- the forward
def test_left_padded_chunked_log_probs_equal_each_sequence_scored_alone_with_full_logits(tiny_llama):
    obj = objective(tiny_llama, "dpo")
    encoded = [obj.encode(r, "preference") for r in ROWS]
    model = policy(tiny_llama).eval()
    with torch.no_grad():
        logps, tokens, _, _ = sequence_logps(model, obj.collate(encoded))
        alone = []
        for ids, labels in [(e["input_ids"], e["labels"]) for e in encoded] + \
                [(e["rejected_input_ids"], e["rejected_labels"]) for e in encoded]:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            target = torch.tensor(labels[1:])
            mask = target != IGNORE
            alone.append(logits[mask].gather(1, target[mask, None]).sum().item())
    assert torch.allclose(logps, torch.tensor(alone), atol=1e-4)
    assert tokens.tolist() == [sum(t != IGNORE for t in e[k]) for k in ("labels", "rejected_labels")
                               for e in encoded]


def test_pairs_are_never_packed_even_where_the_model_packs_supervised_examples(tiny_llama):
    model = policy(tiny_llama)
    assert objective(tiny_llama, "sft").use_packing("auto", model)  # the tiny Llama packs SFT examples
    assert not objective(tiny_llama, "dpo").use_packing("auto", model)


def test_reference_is_the_base_model_with_the_adapter_switched_off(tiny_llama):
    obj = objective(tiny_llama, "dpo")
    batch = obj.collate([obj.encode(r, "preference") for r in ROWS])
    model = policy(tiny_llama).train()
    ref = reference_logps(model, batch)
    with torch.no_grad():
        base = sequence_logps(LlamaForCausalLM.from_pretrained(tiny_llama), batch)[0]
        adapted = sequence_logps(model, batch)[0]
    assert torch.allclose(ref, base, atol=1e-5) and not torch.allclose(ref, adapted, atol=1e-2)
    assert model.training  # the reference pass runs in eval mode and gives the mode back


def test_starting_from_a_trained_adapter_the_reference_is_that_adapter_as_trl_makes_it(tiny_llama, tmp_path,
                                                                                      trl_as_compared):
    """SFT → DPO: TRL keeps a frozen copy of the starting adapter as the reference; lora_ft computes that
    adapter's log-probs before training (precompute). After the policy moves, both give the same loss; the
    base model with the adapter off would not."""
    start = policy(tiny_llama, seed=1)
    start.save_pretrained(tmp_path / "sft")
    obj = objective(tiny_llama, "dpo")
    obj.precompute, obj.reference_is_start = True, True  # as objective_for sets them with lora.init_from
    ds = Dataset.from_list([obj.encode(r, "preference") for r in ROWS])
    from accelerate import Accelerator

    splits = obj.prepare(start, Accelerator(cpu=True), {"train": ds}, batch_size=2)
    moved = get_peft_model_state_dict(policy(tiny_llama, seed=2))  # the policy after some training
    set_peft_model_state_dict(start, moved)
    batch = obj.collate([splits["train"][i] for i in range(len(ROWS))])
    ours = our_loss(obj, start, batch).item()
    trainer = trl_dpo_trainer(tiny_llama, obj.tokenizer, "sigmoid", obj.beta,
                              PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama),
                                                        tmp_path / "sft", is_trainable=True))
    assert "ref" in trainer.model.peft_config  # TRL's frozen copy of the starting adapter
    set_peft_model_state_dict(trainer.model, moved)
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, trl_dpo_batch(trainer)).item()
    assert abs(ours - theirs) < TOL, (ours, theirs)
    obj.reference_is_start = False  # the base model with the adapter off instead
    with torch.no_grad():
        off = our_loss(obj, start, {k: v for k, v in batch.items() if k != "ref_logps"}).item()
    assert abs(off - theirs) > 100 * TOL


def test_precomputed_reference_equals_the_per_batch_one_and_its_cache_is_read_back(tiny_llama, tmp_path):
    from accelerate import Accelerator

    obj = objective(tiny_llama, "dpo", precompute_reference=True)
    ds = Dataset.from_list([obj.encode(r, "preference") for r in ROWS])
    model = policy(tiny_llama)
    cache = tmp_path / OBJECTIVE_CACHE
    splits = obj.prepare(model, Accelerator(cpu=True), {"train": ds}, batch_size=2, cache=cache)
    per_batch = reference_logps(model, obj.collate([ds[i] for i in range(len(ds))]))
    n = len(ROWS)
    assert torch.allclose(torch.tensor(splits["train"]["ref_chosen"]), per_batch[:n], atol=1e-5)
    assert torch.allclose(torch.tensor(splits["train"]["ref_rejected"]), per_batch[n:], atol=1e-5)
    # A resume reads the file (here altered, to tell it from a recomputation) when it matches data and model.
    saved = load_file(cache)
    from safetensors import safe_open

    with safe_open(str(cache), "pt") as f:
        keys = f.metadata()
    save_file({"train": saved["train"] + 1.0}, str(cache), metadata=keys)
    again = obj.prepare(model, Accelerator(cpu=True), {"train": ds}, batch_size=2, cache=cache)
    assert again["train"]["ref_chosen"] == pytest.approx((saved["train"][0] + 1.0).tolist())
    other = policy(tiny_llama, seed=3)  # another starting adapter: the cache does not apply
    fresh = obj.prepare(other, Accelerator(cpu=True), {"train": ds}, batch_size=2, cache=cache)
    assert fresh["train"]["ref_chosen"] == pytest.approx(splits["train"]["ref_chosen"], abs=1e-5)


# ------------------------------------------------------------------------------------------ whole runs
@pytest.fixture(scope="module")
def dpo_run(tiny_llama, pref_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dpo"
    recipe = make_recipe(tiny_llama, pref_data, out, objective={"type": "dpo", "beta": 0.2},
                         train={"max_steps": 16, "eval_every": 8, "checkpoint_every": 8},
                         forgetting={"enabled": True, "max_examples": 8})
    return recipe, train(recipe)


def test_dpo_run_raises_held_out_reward_accuracy_and_reports_every_metric(dpo_run):
    recipe, results = dpo_run
    saved = json.loads(open(f"{recipe.output_dir}/eval_results.json").read())
    assert saved == json.loads(json.dumps(results)) and set(saved["after"]) == {"validation", "test"}
    before, after = saved["before"]["test"], saved["after"]["test"]
    keys = {"loss", "examples", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected",
            "logp_chosen", "logp_rejected"}
    assert set(before) == set(after) == keys
    # Before training the policy is the reference: every reward is 0 and the DPO loss is log 2.
    assert before["loss"] == pytest.approx(math.log(2)) and before["reward_accuracy"] == 0.5
    assert after["reward_accuracy"] >= 0.9 and after["reward_margin"] > 0.5 and after["loss"] < 0.4
    rows = [json.loads(x) for x in open(f"{recipe.output_dir}/metrics.jsonl")]
    assert [r["step"] for r in rows if r.get("split") == "validation" and not r.get("final")] == [0, 8, 16]
    assert all(0 < r["mfu"] < 1 for r in rows if "split" not in r and "loss" in r)  # the policy's labelled positions
    assert all("reward_accuracy" in r for r in rows if r.get("split") == "validation")
    # The forgetting guard: the adapted model against its base on general text, at every evaluation.
    assert [r["step"] for r in rows if r.get("split") == "forgetting" and not r.get("final")] == [0, 8, 16]
    assert saved["forgetting"]["after"]["kl"] > saved["forgetting"]["before"]["kl"] == 0
    # curves.png has three panels of 5.5 inches at 110 dpi: loss, reward accuracy and forgetting.
    from PIL import Image

    assert Image.open(f"{recipe.output_dir}/curves.png").size == (round(3 * 5.5 * 110), 4 * 110)


def test_init_from_that_is_neither_a_run_nor_an_adapter_is_one_line_before_anything_loads(tiny_llama, pref_data,
                                                                                          tmp_path):
    recipe = make_recipe(tiny_llama, pref_data, tmp_path / "x", objective={"type": "dpo"},
                         lora={"init_from": str(tmp_path)})
    with pytest.raises(RunError, match="neither an adapter folder nor a run with a trained adapter"):
        train(recipe)
    assert not (tmp_path / "x").exists()


def test_dpo_resume_reproduces_the_uninterrupted_losses(dpo_run, tmp_path):
    recipe, _ = dpo_run
    (tmp_path / "part" / "checkpoints").mkdir(parents=True)
    shutil.copytree(f"{recipe.output_dir}/checkpoints/step-00000008", tmp_path / "part/checkpoints/step-00000008")
    train(recipe.model_copy(update={"output_dir": str(tmp_path / "part")}), resume="latest")

    def losses(out):
        return {r["step"]: r["loss"] for r in map(json.loads, open(f"{out}/metrics.jsonl")) if "split" not in r}

    full, part = losses(recipe.output_dir), losses(tmp_path / "part")
    assert sorted(part) == list(range(9, 17))
    assert max(abs(full[s] - part[s]) for s in part) < 1e-6


def test_dpo_run_merges_faithfully_and_pushes_a_card_with_its_reward_metrics(dpo_run, capsys):
    recipe, results = dpo_run
    entry = merge_run(recipe.output_dir, examples=8)
    assert entry["passed"] and entry["compared"] == "next-token distributions on chosen answer tokens"
    assert main(["push", recipe.output_dir, "--repo", "alice/tiny-dpo", "--dry-run", "--merged"]) == 0
    card = (open_run(recipe.output_dir).dir / "hub" / "README.md").read_text()
    accuracy = results["after"]["test"]["reward_accuracy"]
    assert "| test | reward_accuracy |" in card and f"{accuracy:.4g}" in card
    capsys.readouterr()
    assert main(["generate", recipe.output_dir, "--prompt", "What does the cow say?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.fixture(scope="module")
def sft_then_dpo(tiny_llama, chat_data, pref_data, tmp_path_factory):
    """An SFT run (r=4), then DPO from its adapter: two recipes, two commands."""
    root = tmp_path_factory.mktemp("sft-dpo")
    train(make_recipe(tiny_llama, chat_data, root / "sft", lora={"r": 4, "alpha": 8},
                      train={"max_steps": 6}))
    dpo = make_recipe(tiny_llama, pref_data, root / "dpo", objective={"type": "dpo"},
                      train={"max_steps": 8, "checkpoint_every": 4}).model_dump()
    dpo["lora"] = {"init_from": str(root / "sft")}  # the shape comes from the adapter
    return root, train(Recipe.model_validate(dpo))


def test_dpo_from_an_sft_run_starts_at_that_adapter_and_scores_against_it(sft_then_dpo):
    root, results = sft_then_dpo
    run = open_run(root / "dpo")
    assert run.recipe.lora.r == 4 and run.recipe.lora.alpha == 8  # the starting adapter's shape
    assert run.start_adapter == root / "dpo" / START_ADAPTER
    assert load_file(run.start_adapter / "adapter_model.safetensors").keys() == \
        load_file(root / "sft" / "adapter" / "adapter_model.safetensors").keys()
    # The reference is the starting adapter: before training every reward is 0 and the loss log 2 (against the
    # base model it would not be, the SFT adapter has moved away from it).
    before = results["before"]["validation"]
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6) and before["reward_margin"] == 0
    assert (root / "dpo" / OBJECTIVE_CACHE).is_file()
    assert results["after"]["validation"]["reward_margin"] > 0.1


def test_a_lora_shape_that_contradicts_the_starting_adapter_is_a_recipe_error(sft_then_dpo, tiny_llama,
                                                                            pref_data, tmp_path):
    root, _ = sft_then_dpo
    recipe = make_recipe(tiny_llama, pref_data, tmp_path / "x", objective={"type": "dpo"},
                         lora={"init_from": str(root / "sft"), "r": 8})
    with pytest.raises(RecipeError, match=r"lora.r 8 \(the adapter has 4\).*remove these"):
        train(recipe)
    assert not (tmp_path / "x").exists()


def test_eval_of_a_dpo_run_from_an_sft_adapter_reproduces_its_final_evaluation(sft_then_dpo, pref_data):
    root, results = sft_then_dpo
    metrics = evaluate_run(root / "dpo", str(pref_data["validation"]))
    for key, value in results["after"]["validation"].items():
        assert metrics[key] == pytest.approx(value, abs=1e-5), key
