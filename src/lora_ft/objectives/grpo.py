"""GRPO (Shao et al. 2024): online RL of a causal LM from the rewards of the completions it samples (as TRL 1.16).

**A step.** Each micro-batch holds prompts (``prompt`` rows, text or messages, with the reference columns the rewards
read). Before the step's items are counted, the trainer calls ``rollout``: the current policy samples
``num_generations`` completions per prompt (``scoring.generation.generate_batch``: one left-padded batch with the KV
cache, each prompt prefilled once and its cache repeated for its group; temperature and top-p, no top-k, as TRL's
``top_k: 0``: the whole distribution the loss scores, not transformers' default top 50), the reward functions score
them (``scoring.rewards``), and each completion's
advantage is its summed reward minus its group's mean over the group's standard deviation (+1e-4), TRL's
``scale_rewards: group``. Then ``loss`` scores the completions with gradients through the chunked head at the
sampling temperature (TRL's log-probs are of logits / temperature), each prompt run once for its group
(``shared_prompt.py``), or, where that does not apply, the group × prompts rows whole
(``causal_lm.token_losses``). So generation and training alternate inside the ordinary loop, and checkpoints,
resume, signals, DDP and the trackers work as for every objective.

**The loss.** Per completion token: −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) with ρ = π/π_old, plus β × ρ × the k3
estimate of KL(π‖π_ref) = exp(ref − logp) − (ref − logp) − 1 (the factor ρ, 1 in value, makes its gradient the
unbiased reverse-KL gradient of DeepSeek-V3.2: TRL 1.16's default ``use_bias_correction_kl``). One optimizer step
per generation (TRL's ``num_iterations: 1``) makes π_old the policy itself (ρ = 1, detached, as TRL takes it); a
batch that carries ``old_logps`` (the TRL comparison) uses those. The reference is the base model: the same weights
with the adapter switched off (no second copy), without gradients, computed in ``rollout`` only where β > 0.

**Normalisation** (``objective.loss_type``, TRL's names): ``dapo`` (the default, as TRL's: the token losses summed
and divided by the completion tokens of the whole global batch, so no length bias and the same update on any split
over processes and accumulation steps, which is the trainer's own rule), ``grpo`` (per completion mean, then mean
over completions), ``bnpo`` (over each micro-batch's tokens), ``dr_grpo`` (over completions × max_new_tokens).

**Sampling is reproducible.** Each micro-batch samples under a generator seeded from the recipe's seed, the step and
the examples' ids (``idx``): a resumed run samples the same completions, and 2 processes (one micro-batch each)
sample what 1 process accumulating both does; the global RNG (dropout) is left untouched.

**Evaluation** (before, during and after training, on the held-out prompts): one greedy completion per prompt (what
the adapter does when used; the same from one evaluation to the next for an unchanged model), its rewards (mean
``reward``, and ``reward_<name>`` per function), ``pass_rate`` (the first reward gives full credit, ≥ 1),
``completion_tokens``, ``stopped`` and ``kl`` (per-token k3 against the base on those completions). The
validation ``loss`` is −reward, and the best adapter is the one with the highest mean reward.

**Checked against TRL 1.16** (``tests/test_grpo.py``): the loss and every LoRA gradient of ``GRPOTrainer._compute_loss``
on the same prompts, completions, advantages, old and reference log-probs, for each ``loss_type``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from ..data.cells import Where, text_problem
from ..data.chat import IGNORE, join_parts, prompt_text, render_prompt
from ..errors import DataError
from ..recipe import DataConfig, ObjectiveConfig
from ..scoring.generation import Answer, generate_batch
from ..scoring.rewards import build_rewards, score
from .base import Batch, GenerationExample
from .causal_lm import CausalLM, pad_left, token_losses
from .preference import peft_model_of
from .shared_prompt import KEY as SHARED
from .shared_prompt import prompt_logps, shared_inputs

_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "labels", "logits_to_keep")
STD_EPS = 1e-4
"""Added to a group's standard deviation before dividing (TRL's)."""


def read_prompt(value: Any, system_prompt: str | None = None) -> list[dict[str, str]]:
    """A ``prompt`` cell as messages: a string is one user message; a message list is taken as it is (a content may
    be a list of text parts). ``ValueError`` says what is wrong with it."""
    if isinstance(value, str):
        if text_problem(value) is not None:
            raise ValueError(text_problem(value))
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                   for m in value):
        messages = [{"role": str(m["role"]), "content": join_parts(m["content"], f"message {i + 1}")
                     if isinstance(m["content"], list | tuple) else str(m["content"])} for i, m in enumerate(value)]
    else:
        raise ValueError(f"is neither text nor a list of {{role, content}} messages: {str(value)[:80]!r}")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(reward − group mean) / (group std + 1e-4) for consecutive groups of ``group`` completions, NaN-aware as TRL
    (a completion no reward applied to is left out of its group's statistics and gets advantage 0)."""
    grouped = rewards.view(-1, group)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    valid = ~torch.isnan(grouped)
    var = torch.where(valid, (grouped - mean) ** 2, 0.0).sum(1, keepdim=True) / (valid.sum(1, keepdim=True) - 1)
    advantages = (grouped - mean) / (var.sqrt() + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0).view(-1)


def sampling_seed(seed: int, step: int, ids: list[int]) -> int:
    """The generator seed of one micro-batch's rollouts: the recipe's seed, the step, the examples' ids."""
    digest = hashlib.sha256(json.dumps([seed, step, ids]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def policy_logps(model: torch.nn.Module, batch: Batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token log-probs of the completions at ``temperature``, completion mask), right-aligned as the batch:
    each prompt's forward once for its group where the batch allows it (``shared_prompt``), else every row whole."""
    shared = prompt_logps(model, peft_model_of(model), batch, temperature) if SHARED in batch else None
    if shared is not None:
        return shared
    losses, target = token_losses(model, {k: batch[k] for k in _MODEL_KEYS}, temperature=temperature)
    return -losses, target != IGNORE


@torch.no_grad()
def base_logps(model: torch.nn.Module, batch: Batch, temperature: float) -> torch.Tensor:
    """The completions' per-token log-probs under the reference, the adapter switched off, in eval mode."""
    peft = peft_model_of(model)
    was_training = peft.training
    peft.eval()
    try:
        with peft.disable_adapter():
            return policy_logps(peft, batch, temperature)[0]
    finally:
        peft.train(was_training)


class GRPO(CausalLM):
    """GRPO on ``prompt`` rows with the recipe's reward functions.

    Args:
        cfg: the recipe's ``data`` section.
        tokenizer: the model's tokenizer, with its pad token set.
        objective: the recipe's ``objective`` section (rewards, group, sampling, β, ε, loss_type).
        seed: the recipe's ``train.seed``, which the rollouts' sampling is seeded from.
    """

    formats = ("prompts",)
    compared = "next-token distributions on prompt tokens"
    length_window = 0
    selected_by = ("reward", "loss")

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, objective: ObjectiveConfig, seed: int):
        super().__init__(cfg, tokenizer)
        o = objective
        self.group, self.max_new_tokens, self.temperature, self.top_p = (o.num_generations, o.max_new_tokens,
                                                                         o.temperature, o.top_p)
        self.beta, self.epsilon, self.loss_type, self.seed = o.resolved_beta, o.epsilon, o.loss_type, seed
        self.sequences_per_example = self.group  # the planner's count: one micro-batch of prompts × group
        self.specs, self.rewards = o.rewards, build_rewards(o.rewards, o.max_new_tokens)
        self.weights = torch.tensor([r.weight for r in self.rewards])

    # ------------------------------------------------------------------------------------------- data
    def detect_format(self, columns: list[str], split: str) -> str:
        """``prompts``: the prompt column and every reference column a built-in reward compares with."""
        compared = [s.column for s in self.specs if s.name in ("exact_match", "numeric_match")]
        self.need_columns(columns, split, self.cfg.prompt_column, *compared)
        return "prompts"

    def columns(self, fmt: str) -> dict[str, str]:
        """The prompt column, whose cells ``check_rows`` checks (the reference columns are the rewards' to read)."""
        return {self.cfg.prompt_column: "prompt"}

    def check_rows(self, ds: datasets.Dataset, fmt: str, where: Where) -> None:
        """Every prompt cell is text or a message list: one DataError naming the first that is not."""
        for i, value in enumerate(ds[self.cfg.prompt_column]):
            try:
                read_prompt(value)
            except ValueError as e:
                raise DataError(f"{where.cell(i, self.cfg.prompt_column)} {e}") from None

    def _messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        return read_prompt(row[self.cfg.prompt_column], self.cfg.system_prompt)

    def encode_full(self, row: dict[str, Any], fmt: str) -> dict[str, Any]:
        messages = self._messages(row)
        columns = {k: v for k, v in row.items() if k != self.cfg.prompt_column}
        return {"input_ids": render_prompt(self.tokenizer, messages), "prompt": prompt_text(messages),
                "columns": json.dumps(columns, default=str)}

    def encode(self, row: dict[str, Any], fmt: str) -> dict[str, Any]:
        """The rendered prompt (``input_ids``), in words, and the other columns (as JSON: the rewards read them). A
        prompt longer than ``max_length`` is dropped: cutting it would cut the turn the model answers."""
        out = self.encode_full(row, fmt)
        out["truncated"] = len(out["input_ids"]) > self.cfg.max_length
        out["usable"] = not out["truncated"]
        return out

    def collate(self, rows: list[dict[str, Any]], augment: Callable[[dict], dict] | None = None) -> Batch:
        """Prompts as token-id lists (``rollout`` generates from them) with their words, columns and example ids.
        Single sequences with labels (the forgetting guard's general text) are collated as SFT collates them."""
        if "labels" in rows[0]:
            return super().collate(rows)
        return {"prompt_ids": [list(r["input_ids"]) for r in rows], "prompts": [r["prompt"] for r in rows],
                "columns": [json.loads(r["columns"]) for r in rows],
                "idx": [int(r.get("idx", i)) for i, r in enumerate(rows)]}

    def example_text(self, row: dict[str, Any], fmt: str) -> str:
        return prompt_text(self._messages(row))

    def length(self, row: dict[str, Any], fmt: str) -> int:
        return len(self.encode_full(row, fmt)["input_ids"])

    def describe(self, row: dict[str, Any], fmt: str) -> str:
        """The prompt as rendered; the completions are sampled during training."""
        columns = {k: v for k, v in row.items() if k != self.cfg.prompt_column}
        return (self.tokenizer.decode(self.encode_full(row, fmt)["input_ids"]) +
                f"[[{self.group} completions sampled and rewarded; the rewards read {columns}]]")

    def generation_example(self, row: dict[str, Any], fmt: str) -> GenerationExample | None:
        """The prompt, with the first reward's reference column as the answer (empty where it has none)."""
        messages = self._messages(row)
        column = next((s.column for s in self.specs if s.column in row), None)
        return GenerationExample(render_prompt(self.tokenizer, messages), prompt_text(messages),
                                 str(row[column]) if column else "")

    def label_column(self) -> str | None:
        return None

    def cannot_pack(self, model: torch.nn.Module) -> str | None:
        return "GRPO scores the completions of a group side by side in one left-padded batch; they are not packed"

    def neftune_alpha(self, cfg) -> float | None:
        return None

    # ------------------------------------------------------------------------------------------ rollouts
    def completions(self, prompt_ids: list[list[int]], answers: list[Answer], device: torch.device) -> Batch:
        """Prompt + completion sequences, left-padded (``pad_left``), labels on the completion tokens."""
        rows = [{"input_ids": p + list(a.ids), "labels": [IGNORE] * len(p) + list(a.ids)}
                for p, a in zip(prompt_ids, answers, strict=True)]
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v
                for k, v in pad_left(rows, self.tokenizer.pad_token_id).items()}

    def score(self, batch: Batch, answers: list[Answer], repeat: int) -> torch.Tensor:
        """[reward][completion] values of ``answers`` (``repeat`` completions per prompt of ``batch``)."""
        columns = {k: [c[k] for c in batch["columns"] for _ in range(repeat)] for k in batch["columns"][0]}
        values = score(self.rewards, [p for p in batch["prompts"] for _ in range(repeat)],
                       [a.text for a in answers], [list(a.ids) for a in answers], columns)
        return torch.tensor(values, dtype=torch.float32)

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the rewards per completion (NaN only where none applied), as TRL sums them."""
        weighted = (values * self.weights[:, None]).nansum(0)
        return torch.where(torch.isnan(values).all(0), torch.nan, weighted)

    def rollout(self, model: torch.nn.Module, batch: Batch, step: int) -> Batch:
        """Samples ``group`` completions per prompt from the current policy, scores them, and returns the batch the
        loss trains on: the sequences, their advantages and (β > 0) the reference's per-token log-probs."""
        if "prompt_ids" not in batch:
            return batch
        peft = peft_model_of(model)
        device = next(peft.parameters()).device
        prompts = [p for p in batch["prompt_ids"] for _ in range(self.group)]
        fork = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork):  # the global RNG (dropout) is left as it was
            torch.manual_seed(sampling_seed(self.seed, step, batch["idx"]))
            # top_k=0: the whole distribution, the one the loss scores (transformers' default would keep 50; TRL's
            # GRPOConfig.top_k is 0). repeat: the group's copies of a prompt share one prefill.
            answers = generate_batch(peft, self.tokenizer, batch["prompt_ids"], self.max_new_tokens,
                                     self.temperature, self.top_p, top_k=0, repeat=self.group)
        values = self.score(batch, answers, self.group)
        out = self.completions(prompts, answers, device)
        out[SHARED] = shared_inputs(batch["prompt_ids"], [a.ids for a in answers], self.group,
                                    self.tokenizer.pad_token_id, device)
        out["advantages"] = group_advantages(self.total(values), self.group).to(device)
        out["rewards"] = values.T.to(device)
        if self.beta:
            out["ref_logps"] = base_logps(model, out, self.temperature)
        return out

    # ------------------------------------------------------------------------------------ optimisation
    def tokens(self, batch: Batch) -> torch.Tensor:
        """Prompt and completion tokens of the step (the rollouts' sequences)."""
        return batch["attention_mask"].sum() if "attention_mask" in batch else torch.zeros((), dtype=torch.long)

    def items(self, batch: Batch) -> torch.Tensor:
        """What ``loss``'s sum is divided by over the global batch: completion tokens (dapo), completions (grpo,
        dr_grpo) or micro-batches (bnpo, whose loss is already a per-micro-batch mean)."""
        if self.loss_type == "dapo":
            return (batch["labels"][:, 1:] != IGNORE).sum()
        if self.loss_type == "bnpo":
            return torch.ones((), dtype=torch.long, device=batch["labels"].device)
        return torch.tensor(batch["labels"].shape[0], device=batch["labels"].device)

    def token_loss(self, logps: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The clipped policy-gradient loss (+ β·KL) of every kept position."""
        old = batch.get("old_logps")
        ratio = torch.exp(logps - (logps.detach() if old is None else old))
        advantages = batch["advantages"][:, None]
        clipped = torch.clamp(ratio, 1 - self.epsilon, 1 + self.epsilon)
        loss = -torch.min(ratio * advantages, clipped * advantages)
        if self.beta:  # × ρ: the unbiased reverse-KL gradient (DeepSeek-V3.2), TRL's use_bias_correction_kl default
            delta = batch["ref_logps"] - logps
            loss = loss + self.beta * (torch.exp(delta) - delta - 1) * ratio
        return loss

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        logps, mask = policy_logps(model, batch, self.temperature)
        masked = self.token_loss(logps, batch) * mask
        if self.loss_type == "dapo":
            return masked.sum()
        if self.loss_type == "grpo":
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
        if self.loss_type == "bnpo":
            return masked.sum() / mask.sum().clamp(min=1)
        return masked.sum() / self.max_new_tokens  # dr_grpo

    def head_positions(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE).sum()

    # -------------------------------------------------------------------------------------- evaluation
    def eval_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """One greedy completion per prompt: its rewards, whether the first gives full credit, its length, whether
        it stopped, and its per-token KL to the base model."""
        peft = peft_model_of(model)
        device = next(peft.parameters()).device
        answers = generate_batch(peft, self.tokenizer, batch["prompt_ids"], self.max_new_tokens)
        values = self.score(batch, answers, 1)
        seq = self.completions(batch["prompt_ids"], answers, device)
        logps, mask = policy_logps(peft, seq, self.temperature)
        delta = base_logps(peft, seq, self.temperature) - logps
        kl = ((torch.exp(delta) - delta - 1) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        out = {"reward": self.total(values), "pass": (values[0] >= 1).float(),
               "completion_tokens": torch.tensor([float(a.tokens) for a in answers]),
               "stopped": torch.tensor([float(a.stopped) for a in answers]), "kl": kl.float().cpu()}
        out.update({f"reward_{r.label}": values[i] for i, r in enumerate(self.rewards)})
        return {k: v.to(device) for k, v in out.items()}

    def summarize(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        v = {k: t.double() for k, t in values.items()}
        reward = torch.nanmean(v["reward"]).item()
        out = {"loss": -reward, "examples": len(v["reward"]), "reward": reward}
        out.update({k: torch.nanmean(v[k]).item() for k in v if k.startswith("reward_")})
        out.update(pass_rate=v["pass"].mean().item(), completion_tokens=v["completion_tokens"].mean().item(),
                   stopped=v["stopped"].mean().item(), kl=v["kl"].mean().item())
        return out

    @torch.no_grad()
    def label_logits(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The next-token logits of the prompts' tokens (the merge's fidelity check)."""
        if "prompt_ids" not in batch:
            return super().label_logits(model, batch)
        device = next(model.parameters()).device
        rows = pad_left([{"input_ids": p, "labels": p} for p in batch["prompt_ids"]], self.tokenizer.pad_token_id)
        return super().label_logits(model, {k: v.to(device) if isinstance(v, torch.Tensor) else v
                                            for k, v in rows.items()})

