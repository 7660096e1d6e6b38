"""Peak training memory from the model's config alone: the numbers behind ``lora-ft plan`` and the ``auto`` settings.

Nothing is loaded but ``config.json``: the model is built on the meta device to count its parameters module by
module, and the rules lora_ft applies when it really loads the model decide what each parameter costs:

- **base weights**: bitsandbytes replaces every backbone ``nn.Linear`` (transformers' own rule, with lora_ft's
  skip list: new task heads, the output embedding, tied weights); NF4/FP4 store 0.5 byte per weight plus one
  absmax per block of 64 (fp32, or 8-bit with a second fp32 level per 256 blocks under double quantization);
  int8 stores 1 byte plus one fp32 scale per output row. Everything else (embeddings, norms, biases, the output
  head) is fp32: unquantized models load in fp32, and ``prepare_model_for_kbit_training`` casts the rest to fp32.
- **trainable**: LoRA A/B in fp32 with a gradient and the optimizer's state (``optimizer_state.py``: AdamW's two
  fp32 moments, 16 bytes per parameter in all); new task heads the same, plus the frozen original that peft's
  ``modules_to_save`` keeps.
- **activations**: what autograd saves per token and layer, listed tensor by tensor in ``activations.py`` (read
  from the transformers, peft and bitsandbytes code paths and checked against
  ``torch.autograd.graph.saved_tensors_hooks``), plus the attention terms that grow with the sequence length.
  With gradient checkpointing only each layer's input is kept, and one layer is recomputed at a time.
- **logits**: lora_ft computes logits only for the kept positions (from the first label token to the end of the
  batch, see ``objectives.causal_lm.pad_left``), one chunk of positions at a time (``chunked_loss``);
  architectures it does not chunk hold three fp32 copies of (kept positions × vocabulary).
- **evaluation**: micro-batch × 2 without gradients, a peak of its own.

The prediction is the peak of tensor memory (what ``torch.cuda.max_memory_allocated`` reports); the framework
overhead (CUDA context, allocator slack, or the Python process on the CPU) is added before comparing with a budget.
``training.measure.measure_peak`` measures the same quantity on this machine, for ``scripts/bench_plan.py`` and the
tests. The terms were checked on the CPU (fp32 and bf16 autocast, with and without checkpointing); the CUDA-only
ones (bool dropout masks, the overhead constants) follow the CUDA code paths and have not been measured on a GPU yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..modeling.model_dropout import sdpa_math_kernel
from ..modeling.packed_attention import widest_eager
from ..objectives.chunked_loss import chunk_rows
from ..recipe.train import EVAL_BATCH_FACTOR
from .activations import layer_terms
from .optimizer_state import OPTIMIZER_LABELS, state_bytes
from .shape import (
    BLOCK_4BIT,
    BLOCK_NESTED,
    CPU_RUNTIME,
    CUDA_CONTEXT,
    CUDA_FRAGMENTATION,
    ModelShape,
    Setting,
    fmt_size,
)


# ---------------------------------------------------------------------------------------------- static terms
def quantized_weight_bytes(n: int, rows: int, quant: str, double_quant: bool) -> float:
    """Storage of one quantized weight matrix of ``n`` values with ``rows`` output rows."""
    if quant == "int8":
        return n + 4 * rows  # int8 values + one fp32 scale (SCB) per row
    blocks = math.ceil(n / BLOCK_4BIT)
    packed = math.ceil(n / 2) + 4 * 16  # two 4-bit codes per byte, and the 16-value fp32 code book
    if not double_quant:
        return packed + 4 * blocks  # fp32 absmax per block
    # 8-bit absmax per block, fp32 scale per 256 blocks, the 256-entry fp32 code book and an offset
    return packed + blocks + 4 * math.ceil(blocks / BLOCK_NESTED) + 4 * 256 + 4


@dataclass
class Row:
    label: str
    bytes: float
    note: str = ""


def static_rows(shape: ModelShape, s: Setting) -> list[Row]:
    """Weights, LoRA and optimizer state: everything held for the whole step."""
    q_names = shape.quantizable if s.quant != "none" else frozenset()
    q_bytes, q_params, q_bias = 0.0, 0, 0
    for name, fan_in, fan_out, bias in shape.linear:
        if name in q_names:
            q_bytes += quantized_weight_bytes(fan_in * fan_out, fan_out, s.quant, s.double_quant)
            q_params += fan_in * fan_out
            q_bias += fan_out if bias else 0
    full = shape.total_params - q_params  # fp32: loaded so, or cast by prepare_model_for_kbit_training
    lora = sum(s.r * (i + o) + (o if s.use_dora else 0) for _, i, o in shape.lora_modules)
    rows = []
    if s.quant != "none":
        per = {"int8": "1 B/param + fp32 row scales", "nf4": "0.5 B/param + absmax per 64",
               "fp4": "0.5 B/param + absmax per 64"}[s.quant]
        if s.quant in ("nf4", "fp4"):
            per += " (8-bit, double quant)" if s.double_quant else " (fp32)"
        rows.append(Row(f"base weights, {s.quant} ({len(q_names)} linear layers)", q_bytes,
                        f"{q_params / 1e6:,.1f}M params, {per}"))
    rows.append(Row("base weights, fp32" + (" (not quantized)" if s.quant != "none" else ""), 4 * full,
                    f"{full / 1e6:,.1f}M params: embeddings, norms, biases, output head"
                    if s.quant != "none" else f"{full / 1e6:,.1f}M params"))
    # Optimizer state by tensor (8-bit state and Adafactor's factored moments depend on each tensor's shape).
    lora_shapes = [t for _, i, o in shape.lora_modules for t in ((s.r, i), (o, s.r), *([(o,)] if s.use_dora else []))]
    lora_state = state_bytes(s.optimizer, lora_shapes)
    opt = OPTIMIZER_LABELS[s.optimizer]
    rows.append(Row(f"LoRA weights + grads + {opt}", 8 * lora + lora_state,
                    f"{lora / 1e6:,.2f}M params × (4 + 4 B) + {fmt_size(lora_state)} {opt} state, "
                    f"{len(shape.lora_modules)} modules"))
    if shape.head_params:
        head_state = state_bytes(s.optimizer, lora_shapes + list(shape.head_shapes)) - lora_state
        rows.append(Row(f"new task head (trained copy + grads + {opt})", 8 * shape.head_params + head_state,
                        f"{shape.head_params / 1e3:,.1f}K params (modules_to_save)"))
    return rows


def _backward_working(shape: ModelShape, s: Setting, tokens: int, seq: int) -> tuple[float, str]:
    """Transient memory while a layer backpropagates, on top of its saved tensors (which are freed as their
    nodes run): the fp32 gradients of the residual stream and of the block output in flight, the softmax
    backward's two (batch × heads × seq²) gradients in the math attention kernel, and for quantized layers the
    weight de-quantized for the matmul."""
    grads = tokens * 4 * 2 * shape.hidden
    if shape.family == "encoder" and sdpa_math_kernel(shape.attn_dropout, s.device):
        grads += tokens * seq * shape.heads * 4 * 2
    biggest = max((fi * fo for n, fi, fo, _ in shape.linear if n in shape.quantizable), default=0)
    dequant = biggest * (4 if not s.autocast else 2) if s.quant != "none" else 0
    return grads + dequant, "gradients in flight" + (" + one de-quantized weight" if dequant else "")


def _loss_bytes(shape: ModelShape, s: Setting, batch: int, keep: int, grad: bool = True,
                chunked: bool | None = None) -> tuple[float, str]:
    """Logits and loss for ``keep`` positions per example (causal LM), or the classifier's tiny logits.

    Chunked (``chunked_loss``, the default where the architecture allows it): one chunk of logits at a time —
    fp32, plus under autocast the 16-bit matmul output beside it (6 bytes per value) — and per position two
    hidden-size fp32 vectors: in forward the gathered hidden states and the gradient computed there, in backward
    that gradient (scaled in place) and the one the slicing passes on. Without gradients only the chunk and the
    gathered hidden states.
    Unchunked: three fp32 (positions × vocabulary) tensors coexist, in forward: the logits, their contiguous copy
    for ``cross_entropy`` (the ``[:, :-1]`` slice is not contiguous) and the log-softmax it saves; in backward:
    that log-softmax, the gradient reaching it and the gradient it passes on. Under autocast the logits come out
    in 16 bits and accelerate converts them to fp32 (so the count stays three), and the output head keeps a
    16-bit copy of its fp32 weight for the backward.
    """
    if shape.task != "causal_lm":
        return 0.0, "classifier logits: negligible"
    positions = batch * keep
    head16 = 2 * shape.vocab * shape.hidden if s.autocast else 0  # autocast's 16-bit copy of the head weight
    if shape.chunked_loss if chunked is None else chunked:
        rows = min(positions, chunk_rows(shape.vocab))
        chunk = rows * shape.vocab * (6 if s.autocast else 4)
        per_position = (2 if grad else 1) * 4 * shape.hidden
        return chunk + positions * per_position + head16, (
            f"{batch}×{keep} positions, chunks of {rows} × {shape.vocab} vocab")
    n = positions * shape.vocab
    return 3 * 4 * n + head16, f"{batch}×{keep} positions × {shape.vocab} vocab: 3 fp32 copies" + (
        " + 16-bit head weight" if head16 else "")


def _eval_bytes(shape: ModelShape, s: Setting, batch: int, seq: int, keep: int) -> tuple[float, str]:
    """Evaluation runs ``batch`` examples (the loop uses micro-batch × 2) without gradients: nothing is saved
    across layers, so its peak is the loss (``_loss_bytes`` without gradients) or one layer's tensors in
    flight, whichever is larger. In the MLP those are the residual stream and the normed input (fp32), and the
    intermediates: gate, up, act(gate), their product and LoRA's new sum beside the base output (five) — fc1's
    output, its LoRA sum and the activation (three) without a gate."""
    tokens = batch * seq
    proj = 4 if (s.quant != "none" or not s.autocast) else s.act  # peft's forward: quantized outputs are fp32
    layer = tokens * (2 * 4 * shape.hidden + (5 if shape.gated_mlp else 3) * shape.intermediate * proj)
    if batch > 1:
        layer += tokens * seq * s.act  # the additive padding mask
    logits = _loss_bytes(shape, s, batch, keep, grad=False)[0]
    return max(logits, layer), f"micro-batch {batch}, no gradients: " + ("logits" if logits >= layer else "one layer")


def _generation_bytes(shape: ModelShape, s: Setting, sequences: int, length: int) -> tuple[float, str]:
    """GRPO's rollouts: transformers' ``generate`` with the KV cache for all ``sequences`` (group × prompts) up to
    ``length`` tokens (K and V of every layer, in the compute dtype), plus one position's fp32 logits per sequence
    and the prompt's prefill of one layer without gradients."""
    cache = 2 * shape.layers * sequences * length * shape.kv_dim * s.act
    logits = sequences * shape.vocab * 4 * 2  # the last position's logits and the sampling's softmax
    prefill = sequences * length * (2 * 4 * shape.hidden + 2 * shape.intermediate * s.act)
    return cache + logits + prefill, (f"{sequences} sequences × {length} tokens × {shape.layers} layers × K,V "
                                      f"({shape.kv_dim} each), no gradients")


def _outer_bytes(shape: ModelShape, tokens: int) -> float:
    """Saved outside the layers: the embedding output (and an encoder's embedding LayerNorm), the final norm."""
    return tokens * 4 * shape.hidden * 2


def _activations(shape: ModelShape, s: Setting, micro_batch: int, seq_len: int, one_layer: float) -> tuple[float, str]:
    """What a training step saves for backward: every layer's activations (``one_layer`` each), with
    checkpointing only each layer's input, and for GRPO the shared-prompt layout (``_shared_prompt_acts``)."""
    tokens = micro_batch * s.sequences * (seq_len + s.generated)
    if s.gradient_checkpointing:
        # Each checkpointed layer keeps its input (fp32 residual stream); in backward one layer is recomputed,
        # its saved tensors live while its gradients flow.
        return shape.layers * tokens * 4 * shape.hidden + _outer_bytes(shape, tokens), (
            f"{shape.layers} layer inputs × {fmt_size(4 * shape.hidden)}/token (checkpointing); "
            f"one layer recomputed: {fmt_size(one_layer / tokens)}/token")
    if s.generated and shape.chunked_loss:  # without the chunked head the loss scores the rows whole
        return _shared_prompt_acts(shape, s, micro_batch, seq_len)
    return shape.layers * one_layer + _outer_bytes(shape, tokens), (
        f"{shape.layers} layers × {fmt_size(one_layer / tokens)}/token × {tokens:,} tokens")


def _shared_prompt_acts(shape: ModelShape, s: Setting, prompts: int, seq_len: int) -> tuple[float, str]:
    """GRPO without checkpointing (``objectives/shared_prompt.py``): each layer saves the ``prompts`` distinct
    prompts of ``seq_len`` tokens once, the group's completions of ``s.generated`` tokens attending over the whole
    sequence, and the prompts' K,V repeated for the group (what the completions' attention keeps)."""
    rows, L = prompts * s.sequences, seq_len + s.generated
    prompt = layer_terms(shape, s, prompts).bytes(prompts * seq_len, seq_len)
    completion = layer_terms(shape, s, rows).bytes(rows * s.generated, L)
    kv = 2 * rows * seq_len * shape.kv_dim * s.act
    outer = _outer_bytes(shape, prompts * seq_len + rows * s.generated)
    return shape.layers * (prompt + completion + kv) + outer, (
        f"{shape.layers} layers × ({prompts} prompts × {seq_len} tokens once + {rows} completions × {s.generated} "
        f"tokens + the prompts' K,V for each completion)")


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class Estimate:
    micro_batch: int
    seq_len: int
    keep: int
    rows: list[Row]
    step_peak: float  # the training step, tensors only: what measure_peak measures (max_memory_allocated)
    eval_peak: float  # an evaluation step (micro-batch × 2, no gradients): measure_peak(evaluation=True)
    overhead: float
    activations_per_token_layer: float

    @property
    def peak(self) -> float:
        """The run's peak of tensor memory: training or evaluation steps, whichever is larger."""
        return max(self.step_peak, self.eval_peak)

    @property
    def total(self) -> float:
        return self.peak + self.overhead


def overhead_bytes(s: Setting, peak: float, recomputed: float = 0.0) -> float:
    """Memory outside the planned tensors: on a GPU the CUDA context and the caching allocator's share of the
    peak; on the CPU the process (``CPU_RUNTIME``) plus, with checkpointing, one more recomputed layer
    (``recomputed``): in backward the heap still holds the previous recomputed layer's freed pages until the next
    trim. Measured (peak RSS − tensor peak, SmolLM2-135M checkpointed at 2,048 / 4,096 / 8,192 tokens): 0.80 / 1.18 /
    1.33 GiB, against 0.85 / 0.97 / 1.25 GiB from this rule (the recomputed layer: 0.10 / 0.22 / 0.50 GiB)."""
    return CUDA_CONTEXT + CUDA_FRAGMENTATION * peak if s.device == "cuda" else CPU_RUNTIME + recomputed


def estimate(shape: ModelShape, s: Setting, micro_batch: int, seq_len: int, answer_fraction: float = 1.0,
             answer_tokens: int | None = None, attended: float | None = None) -> Estimate:
    """Predicted peak memory of one training step with ``micro_batch`` examples of ``seq_len`` tokens.

    Causal LM logits are computed for ``keep`` positions per example: ``answer_tokens`` when known (the longest
    stretch from the first label to the end of an example, from the data), else ``answer_fraction × seq_len``.
    ``attended``: for packed rows on the CPU, the keys per token whose probabilities ``packed_attention`` keeps
    (``activations.attended_pairs`` of the data's example lengths); if not known, the bound: every example as long
    as the row, up to where SDPA's kernel takes over.

    A preference objective puts ``s.sequences`` = 2 sequences per example through the model (chosen and rejected
    in one batch), so every term counts 2 × ``micro_batch`` sequences. Its reference pass (no gradients, at the
    start of a step, when no activations are held) costs what an evaluation step of the same batch does, and the
    evaluation step is twice that batch: it never sets the peak.
    """
    b, L = micro_batch * s.sequences, seq_len + s.generated
    tokens = b * L
    keep = min(L, answer_tokens + 1) if answer_tokens else max(1, math.ceil(answer_fraction * L))
    if s.generated:  # GRPO: the loss is on the sampled completions, after prompts of up to seq_len tokens
        keep = s.generated + 1
    if s.packed:
        # A packed row holds many answers. The data's longest answer says nothing about how many fit in a row, so
        # plan for labels on every position; a stated answer fraction holds for the row as for each example.
        keep = max(1, math.ceil(answer_fraction * L)) if answer_tokens is None else L
    rows = static_rows(shape, s)
    static = sum(r.bytes for r in rows)
    attended = widest_eager(L) if attended is None else attended
    one_layer = layer_terms(shape, s, b).bytes(tokens, L, attended)
    per_token_layer = one_layer / tokens
    acts, act_note = _activations(shape, s, micro_batch, seq_len, one_layer)
    loss, loss_note = _loss_bytes(shape, s, b, keep)
    work, work_note = _backward_working(shape, s, tokens, L)
    # The peak is at the loss's backward (all saved activations + the logit copies), or while a layer
    # backpropagates (with checkpointing: the recomputed layer's activations + its gradients in flight).
    recompute = one_layer if s.gradient_checkpointing else 0.0
    transient = max(loss, recompute + work)
    if shape.task == "causal_lm":  # what chunking and logits_to_keep save over full logits for every position
        loss_note += f" (full logits, all {L} positions: {fmt_size(_loss_bytes(shape, s, b, L, chunked=False)[0])})"
    rows.append(Row("activations", acts, act_note))
    # Not at the same moment: the peak holds the larger of the two.
    rows.append(Row("logits + loss *", loss, loss_note))
    rows.append(Row("backward working set *" + (" (recomputed layer)" if recompute else ""), recompute + work,
                    work_note))
    # Evaluation (before training and periodically) is a peak of its own: 2 × micro-batch, no saved activations.
    # KTO scores a mismatched sequence per row without gradients: evaluation's batch holds both.
    evaluation, eval_note = _eval_bytes(shape, s, EVAL_BATCH_FACTOR * micro_batch * (s.sequences + s.scored), L, keep)
    rows.append(Row("evaluation step *", evaluation, eval_note))
    step_peak, eval_peak = static + acts + transient, static + evaluation
    if s.generated:  # before the forward and backward, nothing else held: a peak of its own
        generation, generation_note = _generation_bytes(shape, s, b, L)
        rows.append(Row("generation (KV cache) *", generation, generation_note))
        step_peak = max(step_peak, static + generation)
    return Estimate(micro_batch, L, keep, rows, step_peak, eval_peak,
                    overhead_bytes(s, max(step_peak, eval_peak), recompute + work if recompute else 0.0),
                    per_token_layer)


def largest_micro_batch(shape: ModelShape, s: Setting, seq_len: int, budget: float, answer_fraction: float = 1.0,
                        answer_tokens: int | None = None, limit: int = 4096) -> int:
    """The largest micro-batch whose predicted peak plus overhead fits ``budget`` (0 if not even one)."""
    def fits(b: int) -> bool:
        return estimate(shape, s, b, seq_len, answer_fraction, answer_tokens).total <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi); memory grows with the batch
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


