"""GRPO (objectives/grpo.py): the loss and LoRA gradients equal to TRL 1.16.0's GRPOTrainer on the same rollouts, the
group-normalised advantages, reproducible sampling, the recipe's rules, and whole runs (learning, evaluation
metrics, resume)."""

import random
import tempfile

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from test_preference import grads, lora, objective, policy, trl_as_compared  # noqa: F401 (a fixture)
from transformers import LlamaForCausalLM

from lora_ft.objectives.grpo import base_logps, group_advantages, policy_logps
from lora_ft.scoring.generation import Answer

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


def our_batch(obj, completions, advantages):
    prompts = [obj.encode({"prompt": p}, "prompts")["input_ids"] for p in PROMPTS for _ in range(GROUP)]
    answers = [Answer("", len(c), True, tuple(c)) for c in completions]
    batch = obj.completions(prompts, answers, torch.device("cpu"))
    batch["advantages"] = advantages
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
def test_grpo_loss_and_lora_gradients_equal_trl_grpo_trainer_on_the_same_rollouts(tiny_llama):
    """Same prompts, completions, advantages and old log-probs (perturbed from the policy's, so that the clipping
    acts), at temperature 0.7, for every loss_type, with and without the KL term; each side computes its own
    log-probs and its own reference (the adapter switched off). One TRL trainer, its loss_type and beta switched."""
    temperature = 0.7
    obj = grpo_objective(tiny_llama, beta=0.2, temperature=temperature, epsilon=0.1)
    tok = obj.tokenizer
    completions = rollouts(tok)
    lengths = [len(c) for c in completions]
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5]), GROUP)
    prompts, batch = our_batch(obj, completions, advantages)
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
