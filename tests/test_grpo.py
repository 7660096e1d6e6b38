"""GRPO (objectives/grpo.py): the loss and LoRA gradients equal to TRL 1.16.0's GRPOTrainer on the same rollouts, the
group-normalised advantages, reproducible sampling, the recipe's rules, and whole runs (learning, evaluation
metrics, resume)."""

import json
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ANIMALS, make_recipe, write_jsonl
from datasets import Dataset
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import ValidationError
from test_preference import grads, lora, objective, policy, trl_as_compared  # noqa: F401 (a fixture)
from transformers import LlamaForCausalLM

from lora_ft.errors import RecipeError
from lora_ft.objectives.grpo import base_logps, group_advantages, policy_logps, sampling_seed
from lora_ft.objectives.shared_prompt import KEY as SHARED
from lora_ft.objectives.shared_prompt import shared_inputs
from lora_ft.recipe import Recipe
from lora_ft.scoring.generation import Answer
from lora_ft.training.trainer import train

TOL = 1e-5
PROMPTS = ["What does the cow say?", [{"role": "user", "content": "Which sound does a dog make?"}]]
GROUP = 3


def rollouts(tok, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """GROUP completions per prompt of different lengths (1 to 9 tokens), some ending with the turn end."""
    g = random.Random(seed)
    completions = []
    for i in range(len(PROMPTS) * GROUP):
        ids = [g.randrange(3, len(tok)) for _ in range(1 + (i * 5) % 9)]
        completions.append(ids + ([tok.eos_token_id] if i % 2 else []))
    return completions


def grpo_objective(model_dir, **options):
    options = {"rewards": ["exact_match"], "num_generations": GROUP, "max_new_tokens": 10, **options}
    return objective(model_dir, "grpo", **options)


def our_batch(obj, completions, advantages, shared: bool = False):
    """The batch ``rollout`` returns for these completions; ``shared``: with its one-prompt-forward inputs."""
    distinct = [obj.encode({"prompt": p}, "prompts")["input_ids"] for p in PROMPTS]
    prompts = [p for p in distinct for _ in range(GROUP)]
    answers = [Answer("", len(c), True, tuple(c)) for c in completions]
    batch = obj.completions(prompts, answers, torch.device("cpu"))
    batch["advantages"] = advantages
    if shared:
        batch[SHARED] = shared_inputs(distinct, completions, GROUP, obj.tokenizer.pad_token_id, torch.device("cpu"))
    return prompts, batch


def trl_grpo_trainer(model_dir, tok, **options):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), num_generations=GROUP, per_device_train_batch_size=GROUP * 2,
                      max_completion_length=10, bf16=False, use_cpu=True, report_to="none",
                      gradient_checkpointing=False, **options)
    trainer = GRPOTrainer(model=LlamaForCausalLM.from_pretrained(model_dir), reward_funcs=lambda completions, **_:
                          [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "x"}] * 4), processing_class=tok,
                          peft_config=lora())
    trainer.current_gradient_accumulation_steps = 1  # set by transformers' training loop, which is not run here
    return trainer


def trl_inputs(tok, prompts, completions) -> dict:
    """TRL's layout: prompts left-padded, completions right-padded, each with its mask."""
    from trl.trainer.utils import pad

    def padded(rows, side):
        ids = pad([torch.tensor(r) for r in rows], padding_value=tok.pad_token_id, padding_side=side)
        return ids, pad([torch.ones(len(r), dtype=torch.long) for r in rows], padding_value=0, padding_side=side)

    prompt_ids, prompt_mask = padded(prompts, "left")
    completion_ids, completion_mask = padded(completions, "right")
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "num_items_in_batch": completion_mask.sum()}


def to_ours(trl_values: torch.Tensor, lengths: list[int], width: int) -> torch.Tensor:
    """Per-token values of right-padded completions moved to the right edge, as our left-padded batch holds them."""
    out = torch.zeros(len(lengths), width)
    for i, n in enumerate(lengths):
        out[i, width - n:] = trl_values[i, :n]
    return out


# ------------------------------------------------------------------------------------- TRL equivalence
CASES = [("dapo", 0.0), ("dapo", 0.2), ("grpo", 0.2), ("bnpo", 0.0), ("dr_grpo", 0.2)]


@pytest.mark.usefixtures("trl_as_compared")
@pytest.mark.parametrize("shared", [False, True], ids=["every-row-whole", "one-prompt-forward-per-group"])
def test_grpo_loss_and_lora_gradients_equal_trl_grpo_trainer_on_the_same_rollouts(tiny_llama, shared):
    """Same prompts, completions, advantages and old log-probs (perturbed from the policy's, so that the clipping
    acts), at temperature 0.7, for every loss_type, with and without the KL term; each side computes its own
    log-probs and its own reference (the adapter switched off). One TRL trainer, its loss_type and beta switched.
    ``shared``: lora_ft scores the group's completions on one forward of their prompt, as its rollouts do."""
    temperature = 0.7
    obj = grpo_objective(tiny_llama, beta=0.2, temperature=temperature, epsilon=0.1)
    tok = obj.tokenizer
    completions = rollouts(tok)
    lengths = [len(c) for c in completions]
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5]), GROUP)
    prompts, batch = our_batch(obj, completions, advantages, shared)
    ours = policy(tiny_llama).train()
    with torch.no_grad():
        current, mask = policy_logps(ours, batch, temperature)
    batch["old_logps"] = current + torch.randn(current.shape, generator=torch.Generator().manual_seed(3)) * 0.3
    batch["ref_logps"] = base_logps(ours, batch, temperature)

    trainer = trl_grpo_trainer(tiny_llama, tok, beta=0.2, temperature=temperature, epsilon=0.1)
    set_peft_model_state_dict(trainer.model, get_peft_model_state_dict(policy(tiny_llama)))
    trainer.model.train()
    inputs = trl_inputs(tok, prompts, completions)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    width = inputs["completion_ids"].shape[1]
    with torch.no_grad(), trainer.model.disable_adapter():
        inputs["ref_per_token_logps"] = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention,
                                                                                   width)[0]
    old = torch.zeros(len(lengths), width)  # the same old log-probs, in TRL's layout
    for i, n in enumerate(lengths):
        old[i, :n] = batch["old_logps"][i, -n:]
    inputs.update(advantages=advantages, old_per_token_logps=old)
    assert ((batch["old_logps"] - current).abs() * mask > 0.2).any()  # some ratios are outside 1 ± ε
    for loss_type, beta in CASES:
        obj.loss_type, obj.beta, trainer.loss_type, trainer.beta = loss_type, beta, loss_type, beta
        for model in (ours, trainer.model):
            model.zero_grad(set_to_none=True)
        loss = obj.loss(ours, batch) / obj.items(batch)
        loss.backward()
        theirs = trainer._compute_loss(trainer.model, inputs)
        theirs.backward()
        ours_g, theirs_g = grads(ours), grads(trainer.model)
        assert sorted(ours_g) == sorted(theirs_g) and len(ours_g) == 28
        diff = max((ours_g[k] - theirs_g[k]).abs().max().item() for k in ours_g)
        scale = max(g.abs().max().item() for g in ours_g.values())
        assert abs(loss.item() - theirs.item()) < TOL and diff < TOL and scale > 1e-3, (loss_type, beta, loss.item(),
                                                                                      theirs.item(), diff, scale)


def test_a_group_s_prompt_runs_once_through_the_model_for_the_same_log_probs_and_gradients(tiny_llama):
    """The shared-prompt path against every row whole: the first layer sees the 2 distinct prompts once and then
    the 6 completions alone, and the log-probs and every LoRA gradient are the plain path's."""
    obj = grpo_objective(tiny_llama, temperature=0.7)
    completions = rollouts(obj.tokenizer)
    weights = torch.randn(len(completions), max(len(c) for c in completions) + 1,
                          generator=torch.Generator().manual_seed(5))
    results = {}
    for shared in (False, True):
        _, batch = our_batch(obj, completions, None, shared)
        model = policy(tiny_llama).train()
        rows = []
        hook = model.base_model.model.model.layers[0].register_forward_pre_hook(
            lambda m, args, kwargs, rows=rows: rows.append(tuple(args[0].shape[:2])), with_kwargs=True)
        logps, mask = policy_logps(model, batch, 0.7)
        hook.remove()
        ((logps * mask * weights[:, -logps.shape[1]:]).sum() / mask.sum()).backward()
        results[shared] = logps.detach(), mask, grads(model), rows
    (plain, plain_mask, plain_g, plain_rows), (ours, ours_mask, ours_g, ours_rows) = results[False], results[True]
    prompt_width = max(len(obj.encode({"prompt": p}, "prompts")["input_ids"]) for p in PROMPTS)
    assert plain_rows == [(6, plain_rows[0][1])] and ours_rows == [(2, prompt_width), (6, max(map(len, completions)))]
    assert torch.equal(ours_mask, plain_mask) and plain_mask.sum() == sum(len(c) for c in completions)
    assert (ours - plain).abs().max() < TOL and plain.abs().max() > 1
    assert sorted(ours_g) == sorted(plain_g) and len(ours_g) == 28
    assert max((ours_g[k] - plain_g[k]).abs().max().item() for k in ours_g) < TOL
    assert max(g.abs().max().item() for g in plain_g.values()) > 1e-3


def test_with_gradient_checkpointing_the_group_s_completions_are_scored_whole(tiny_llama):
    """transformers turns the KV cache off under gradient checkpointing in training: the plain path is used."""
    obj = grpo_objective(tiny_llama)
    _, batch = our_batch(obj, rollouts(obj.tokenizer), None, shared=True)
    model = policy(tiny_llama).train()
    model.base_model.model.gradient_checkpointing_enable()
    rows = []
    model.base_model.model.model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(args[0].shape[0]), with_kwargs=True)
    logps, mask = policy_logps(model, batch, 1.0)
    assert rows[0] == 6 and mask.sum() == sum(len(c) for c in rollouts(obj.tokenizer)) and logps.requires_grad


# ------------------------------------------------------------------------------------------ advantages
def test_group_advantages_are_trl_s_group_normalised_rewards_and_zero_for_an_unscorable_completion():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, 0.3, float("nan"), 0.9])
    grouped = rewards.view(-1, 3)
    mean = torch.nanmean(grouped, 1).repeat_interleave(3)
    std = nanstd(grouped, dim=1).repeat_interleave(3)
    expected = torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)
    got = group_advantages(rewards, 3)
    assert torch.allclose(got, expected, atol=1e-6), (got, expected)
    assert got[3:6].tolist() == [0.0, 0.0, 0.0] and got[7] == 0.0  # an all-equal group teaches nothing
    assert got[:3].sum().abs() < 1e-6 and got[0] > 0 > got[1]


# ------------------------------------------------------------------------------------------ sampling
def test_rollouts_sample_the_same_completions_for_the_same_step_and_examples_and_leave_the_global_rng(tiny_llama):
    obj = grpo_objective(tiny_llama, num_generations=4, max_new_tokens=6)
    model = policy(tiny_llama)
    rows = [{**obj.encode({"prompt": p, "answer": "moo"}, "prompts"), "idx": i} for i, p in
            enumerate(["What does the cow say?", "The owl says what?"])]
    batch = obj.collate(rows)
    torch.manual_seed(11)
    state = torch.get_rng_state()
    first = obj.rollout(model, batch, step=5)
    assert torch.equal(torch.get_rng_state(), state)  # dropout draws what it would have drawn without the rollout
    torch.manual_seed(99)
    again, later = obj.rollout(model, batch, step=5), obj.rollout(model, batch, step=6)
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["advantages"],
                                                                               again["advantages"])
    assert not torch.equal(first["input_ids"], later["input_ids"])  # another step samples anew
    assert first["input_ids"].shape[0] == 8 and first["rewards"].shape == (8, 1)
    assert sampling_seed(0, 5, [0, 1]) != sampling_seed(0, 5, [1, 0]) != sampling_seed(1, 5, [0, 1])


def test_rollouts_sample_from_the_whole_distribution_whatever_top_k_the_generation_config_has(tiny_llama):
    """The loss scores log-probs of the whole distribution, so the rollouts sample from it (TRL's top_k=0), not
    from transformers' default top 50 or a model's own top_k: here 1, which would make every completion greedy."""
    obj = grpo_objective(tiny_llama, num_generations=4, max_new_tokens=6)
    model = policy(tiny_llama)
    model.get_base_model().generation_config.top_k = 1
    rows = [{**obj.encode({"prompt": p, "answer": "moo"}, "prompts"), "idx": i} for i, p in
            enumerate(["What does the cow say?", "The owl says what?"])]
    out = obj.rollout(model, obj.collate(rows), step=0)
    for group in out["input_ids"].view(2, 4, -1):
        assert len({tuple(row.tolist()) for row in group}) > 1  # top-1 sampling would repeat the greedy one


# ------------------------------------------------------------------------------------------ the recipe
def recipe(**objective_options):
    return Recipe.model_validate({"model": {"name": "m"}, "objective": {"type": "grpo", **objective_options}})


def test_an_unknown_reward_is_refused_with_the_closest_name_before_anything_loads():
    with pytest.raises(ValidationError, match="unknown reward 'numeric_mach' .did you mean 'numeric_match'"):
        recipe(rewards=["numeric_mach"])
    with pytest.raises(ValidationError, match="unknown loss_type 'dapoo' .did you mean 'dapo'"):
        recipe(rewards=["exact_match"], loss_type="dapoo")
    with pytest.raises(ValidationError, match="grpo needs objective.rewards"):
        recipe()
    with pytest.raises(ValidationError, match="objective.num_generations applies to objective.type grpo, not dpo"):
        Recipe.model_validate({"model": {"name": "m"}, "objective": {"type": "dpo", "num_generations": 4}})
    with pytest.raises(ValidationError, match="grpo samples completions from a language model"):
        Recipe.model_validate({"model": {"name": "m", "task": "sequence_classification"},
                               "objective": {"type": "grpo", "rewards": ["exact_match"]}})
    assert recipe(rewards=["exact_match"]).objective.resolved_beta == 0.0  # TRL's default: no reference pass


def test_a_reward_function_that_does_not_import_is_one_line_among_the_recipe_errors(tiny_llama, prompt_data,
                                                                                    tmp_path):
    bad = make_recipe(tiny_llama, prompt_data, tmp_path / "x", objective={
        "type": "grpo", "rewards": ["test_grpo:o_shar", {"name": "regex_match"}]})
    with pytest.raises(RecipeError, match=r"2 problem\(s\): objective.rewards 'test_grpo:o_shar': module "
                                          r"'test_grpo' has no function 'o_shar' \(did you mean 'o_share'\?\); "
                                          r"objective.rewards regex_match needs a pattern"):
        train(bad)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ whole runs
def o_share(completions, **_):
    """A reward a tiny random model can learn in a few steps: the share of 'o' among a completion's characters."""
    return [c.count("o") / max(1, len(c)) for c in completions]


def prompt_rows(n: int, seed: int) -> list[dict]:
    g = random.Random(seed)
    return [{"prompt": f"What does the {a} say?", "answer": s} for a, s in
            (g.choice(sorted(ANIMALS.items())) for _ in range(n))]


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo-data")
    return {"train": write_jsonl(d / "train.jsonl", prompt_rows(32, 1)),
            "validation": write_jsonl(d / "validation.jsonl", prompt_rows(6, 2))}


GRPO_RUN = {"type": "grpo", "rewards": ["test_grpo:o_share", {"name": "length_penalty", "weight": 0.1}],
            "num_generations": 4, "max_new_tokens": 8, "beta": 0.05}


@pytest.fixture(scope="module")
def grpo_run(tiny_llama, prompt_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "grpo"
    recipe = make_recipe(tiny_llama, prompt_data, out, objective=GRPO_RUN,
                         train={"max_steps": 6, "micro_batch_size": 2, "global_batch_size": 4, "eval_every": 3,
                                "checkpoint_every": 3, "lr": 3e-2})
    return recipe, train(recipe)


def test_a_grpo_run_raises_the_held_out_reward_and_reports_every_metric(grpo_run):
    recipe, results = grpo_run
    before, after = results["before"]["validation"], results["after"]["validation"]
    keys = {"loss", "examples", "reward", "reward_o_share", "reward_length_penalty", "pass_rate",
            "completion_tokens", "stopped", "kl"}
    assert keys <= set(before) and keys <= set(after), (before, after)
    assert before["kl"] == pytest.approx(0.0, abs=1e-6) and after["kl"] > 1e-4  # the policy left the base
    assert after["reward"] > before["reward"] + 0.03 and after["reward_o_share"] > before["reward_o_share"], (before,
                                                                                                         after)
    assert before["loss"] == -before["reward"] and before["examples"] == 6
    rows = [json.loads(x) for x in open(f"{recipe.output_dir}/metrics.jsonl")]
    assert [r["step"] for r in rows if r.get("split") == "validation" and not r.get("final")] == [0, 3, 6]
    steps = [r for r in rows if "split" not in r and "loss" in r]
    assert len(steps) == 6 and all(r["tokens_per_s"] > 0 for r in steps)


def test_the_end_of_run_memory_plan_is_made_at_the_longest_prompt_not_at_max_length(grpo_run):
    """The recorded prediction beside the measured peak: planned at ``data.max_length`` (512 here) it counted
    prompts ten times longer than any in the data (the GRPO quickstart: 11.8 GiB planned, 1.6 GiB measured)."""
    from lora_ft.memory.estimate import estimate
    from lora_ft.memory.shape import model_shape, setting_for

    recipe, _ = grpo_run
    out = Path(recipe.output_dir)
    info = json.loads((out / "run_info.json").read_text())
    resolved = Recipe.model_validate(yaml.safe_load((out / "run_config.yaml").read_text()))
    longest = max(len(r["prompt"]) for r in map(json.loads, Path(recipe.data.train).read_text().splitlines()))
    at_max = estimate(model_shape(resolved), setting_for(resolved, "cpu"), 2, resolved.data.max_length).total
    assert resolved.data.max_length >= 4 * longest  # characters ≥ tokens: the prompts are far shorter
    assert 0 < info["memory"]["memory/predicted_peak_bytes"] < at_max


def test_grpo_resume_samples_the_same_completions_and_reproduces_the_losses(grpo_run, tmp_path):
    recipe, _ = grpo_run
    (tmp_path / "part" / "checkpoints").mkdir(parents=True)
    shutil.copytree(f"{recipe.output_dir}/checkpoints/step-00000003", tmp_path / "part/checkpoints/step-00000003")
    train(recipe.model_copy(update={"output_dir": str(tmp_path / "part")}), resume="latest")

    def logged(out):
        return {(r["step"], r.get("split")): r.get("loss") for r in map(json.loads, open(f"{out}/metrics.jsonl"))
                if "freeze" not in r}

    full, part = logged(recipe.output_dir), logged(tmp_path / "part")
    assert sorted(k[0] for k in part if k[1] is None) == list(range(4, 7))
    assert max(abs(full[k] - part[k]) for k in part if k in full) < 1e-6


def test_a_grpo_run_on_two_processes_matches_one_process(grpo_run, tmp_path):
    """The 1-process run accumulates 2 micro-batches of 2 prompts per step; 2 processes take one each. Each
    micro-batch samples from the same seed (recipe seed, step, example ids) on either, so the same completions,
    advantages and updates: the same losses and evaluations."""
    from test_distributed import on_two_processes, rows

    recipe, _ = grpo_run
    two = recipe.model_copy(update={"output_dir": str(tmp_path / "p2")})
    two_rows, _ = on_two_processes(two, tmp_path)
    one = rows(Path(recipe.output_dir))
    assert [(r["step"], r.get("split")) for r in one] == [(r["step"], r.get("split")) for r in two_rows]
    for a, b in zip(one, two_rows, strict=True):
        assert b.get("loss") == pytest.approx(a.get("loss"), abs=1e-5), (a, b)
        if "reward" in a:
            assert b["reward"] == pytest.approx(a["reward"], abs=1e-5) and b["examples"] == a["examples"]


# ------------------------------------------------------------------------------------------ the planner
def test_the_plan_counts_a_grpo_step_as_group_times_prompts_sequences_and_their_generation_cache(tmp_path, capsys):
    from transformers import LlamaConfig

    from lora_ft.cli import main
    from lora_ft.memory.estimate import estimate
    from lora_ft.memory.shape import model_shape, setting_for
    from lora_ft.recipe import load_recipe

    LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096).save_pretrained(tmp_path / "m")
    (tmp_path / "r.yaml").write_text(
        f"model: {{name: {tmp_path / 'm'}, quant: nf4}}\nobjective: {{type: grpo, rewards: [numeric_match], "
        "num_generations: 8, max_new_tokens: 256}\ndata: {max_length: 512}\ntrain: {micro_batch_size: 2}\n")
    assert main(["plan", str(tmp_path / "r.yaml"), "--memory", "24GB", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 2 prompts (× 8 completions of up to 256 tokens) × sequence 512" in out
    assert "generation (KV cache) *" in out and "16 sequences × 768 tokens × 22 layers × K,V (256 each)" in out
    grpo = load_recipe(tmp_path / "r.yaml")
    sft = grpo.model_copy(update={"objective": grpo.objective.model_copy(update={"type": "auto", "rewards": []}),
                                  "data": grpo.data.model_copy(update={"packing": False})})  # rows as GRPO's
    shape = model_shape(grpo)
    ours = estimate(shape, setting_for(grpo, "cuda"), 2, 512)
    alone = estimate(shape, setting_for(sft, "cuda"), 16, 768)  # 16 sequences of prompt + completion tokens
    rows, alone_rows = {r.label: r.bytes for r in ours.rows}, {r.label: r.bytes for r in alone.rows}
    assert rows["activations"] == alone_rows["activations"] and ours.keep == 257
    cache = 2 * 22 * 16 * 768 * 256 * 2  # K and V, every layer, 16 sequences of 768 tokens, bf16
    prefill = 16 * 768 * (2 * 4 * 2048 + 2 * 5632 * 2)  # one layer's fp32 residual stream and 16-bit MLP, no grads
    assert rows["generation (KV cache) *"] == cache + prefill + 16 * 32000 * 4 * 2  # + the last position's logits
    assert ours.step_peak >= ours.rows[0].bytes + rows["generation (KV cache) *"]
    # Without checkpointing (the CPU's default) the loss runs each prompt once for its group (shared_prompt.py):
    # more than the 16 completions alone, well under 16 whole sequences.
    acts = {}
    for name, recipe, micro, seq in (("shared", grpo, 2, 512), ("whole", sft, 16, 768), ("completions", sft, 16, 256)):
        acts[name] = next(r.bytes for r in estimate(shape, setting_for(recipe, "cpu"), micro, seq).rows
                          if r.label == "activations")
    assert acts["completions"] < acts["shared"] < 0.5 * acts["whole"], acts


def test_data_without_the_column_a_reward_compares_with_is_one_line_naming_it(tiny_llama, tmp_path):
    data = {"train": write_jsonl(tmp_path / "train.jsonl", [{"prompt": "What does the cow say?", "sound": "moo"}])}
    with pytest.raises(RecipeError, match=r"data.train: column\(s\) \['answer'\] not found; columns present: "
                                          r"\['prompt', 'sound'\]"):
        train(make_recipe(tiny_llama, data, tmp_path / "x", objective={"type": "grpo", "rewards": ["exact_match"]}))
