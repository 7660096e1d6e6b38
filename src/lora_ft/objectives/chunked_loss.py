"""Cross-entropy through a frozen output head, chunk by chunk: no full-vocabulary logits for the whole batch.

Written by hand because the stack lacks it: transformers computes ``lm_head(hidden)`` for every kept position and
then the loss, so a step holds (positions × vocabulary) fp32 tensors three times over — the logits, the
log-softmax that ``cross_entropy`` saves, and its gradient — often the largest single term of a small model with
a large vocabulary (SmolLM2: 49k, Llama 3: 128k). peft and accelerate have no fused loss; Liger-Kernel and
Apple's cut-cross-entropy do, but as Triton/CUDA kernels that do not run on the CPU.

LoRA never trains the output head, so the only gradient the loss has to send back is d loss / d hidden, and each
position's loss depends on its own hidden state alone. ``ChunkedLinearCrossEntropy`` therefore computes, a chunk
of positions at a time, the logits, the loss and already the gradient ``(softmax − onehot) · W``, keeps that
gradient (positions × hidden, small) and drops the chunk's logits. Backward only scales the kept gradient. Same
FLOPs as the unfused forward + backward; peak memory one chunk of logits instead of three full copies.

The one exception is ``model.chat_template``'s token rows (peft's trainable tokens on the head: a few rows of W
replaced by trained values). Their logits are computed from the trained rows, and their gradient
``(softmax − onehot)[:, rows]ᵀ · hidden`` needs only those columns of each chunk (positions × a few) kept for
backward. Without this the head fell back to full logits, and peft's own forward also builds a full copy of W with
the rows written in, and a full (vocabulary × hidden) weight gradient in backward.

The hidden states come from the model's own forward — a pre-hook on the output head takes its input and hands
the head an empty slice — so DDP's forward, gradient checkpointing and peft's wrappers run exactly as before.
Where that is not safe the loss falls back to full logits (``output_head`` returns None): a trainable or sharded
head, or an architecture that transforms the logits after the head (Gemma 2's soft-capping, Cohere's scale).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.chat import IGNORE

CHUNK_VALUES = 1 << 24
"""Logit values per chunk (64 MiB in fp32): large enough for efficient matmuls, small next to a model."""

# Architectures whose causal-LM head is a plain ``nn.Linear`` whose output is the logits, nothing applied after.
# An allow-list, not a deny-list: a new architecture that post-processes its logits must not get a wrong loss.
PLAIN_HEAD_MODELS = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi", "phi3", "gpt2", "gpt_neox",
    "gptj", "gpt_bigcode", "olmo", "olmo2", "smollm3", "starcoder2", "stablelm", "gemma", "falcon", "opt", "bloom",
})


def chunk_rows(vocab: int) -> int:
    """Positions per chunk for a vocabulary of ``vocab`` (the planner counts the same)."""
    return max(1, CHUNK_VALUES // vocab)


def innermost(model: nn.Module) -> nn.Module:
    """The transformers model under DDP, peft and accelerate's wrappers."""
    while hasattr(model, "get_base_model") or hasattr(model, "module"):
        model = model.get_base_model() if hasattr(model, "get_base_model") else model.module
    return model


@dataclass
class OutputHead:
    """The output head as the chunked loss computes it: the module whose input is taken (``head_inputs``), its
    frozen linear layer, and the rows peft's trainable tokens replace in it (None: no trained rows)."""

    module: nn.Module
    linear: nn.Linear
    rows: torch.Tensor | None = None
    """The replaced rows' token ids."""
    values: torch.Tensor | None = None
    """Their trained values (rows × hidden), a parameter of the adapter."""

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias


def _trained_rows(module: nn.Module) -> tuple[nn.Module, torch.Tensor | None, torch.Tensor | None] | None:
    """(linear layer, row ids, trained values) of a head, the ids None for a plain head; None where the rows
    cannot be read (several active adapters)."""
    adapter = getattr(module, "token_adapter", None)  # peft's TrainableTokensWrapper
    if adapter is None:
        return module, None, None
    active = [a for a in adapter.active_adapters if a in adapter.token_indices]
    if adapter.disable_adapters or adapter.merged or not active:
        return adapter.base_layer, None, None  # as peft's forward: the base weight as it is
    if len(active) > 1:
        return None
    ids = torch.tensor(adapter.token_indices[active[0]], device=adapter.base_layer.weight.device)
    return adapter.base_layer, ids, adapter.trainable_tokens_delta[active[0]]


def output_head(model: nn.Module) -> OutputHead | None:
    """The causal LM's output head when the chunked loss can stand in for it, else None."""
    base = innermost(model)
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODELS or not hasattr(base, "get_output_embeddings"):
        return None
    module = base.get_output_embeddings()
    found = _trained_rows(module) if module is not None else None
    if found is None:
        return None
    linear, rows, values = found
    if type(linear) is not nn.Linear or linear.weight.requires_grad:  # a trained head needs its weight gradient
        return None
    if rows is not None and linear.bias is not None:  # peft's trainable rows compute without the bias
        return None
    # Sharded engines (FSDP2 DTensors, ZeRO-3's partitioned parameters) only hold the whole weight inside the
    # forward of the module that owns it; the loss runs after that.
    weight = linear.weight
    if hasattr(weight, "full_tensor") or hasattr(weight, "ds_id") or type(weight) is not nn.Parameter:
        return None
    return OutputHead(module, linear, rows, values)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-position ``cross_entropy(hidden @ W.T + b, target)`` (0 where ``target`` is ignored), chunk by chunk.

    ``need_grad`` is decided by the caller because autograd disables grad mode inside ``forward``.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                rows: int, need_grad: bool, token_ids: torch.Tensor | None = None,
                values: torch.Tensor | None = None) -> torch.Tensor:
        losses = torch.zeros(len(hidden), dtype=torch.float32, device=hidden.device)
        grad = torch.zeros_like(hidden) if need_grad else None
        picked_cols = (torch.zeros(len(hidden), len(token_ids), dtype=torch.float32, device=hidden.device)
                       if need_grad and token_ids is not None else None)
        kind = hidden.device.type
        if torch.is_autocast_enabled(kind) and weight.dtype != torch.get_autocast_dtype(kind):
            # Once, not per chunk: autocast would copy the (vocabulary × hidden) weight for every chunk's matmul
            # (it caches casts of trained leaves only); and the gradient's matmul then runs in the 16-bit dtype, as
            # autocast runs the unfused head's backward. Measured on SmolLM2's 49k × 576 head, 2,048 positions, one
            # thread, bf16 autocast: forward + backward 2.53 → 1.84 s. The copy is one weight, freed on return.
            weight = weight.to(torch.get_autocast_dtype(kind))
        if token_ids is not None:
            values = values.to(weight.dtype)
            shift = values - weight[token_ids]  # what the trained rows add to W's
        for start in range(0, len(hidden), rows):
            h, t = hidden[start:start + rows], target[start:start + rows]
            valid = t != IGNORE
            if not valid.any():
                continue
            # As the unfused path computes them: the head's matmul (in autocast's dtype when it is on), then fp32.
            logits = F.linear(h, weight, bias).float()
            if token_ids is not None:
                logits[:, token_ids] = F.linear(h, values).float()
            t = t.clamp(min=0)
            picked = logits.gather(1, t[:, None]).squeeze(1)
            # log-sum-exp by hand, in place: torch.logsumexp would allocate a second chunk-sized temporary.
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()
            total = probs.sum(dim=-1, keepdim=True)
            lse = total.log().add_(top).squeeze(1)
            losses[start:start + rows] = torch.where(valid, lse - picked, 0.0)
            if need_grad:
                probs.div_(total)
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                probs.mul_(valid[:, None])
                grad[start:start + rows] = probs.to(weight.dtype) @ weight  # (softmax − onehot) · W
                if token_ids is not None:
                    cols = probs[:, token_ids]
                    grad[start:start + rows] += cols.to(weight.dtype) @ shift
                    picked_cols[start:start + rows] = cols
            del logits, probs
        ctx.save_for_backward(grad, picked_cols, hidden if picked_cols is not None else None)
        ctx.values_dtype = values.dtype if values is not None else None
        ctx.backward_done = False
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        if ctx.backward_done:  # the gradient below is scaled in place, so it cannot be used twice
            raise RuntimeError("the chunked loss does not support retain_graph / a second backward")
        ctx.backward_done = True
        grad, picked_cols, hidden = ctx.saved_tensors
        grad_values = None
        if picked_cols is not None:  # d loss / d row = Σ over positions of (softmax − onehot)[row] · hidden
            grad_values = (picked_cols * grad_losses[:, None]).T @ hidden.float()
            grad_values = grad_values.to(ctx.values_dtype)
        # In place: one (positions × hidden) tensor fewer at the peak; nothing else reads this buffer.
        return grad.mul_(grad_losses[:, None].to(grad.dtype)), None, None, None, None, None, None, grad_values


@dataclass
class HeadInput:
    """What the output head received inside the model's forward, and the autocast state it ran under there
    (accelerate's mixed precision wraps only the forward; the loss must compute the head as it would have)."""

    hidden: torch.Tensor
    autocast: torch.autocast


@contextmanager
def head_inputs(head: OutputHead) -> Iterator[list[HeadInput]]:
    """While active, the head's forward receives an empty slice (no logits computed) and its real input is
    appended to the yielded list, still attached to the autograd graph."""
    captured: list[HeadInput] = []

    def take_input(module: nn.Module, args: tuple) -> tuple:
        kind = args[0].device.type
        captured.append(HeadInput(args[0], torch.autocast(kind, dtype=torch.get_autocast_dtype(kind),
                                                          enabled=torch.is_autocast_enabled(kind))))
        return (args[0][..., :0, :], *args[1:])

    handle = head.module.register_forward_pre_hook(take_input)
    try:
        yield captured
    finally:
        handle.remove()


def chunked_token_losses(head: OutputHead, hidden: torch.Tensor, target: torch.Tensor,
                         autocast: torch.autocast | None = None) -> torch.Tensor:
    """Per-position losses for ``hidden`` (..., H) against ``target`` (...), shaped like ``target``;
    ``autocast``: the state the head would have run under (``HeadInput.autocast``)."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    trained = head.values is not None and head.values.requires_grad
    need_grad = torch.is_grad_enabled() and (flat_hidden.requires_grad or trained)
    linear = head.linear
    with autocast or nullcontext():
        losses = ChunkedLinearCrossEntropy.apply(flat_hidden, linear.weight, linear.bias, target.reshape(-1),
                                                 chunk_rows(linear.out_features), need_grad, head.rows, head.values)
    return losses.view(target.shape)
