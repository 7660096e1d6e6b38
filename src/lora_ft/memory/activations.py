"""Saved activations of one transformer layer, tensor by tensor: what autograd keeps per token for the backward.

Read from the transformers, peft and bitsandbytes code paths and checked against
``torch.autograd.graph.saved_tensors_hooks``; the encoder (BERT family) and decoder (Llama family) layers are
listed separately, and the LoRA branches according to ``lora_dropout.py``'s fused dropout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..modeling.model_dropout import sdpa_math_kernel
from ..modeling.packed_attention import aligned, eager
from .shape import ModelShape, Setting, Target


# ---------------------------------------------------------------------------------------------- activations
@dataclass
class LayerTerms:
    """Saved activations of one layer: bytes per token, plus the parts that grow with the sequence length."""

    per_token: list[tuple[str, float]] = field(default_factory=list)
    per_token_seq: list[tuple[str, float]] = field(default_factory=list)  # × sequence length (per token)
    per_token_pair: list[tuple[str, float]] = field(default_factory=list)  # × the pairs a token attends, see bytes
    per_layer: list[tuple[str, float]] = field(default_factory=list)  # independent of tokens

    def add(self, name: str, nbytes: float) -> None:
        if nbytes:
            self.per_token.append((name, nbytes))

    def bytes(self, tokens: int, seq: int, pairs: float | None = None) -> float:
        """``pairs``: the keys a token's packed attention keeps probabilities for, on average (``attended_pairs``);
        ``seq`` if None."""
        pairs = seq if pairs is None else pairs
        return (tokens * sum(b for _, b in self.per_token) + tokens * seq * sum(b for _, b in self.per_token_seq)
                + tokens * pairs * sum(b for _, b in self.per_token_pair) + sum(b for _, b in self.per_layer))


def _mask_bytes(s: Setting, dtype_bytes: int) -> int:
    # CUDA's fused dropout saves a bool mask; the CPU path multiplies by a noise tensor of the input's dtype.
    return 1 if s.device == "cuda" else dtype_bytes


def _fused_dropout(s: Setting) -> bool:
    """Whether ``lora_dropout.fuse_lora_dropout`` replaces peft's dropout (vanilla LoRA with dropout)."""
    return s.lora_dropout > 0 and not s.use_dora


def _fused_layer(s: Setting) -> bool:
    """Whether ``fused_lora.fuse_lora_layers`` runs the targets' whole forward (vanilla LoRA on unquantized or
    4-bit layers; int8 and DoRA keep peft's; GPT-2's transposed Conv1D layers too, which the plan does not tell)."""
    return not s.use_dora and s.quant != "int8"


def _math_probabilities(t: LayerTerms, shape: ModelShape) -> None:
    """SDPA's math kernel (``sdpa_math_kernel``) keeps the softmax output, the dropout mask and the dropped
    probabilities, all fp32 (it casts 16-bit inputs up: saved-tensor hooks on a bf16 MiniLM step show it)."""
    t.per_token_seq.append(("attention probabilities: softmax, mask, dropped (fp32)", shape.heads * 3 * 4))


def _proj_bytes(shape: ModelShape, s: Setting, role: str) -> int:
    """Bytes per value of what the linear modules fed by ``role``'s tensor output: 16 bits under autocast where
    each is unquantized or a 4-bit LoRA target on the fused layer (which returns the autocast dtype), else fp32
    (fp32 training; int8 layers and 4-bit layers without the fused layer cast back to their fp32 input's dtype)."""
    if not s.autocast:
        return 4
    if s.quant == "none":
        return s.act
    targets = {x.name for x in shape.layer_targets if x.role == role}
    base = [x for x in shape.layer_linear if x.role == role]
    return s.act if _fused_layer(s) and base and all(x.name in targets for x in base) else 4


def _lora_inputs(t: LayerTerms, s: Setting, targets: list[Target], width: int, dtype: int, shared_saved: bool,
                 what: str) -> None:
    """What the LoRA branches of the targets fed by one tensor (``width`` values of ``dtype`` bytes) save.

    ``shared_saved``: that tensor is saved anyway by someone else (so LoRA's reference costs nothing).
    ``lora_B`` (or the fused layer) saves ``lora_A``'s output (r values) for every target. The fused layer
    (``fused_lora.py``) and, with dropout, ``lora_dropout.DroppedLinear`` keep a reference to the input and, with
    dropout, one bool mask per target. Without dropout, peft's ``lora_A`` saves its input; under autocast a 16-bit
    copy of an fp32 input, one per target (autocast's cast cache only covers leaf weights). DoRA keeps peft's
    unfused dropout: the dropout output (or its 16-bit copy) and the mask, per target.
    """
    if not targets:
        return
    cast = s.autocast and dtype != s.act
    saved_dtype = s.act if cast else dtype
    for tg in targets:
        t.add(f"{tg.name}: lora_A output", s.r * s.act)
    if s.lora_dropout > 0 and not _fused_dropout(s):
        t.add(f"{what}: dropout masks ({len(targets)})", len(targets) * width * _mask_bytes(s, dtype))
        t.add(f"{what}: dropout outputs saved by lora_A ({len(targets)})", len(targets) * width * saved_dtype)
        return
    if _fused_dropout(s):
        t.add(f"{what}: dropout masks, bool ({len(targets)})", len(targets) * width)
    elif cast and not _fused_layer(s):
        t.add(f"{what}: 16-bit copies saved by lora_A ({len(targets)})", len(targets) * width * s.act)
        return
    if not shared_saved:
        t.add(f"{what}: saved by lora_A", width * dtype)


def _base_saves(t: LayerTerms, s: Setting, base: list[Target], width: int, dtype: int, saved_already: bool,
                what: str) -> None:
    """What the frozen base linear layers fed by one tensor save (with or without LoRA on them).

    - unquantized, fp32: nothing (a frozen weight needs no input to pass the gradient back);
    - unquantized under autocast: the 16-bit copy of the *weight* that autocast made (independent of tokens);
    - int8: bitsandbytes keeps the input itself (``ctx.A`` / ``ctx.tensors``), once per input tensor, unless
      it is ``saved_already``;
    - 4-bit: nothing (the weight is de-quantized again in backward).
    """
    if not base:
        return
    if s.quant == "none" and s.autocast:
        t.per_layer.append((f"{what}: 16-bit weight copies kept by autocast",
                            2 * sum(x.fan_in * x.fan_out for x in base)))
    if s.quant == "int8" and not saved_already:
        t.add(f"{what}: input kept by int8 matmul", width * dtype)


def _inputs(t: LayerTerms, s: Setting, shape: ModelShape, role: str, width: int, dtype: int,
            saved_by_other: bool) -> None:
    """One input tensor of a layer and every linear module it feeds: LoRA's and the base layers' saves."""
    targets = [x for x in shape.layer_targets if x.role == role]
    # LoRA saves the very tensor (fused dropout, or no dropout and no cast): the base layers' reference is free.
    lora_keeps_it = bool(targets) and (_fused_dropout(s) or _fused_layer(s)
                                       or not (s.lora_dropout or (s.autocast and dtype != s.act)))
    _lora_inputs(t, s, targets, width, dtype, shared_saved=saved_by_other, what=role)
    _base_saves(t, s, [x for x in shape.layer_linear if x.role == role], width, dtype,
                saved_already=saved_by_other or lora_keeps_it, what=role)


def _decoder_layer(shape: ModelShape, s: Setting, batch: int) -> LayerTerms:
    """A pre-norm decoder layer (Llama, Mistral, Qwen, Gemma...): x → RMSNorm → q,k,v → RoPE → SDPA → o → +x →
    RMSNorm → gate, up → SiLU(gate)·up → down → +.

    dtypes: the residual stream is fp32 (embeddings are fp32 in every lora_ft mode) and so are the norm outputs
    (fp32 norm weights); projections compute in ``s.act`` under autocast and hand it on, except quantized layers
    off the fused path, which return their input's dtype (``_proj_bytes``).
    """
    t = LayerTerms()
    h, i, a = shape.hidden, shape.intermediate, s.act
    proj = _proj_bytes(shape, s, "mlp_in")  # dtype of gate/up outputs
    # Norms: RMSNorm saves its input (the residual stream, fp32) and 1/rms (one fp32 per token), twice.
    t.add("residual stream into the two norms (fp32)", 2 * 4 * h)
    t.add("norm statistics (fp32)", 2 * 4)
    if s.packed and s.device == "cpu":
        _packed_attention(t, shape, s)
    else:
        _sdpa(t, shape, s, batch)
    # LoRA and base layers per input tensor. The attention output is the tensor SDPA saves (and what the packed
    # path's o_proj input is counted with).
    _inputs(t, s, shape, "attn_in", h, 4, False)
    _inputs(t, s, shape, "attn_out", shape.q_dim, a, True)
    _inputs(t, s, shape, "mlp_in", h, 4, False)
    # MLP: gate and up outputs, SiLU(gate) (saved by the product) — all of the projection dtype.
    if shape.gated_mlp:
        t.add("MLP gate, up, act(gate)", 3 * i * proj)
    else:
        t.add("MLP fc1 output (saved by the activation)", i * proj)
    _inputs(t, s, shape, "mlp_out", i, proj, False)
    return t


def attended_pairs(lengths: Sequence[int]) -> float:
    """Keys per token whose probabilities ``packed_attention`` keeps, for examples of these lengths packed: Σ n × its
    ``aligned`` width over the examples attended eagerly (each token attends its whole bucket), divided by all tokens
    (longer examples go through SDPA's kernel, which keeps none). Buckets shared with longer examples are left out."""
    n = np.asarray(lengths, dtype=np.int64)
    width = aligned(n)
    kept = eager(width)
    return float((n[kept] * width[kept]).sum() / max(int(n.sum()), 1))


def _packed_attention(t: LayerTerms, shape: ModelShape, s: Setting) -> None:
    """``modeling/packed_attention.py`` on packed CPU rows: the matmuls keep the gathered q (16-bit under autocast,
    as RoPE's fp32 outputs are cast for the product), k and v (not repeated), the o_proj input is the output, and
    per pair of a segment's bucket (``LayerTerms.bytes``'s ``pairs``) the fp32 softmax output and, under
    autocast, its 16-bit copy for the product, per head. Checked with saved-tensor hooks on a tiny Llama."""
    a = s.act
    t.add("attention q, k, v (per example), output", (2 * shape.q_dim + 2 * shape.kv_dim) * a)
    t.per_token_pair.append(("attention probabilities: fp32 softmax" + (", 16-bit copy" if s.autocast else ""),
                             shape.heads * (4 + (a if s.autocast else 0))))


def _sdpa(t: LayerTerms, shape: ModelShape, s: Setting, batch: int) -> None:
    """SDPA (flash / memory-efficient) saves q, k, v, its output and the log-sum-exp per head. With a mask
    (padding when batch > 1, example boundaries when packed) transformers repeats k/v to all heads first (GQA only
    without a mask). Under autocast SDPA saves 16-bit copies; RoPE's fp32 cos/sin keep q, k fp32."""
    a = s.act
    masked = batch > 1 or s.packed
    kv = shape.q_dim if (masked and shape.kv_heads != shape.heads) else shape.kv_dim
    t.add("attention q, k, v, output", (2 * shape.q_dim + 2 * kv) * a)
    t.add("attention log-sum-exp (fp32)", 4 * shape.heads)
    if masked:
        # SDPA turns the boolean mask into an additive one of the query dtype, saved by every layer.
        t.per_token_seq.append(("attention mask, additive (batch × seq²)", a))
    if sdpa_math_kernel(shape.attn_dropout, s.device):
        _math_probabilities(t, shape)


def _encoder_layer(shape: ModelShape, s: Setting, batch: int) -> LayerTerms:
    """A post-norm encoder layer (BERT family): x → q,k,v → attention → dense → dropout → +x → LayerNorm →
    intermediate → GELU → output → dropout → + → LayerNorm. The layer input x is the previous LayerNorm's output
    (fp32), so nothing saves it unless LoRA or int8 does."""
    t = LayerTerms()
    h, i, a = shape.hidden, shape.intermediate, s.act
    proj = _proj_bytes(shape, s, "mlp_in")  # dtype of the intermediate layer's output
    math_kernel = sdpa_math_kernel(shape.attn_dropout, s.device)
    if math_kernel:
        # The math kernel saves fp32 q, k, v and the probabilities, and its output is copied to (batch, seq,
        # hidden).
        t.add("attention q, k, v (fp32)", 3 * h * 4)
        _math_probabilities(t, shape)
    else:
        t.add("attention q, k, v, output", 4 * h * a)
        t.add("attention log-sum-exp (fp32)", 4 * shape.heads)
        if batch > 1:
            t.per_token_seq.append(("attention mask, additive (batch × seq²)", a))
    if shape.hidden_dropout > 0:  # model_dropout.MaskedDropout on the CPU, CUDA's fused dropout: bool masks
        t.add("hidden dropout masks, bool (2)", 2 * h)
    t.add("LayerNorm inputs (fp32) and statistics", 2 * (4 * h + 8))
    t.add("GELU input", i * proj)
    # The fused kernels' output is laid out (batch, seq, heads, dim): the attention output is the saved one;
    # the math kernel's is copied into that layout.
    _inputs(t, s, shape, "attn_in", h, 4, False)
    _inputs(t, s, shape, "attn_out", h, a, not math_kernel)
    _inputs(t, s, shape, "mlp_in", h, 4, False)
    _inputs(t, s, shape, "mlp_out", i, proj, False)
    return t


def layer_terms(shape: ModelShape, s: Setting, batch: int) -> LayerTerms:
    return (_encoder_layer if shape.family == "encoder" else _decoder_layer)(shape, s, batch)


