"""GRPO's completions scored with one forward of each prompt, not one per completion.

Written by hand because the stack lacks it: TRL's ``GRPOTrainer`` (and lora_ft's plain path, ``token_losses`` on
the left-padded batch) put every completion through the model together with its own copy of the prompt, so a
group of G completions computes the prompt's layers G times in forward and in backward. On short answers the
prompt is most of the sequence: the arithmetic quickstart's rows are ~38 prompt tokens (chat template and system
prompt) and 16 completion tokens, so ~70% of the policy's forward and backward was the same prompt again.

Here the distinct prompts run once, with gradients, filling a KV cache; the cache is repeated for the group
(``DynamicCache.batch_repeat_interleave``, differentiable: backward sums the group's gradients into the one
prompt forward) and the completions run on top of it. The positions, the attention mask (the prompt's left padding
included) and so every log-prob are those of the plain path, up to float rounding; gradients are the same sum.
One difference in kind: with LoRA dropout > 0 (lora_ft's default 0.05) the group's copies of a prompt share one
dropout mask on the prompt's tokens instead of drawing one each (the prompt is one forward now): the same
expectation, a different draw. With dropout 0 the paths are the same computation.

``prompt_logps`` returns None where the path does not apply, and the caller scores the plain batch: no chunked
head (``output_head``), gradient checkpointing on (transformers then turns the KV cache off in training), or no
completion tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from ..data.chat import IGNORE
from ..scoring.generation import left_padded
from .base import Batch
from .causal_lm import kept_targets
from .chunked_loss import chunked_token_losses, head_inputs, innermost, output_head

KEY = "shared_prompt"
"""The batch key that holds the inputs of this path (``shared_inputs``); a batch without it is scored plainly."""


def shared_inputs(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], group: int, pad_id: int,
                  device: torch.device) -> dict[str, torch.Tensor | int]:
    """The distinct prompts left-padded, the completions (``group`` per prompt, prompt by prompt) right-padded,
    and the positions of both as the plain left-padded batch numbers them (completions from each prompt's length)."""
    padded = left_padded(prompts, pad_id, torch.device("cpu"))
    prompt_ids, prompt_mask = padded["input_ids"], padded["attention_mask"]
    rows = [torch.tensor(list(c), dtype=torch.long) for c in completions]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0)
    c_width = ids.shape[1]
    lengths = torch.tensor([len(p) for p in prompts]).repeat_interleave(group)
    out = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
           "prompt_positions": (prompt_mask.cumsum(-1) - 1).clamp(min=0),  # pads at 0, as pad_left and generate
           "completion_ids": ids, "completion_mask": mask,
           "completion_positions": lengths[:, None] + torch.arange(c_width)[None, :]}
    return {**{k: v.to(device) for k, v in out.items()}, "group": group}


def prompt_logps(model: torch.nn.Module, prefix_model: torch.nn.Module, batch: Batch,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(per-token log-probs of the completions at ``temperature``, completion mask) in the layout of the plain
    batch's kept positions (``causal_lm.kept_targets``), or None where this path does not apply.

    Args:
        model: the model the step's forward goes through (DDP-wrapped on several processes): the completions'
            forward, so DDP sees one forward per step.
        prefix_model: the same model unwrapped (the PeftModel), for the prompts' forward.
        batch: a GRPO batch with ``KEY`` (``shared_inputs``) besides its plain layout.
        temperature: the sampling temperature (the log-probs are of logits / temperature).
    """
    s = batch[KEY]
    head = output_head(model)
    base = innermost(model)
    if head is None or head.bias is not None or s["completion_ids"].shape[1] == 0 or getattr(
            base, "is_gradient_checkpointing", False):
        return None
    group = s["group"]
    cache = DynamicCache(config=base.config)
    with head_inputs(head) as first:
        prefix_model(input_ids=s["prompt_ids"], attention_mask=s["prompt_mask"], position_ids=s["prompt_positions"],
                     cache=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(group)
    mask = torch.cat([s["prompt_mask"].repeat_interleave(group, dim=0), s["completion_mask"]], dim=1)
    with head_inputs(head) as rest:
        model(input_ids=s["completion_ids"], attention_mask=mask, position_ids=s["completion_positions"], cache=cache,
              use_cache=True)
    # The prompt's last position predicts the first completion token; completion token t predicts t + 1.
    hidden = torch.cat([first[0].hidden[:, -1:].repeat_interleave(group, dim=0), rest[0].hidden[:, :-1]], dim=1)
    target = s["completion_ids"].masked_fill(s["completion_mask"] == 0, IGNORE)
    losses = chunked_token_losses(head, hidden / temperature if temperature != 1.0 else hidden, target,
                                  rest[0].autocast)
    kept = kept_targets(batch) != IGNORE
    # Both layouts list each row's completion tokens in order: move them to the plain batch's right edge.
    return torch.zeros(kept.shape, dtype=losses.dtype, device=losses.device).masked_scatter(
        kept, -losses[target != IGNORE]), kept
