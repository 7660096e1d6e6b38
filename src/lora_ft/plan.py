"""Peak training memory from the model's config alone: ``lora-ft plan`` and ``train.micro_batch_size: auto``.

Nothing is loaded but ``config.json``: the model is built on the meta device to count its parameters module by
module, and the rules lora_ft applies when it really loads the model decide what each parameter costs:

- **base weights**: bitsandbytes replaces every backbone ``nn.Linear`` (transformers' own rule, with lora_ft's
  skip list: new task heads, the output embedding, tied weights); NF4/FP4 store 0.5 byte per weight plus one
  absmax per block of 64 (fp32, or 8-bit with a second fp32 level per 256 blocks under double quantization);
  int8 stores 1 byte plus one fp32 scale per output row. Everything else (embeddings, norms, biases, the output
  head) is fp32: unquantized models load in fp32, and ``prepare_model_for_kbit_training`` casts the rest to fp32.
- **trainable**: LoRA A/B in fp32 with a gradient and AdamW's two moments (16 bytes per parameter); new task
  heads the same, plus the frozen original that peft's ``modules_to_save`` keeps.
- **activations**: what autograd saves per token and layer, listed tensor by tensor in ``_decoder_layer`` and
  ``_encoder_layer`` (read from the transformers, peft and bitsandbytes code paths and checked against
  ``torch.autograd.graph.saved_tensors_hooks``), plus the attention terms that grow with the sequence length.
  With gradient checkpointing only each layer's input is kept, and one layer is recomputed at a time.
- **logits**: lora_ft computes logits only for the kept positions (from the first label token to the end of the
  batch, see ``data.Collator``), one chunk of positions at a time (``chunked_loss``); architectures it does not
  chunk hold three fp32 copies of (kept positions × vocabulary).
- **evaluation**: micro-batch × 2 without gradients, a peak of its own.

The prediction is the peak of tensor memory (what ``torch.cuda.max_memory_allocated`` reports); the framework
overhead (CUDA context, allocator slack, or the Python process on the CPU) is added before comparing with a budget.
``measure_peak`` measures the same quantity on this machine, for ``scripts/bench_plan.py`` and the tests. The
terms were checked on the CPU (fp32 and bf16 autocast, with and without checkpointing); the CUDA-only ones (bool
dropout masks, the overhead constants) follow the CUDA code paths and have not been measured on a GPU yet.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch

from .chunked_loss import PLAIN_HEAD_MODELS, chunk_rows
from .config import Recipe, RecipeError, first_line, resolve_compute_dtype

log = logging.getLogger(__name__)

KiB, MiB, GiB = 1024, 1024**2, 1024**3
BLOCK_4BIT = 64  # bitsandbytes Params4bit blocksize (transformers does not change it)
BLOCK_NESTED = 256  # blocks of absmax values per second-level fp32 scale (double quantization)
# Framework memory outside the tensors: the CUDA context and kernels (not seen by max_memory_allocated) plus
# the caching allocator's slack; on the CPU the Python process with torch, transformers and datasets imported.
CUDA_CONTEXT = 0.6 * GiB
CUDA_FRAGMENTATION = 0.06  # of the tensor peak: the caching allocator reserves more than it hands out
CPU_RUNTIME = 1.0 * GiB
# The global batch a recipe with ``micro_batch_size: auto`` and no ``global_batch_size`` keeps:
# ``REFERENCE_MICRO_BATCH × grad_accum × processes`` (the field's default micro-batch).
REFERENCE_MICRO_BATCH = 4
ENCODERS = {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "mpnet", "deberta", "deberta-v2",
            "albert", "ernie", "modernbert", "nomic_bert"}


# ---------------------------------------------------------------------------------------------- sizes
_UNITS = {"": 1, "b": 1, "k": KiB, "kb": KiB, "kib": KiB, "m": MiB, "mb": MiB, "mib": MiB, "g": GiB, "gb": GiB,
          "gib": GiB, "t": 1024**4, "tb": 1024**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """``24GB`` / ``24GiB`` / ``24g`` / ``1500MB`` → bytes. GB is read as GiB, as GPU makers mean it."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise RecipeError(f"--memory {text!r}: give a size such as 24GB, 80GiB or 16000MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_size(n: float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.0f} MiB"
    return f"{n / KiB:.0f} KiB"


# ---------------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class Target:
    """One LoRA target inside a transformer layer (the same in every layer)."""

    name: str  # relative to the layer, e.g. "self_attn.q_proj"
    fan_in: int
    fan_out: int
    role: Literal["attn_in", "attn_out", "mlp_in", "mlp_out"]  # which tensor feeds it (see _decoder_layer)


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs from a model, read from its config and its meta-device skeleton."""

    name: str
    architecture: str
    family: Literal["decoder", "encoder"]
    task: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    attn_dropout: float
    hidden_dropout: float
    max_positions: int | None
    total_params: int
    linear: tuple[tuple[str, int, int, bool], ...]  # every nn.Linear: name, fan_in, fan_out, has bias
    quantizable: frozenset[str]  # names of the Linear layers bitsandbytes would replace
    head_params: int  # new task heads: trained in full (peft modules_to_save)
    lora_modules: tuple[tuple[str, int, int], ...]  # every LoRA target module in the model: name, in, out
    layer_linear: tuple[Target, ...]  # every linear module of one transformer layer (all layers are alike)
    layer_targets: tuple[Target, ...]  # those of them that carry LoRA
    notes: tuple[str, ...] = ()
    chunked_loss: bool = False  # causal LM whose loss goes through ``chunked_loss`` (no full logits)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _cfg(config, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def _layer_list(model: torch.nn.Module, n: int) -> str | None:
    """The name of the ModuleList holding the ``n`` transformer layers."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and name:
            return name
    return None


def _role(rel: str, fan_in: int, shape_hidden: int, intermediate: int) -> str:
    """Which tensor feeds a layer's linear module: the attention input, the attention output, the MLP input
    (after the second norm) or the MLP's activation. Names first (Llama/Mistral/Qwen/Gemma, BERT family,
    GPT-NeoX, Phi), shapes as the fallback."""
    leaf = rel.rsplit(".", 1)[-1]
    if leaf in ("q_proj", "k_proj", "v_proj", "qkv_proj", "query", "key", "value", "query_key_value", "c_attn",
                "Wqkv", "in_proj"):
        return "attn_in"
    if "attn" in rel or "attention" in rel:
        return "attn_out"
    if fan_in == intermediate and fan_in != shape_hidden:
        return "mlp_out"
    if leaf in ("down_proj", "fc2", "dense_4h_to_h", "c_proj", "w2", "Wo"):
        return "mlp_out"
    return "mlp_in"


@lru_cache(maxsize=16)
def _model_shape(source: str, task: str, lora_targets: tuple[str, ...] | str, quant: str,
                 trust_remote_code: bool, revision: str | None) -> ModelShape:
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    from .adapters import linear_modules, resolve_targets
    from .model import _cannot_load, _task_class, new_head_modules, warn_remote_code

    if trust_remote_code:
        warn_remote_code(source)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise _cannot_load(source, e) from None
    heads_new, keep_full = new_head_modules(config, task, source)
    with torch.device("meta"):
        model = _task_class(task).from_config(config, trust_remote_code=trust_remote_code)
    skip = sorted(set(heads_new) | set(keep_full) | set(getattr(model, "_keep_in_fp32_modules", None) or []))
    linear = []
    quantizable = set()
    for name, module in model.named_modules():
        if isinstance(module, Conv1D) or type(module) is torch.nn.Linear:
            fan_in, fan_out = (module.weight.shape if isinstance(module, Conv1D) else module.weight.shape[::-1])
            linear.append((name, int(fan_in), int(fan_out), module.bias is not None))
            if quant != "none" and should_convert_module(name, skip):
                quantizable.add(name)
    head_params = sum(p.numel() for h in heads_new for p in model.get_submodule(h).parameters())
    requested = "auto" if lora_targets == "auto" else list(lora_targets)
    targets = resolve_targets(model, requested, heads_new)
    dims = {n: (i, o) for n, i, o, _ in linear}
    lora_modules = tuple((n, *dims[n]) for n in linear_modules(model, heads_new)
                         if n in dims and any(n == t or n.endswith("." + t) for t in targets))

    n_layers = int(_cfg(config, "num_hidden_layers", "n_layer", "num_layers"))
    hidden = int(_cfg(config, "hidden_size", "n_embd", "d_model"))
    heads = int(_cfg(config, "num_attention_heads", "n_head"))
    head_dim = int(_cfg(config, "head_dim", default=hidden // heads))
    intermediate = int(_cfg(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden))
    notes = []
    layers_name = _layer_list(model, n_layers)
    layer_linear, layer_targets = [], []
    gated = False
    if layers_name:
        prefix = f"{layers_name}.0."
        lora_names = {n for n, _, _ in lora_modules}
        for name, fan_in, fan_out, _ in linear:
            if name.startswith(prefix):
                rel = name[len(prefix):]
                gated |= rel.rsplit(".", 1)[-1] in ("gate_proj", "gate_up_proj", "w1", "wi_0")
                layer_linear.append(Target(rel, fan_in, fan_out, _role(rel, fan_in, hidden, intermediate)))
                if name in lora_names:
                    layer_targets.append(layer_linear[-1])
    else:
        notes.append("transformer layers not found: activations use a generic layer")
    model_type = getattr(config, "model_type", "")
    family = "encoder" if model_type in ENCODERS else "decoder"
    if family == "decoder" and model_type not in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3",
                                                   "olmo", "olmo2", "granite", "smollm3"):
        notes.append(f"activations of '{model_type}' layers are approximated by a Llama-style layer")
    if family == "encoder" and model_type not in ("bert", "roberta", "xlm-roberta", "camembert", "electra"):
        notes.append(f"activations of '{model_type}' layers are approximated by a BERT-style layer")
    return ModelShape(
        name=source, architecture=type(model).__name__, family=family, task=task, layers=n_layers, hidden=hidden,
        heads=heads, kv_heads=int(_cfg(config, "num_key_value_heads", default=heads)), head_dim=head_dim,
        intermediate=intermediate, vocab=int(_cfg(config, "vocab_size")), gated_mlp=gated,
        attn_dropout=float(_cfg(config, "attention_dropout", "attention_probs_dropout_prob", "attn_pdrop",
                                default=0.0) or 0.0),
        hidden_dropout=float(_cfg(config, "hidden_dropout_prob", "hidden_dropout", "resid_pdrop", default=0.0)
                             or 0.0),
        max_positions=_cfg(config, "max_position_embeddings", "n_positions"),
        total_params=sum(p.numel() for p in model.parameters()), linear=tuple(linear),
        quantizable=frozenset(quantizable), head_params=int(head_params), lora_modules=lora_modules,
        layer_linear=tuple(layer_linear), layer_targets=tuple(layer_targets), notes=tuple(notes),
        chunked_loss=task == "causal_lm" and model_type in PLAIN_HEAD_MODELS)


def model_shape(recipe: Recipe, source: str | None = None) -> ModelShape:
    """The recipe's model as the planner sees it (config only; nothing is downloaded but config.json)."""
    from .model import resolve_source

    cfg = recipe.model
    source = source or resolve_source(cfg.name)
    targets = recipe.lora.target_modules
    return _model_shape(source, cfg.task, "auto" if targets == "auto" else tuple(targets), cfg.quant,
                        cfg.trust_remote_code, cfg.revision)


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """How the recipe trains on a device, as far as memory is concerned."""

    device: Literal["cuda", "cpu"]
    quant: str
    double_quant: bool
    compute: str  # fp32 | bf16 | fp16 (accelerate's mixed precision = autocast when not fp32)
    gradient_checkpointing: bool
    r: int
    lora_dropout: float
    use_dora: bool

    @property
    def autocast(self) -> bool:
        return self.compute != "fp32"

    @property
    def act(self) -> int:
        """Bytes of a matmul output: autocast computes in 16 bits, otherwise everything is fp32."""
        return 2 if self.autocast else 4


def setting_for(recipe: Recipe, device: str, bf16_supported: bool = True) -> Setting:
    """``bf16_supported``: planning for a GPU by default assumes one with bf16 (Ampere or newer); training asks
    the GPU it runs on."""
    cuda = device == "cuda"
    gc = recipe.train.gradient_checkpointing
    return Setting(device="cuda" if cuda else "cpu", quant=recipe.model.quant, double_quant=recipe.model.double_quant,
                   compute=resolve_compute_dtype(recipe.model.compute_dtype, cuda, bf16_supported),
                   gradient_checkpointing=cuda if gc == "auto" else bool(gc), r=recipe.lora.r,
                   lora_dropout=recipe.lora.dropout, use_dora=recipe.lora.use_dora)


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
    rows.append(Row("LoRA weights + grads + AdamW", 16 * lora,
                    f"{lora / 1e6:,.2f}M params × (4 + 4 + 8 B), {len(shape.lora_modules)} modules"))
    if shape.head_params:
        rows.append(Row("new task head (trained copy + grads + AdamW)", 16 * shape.head_params,
                        f"{shape.head_params / 1e3:,.1f}K params (modules_to_save)"))
    return rows


# ---------------------------------------------------------------------------------------------- activations
@dataclass
class LayerTerms:
    """Saved activations of one layer: bytes per token, plus the parts that grow with the sequence length."""

    per_token: list[tuple[str, float]] = field(default_factory=list)
    per_token_seq: list[tuple[str, float]] = field(default_factory=list)  # × sequence length (per token)
    per_layer: list[tuple[str, float]] = field(default_factory=list)  # independent of tokens

    def add(self, name: str, nbytes: float) -> None:
        if nbytes:
            self.per_token.append((name, nbytes))

    def bytes(self, tokens: int, seq: int) -> float:
        return (tokens * sum(b for _, b in self.per_token) + tokens * seq * sum(b for _, b in self.per_token_seq)
                + sum(b for _, b in self.per_layer))


def _mask_bytes(s: Setting, dtype_bytes: int) -> int:
    # CUDA's fused dropout saves a bool mask; the CPU path multiplies by a noise tensor of the input's dtype.
    return 1 if s.device == "cuda" else dtype_bytes


def _fused_dropout(s: Setting) -> bool:
    """Whether ``lora_dropout.fuse_lora_dropout`` replaces peft's dropout (vanilla LoRA with dropout)."""
    return s.lora_dropout > 0 and not s.use_dora


def _lora_inputs(t: LayerTerms, s: Setting, targets: list[Target], width: int, dtype: int, shared_saved: bool,
                 what: str) -> None:
    """What the LoRA branches of the targets fed by one tensor (``width`` values of ``dtype`` bytes) save.

    ``shared_saved``: that tensor is saved anyway by someone else (so LoRA's reference costs nothing).
    ``lora_B`` saves ``lora_A``'s output (r values) for every target. With dropout (vanilla LoRA),
    ``lora_dropout.DroppedLinear`` keeps a reference to the input and one bool mask per target. Without
    dropout, peft's ``lora_A`` saves its input; under autocast a 16-bit copy of an fp32 input, one per target
    (autocast's cast cache only covers leaf weights). DoRA keeps peft's unfused dropout: the dropout output
    (or its 16-bit copy) and the mask, per target.
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
    elif cast:
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
    lora_keeps_it = bool(targets) and (_fused_dropout(s) or not (s.lora_dropout or (s.autocast and dtype != s.act)))
    _lora_inputs(t, s, targets, width, dtype, shared_saved=saved_by_other, what=role)
    _base_saves(t, s, [x for x in shape.layer_linear if x.role == role], width, dtype,
                saved_already=saved_by_other or lora_keeps_it, what=role)


def _decoder_layer(shape: ModelShape, s: Setting, batch: int) -> LayerTerms:
    """A pre-norm decoder layer (Llama, Mistral, Qwen, Gemma...): x → RMSNorm → q,k,v → RoPE → SDPA → o → +x →
    RMSNorm → gate, up → SiLU(gate)·up → down → +.

    dtypes: the residual stream is fp32 (embeddings are fp32 in every lora_ft mode) and so are the norm outputs
    (fp32 norm weights); unquantized projections compute in ``s.act`` under autocast; bitsandbytes layers return
    their input's dtype, so projections of fp32 norm outputs stay fp32 when quantized.
    """
    t = LayerTerms()
    h, i, a = shape.hidden, shape.intermediate, s.act
    proj = 4 if (s.quant != "none" or not s.autocast) else a  # dtype of q/k/v/gate/up outputs
    # Norms: RMSNorm saves its input (the residual stream, fp32) and 1/rms (one fp32 per token), twice.
    t.add("residual stream into the two norms (fp32)", 2 * 4 * h)
    t.add("norm statistics (fp32)", 2 * 4)
    # Attention: SDPA (flash / memory-efficient) saves q, k, v, its output and the log-sum-exp per head. With a
    # padding mask (batch > 1) transformers repeats k/v to all heads first (GQA only without a mask).
    # Under autocast SDPA saves 16-bit copies; RoPE's fp32 cos/sin keep q, k fp32 until then.
    kv = shape.q_dim if (batch > 1 and shape.kv_heads != shape.heads) else shape.kv_dim
    t.add("attention q, k, v, output", (2 * shape.q_dim + 2 * kv) * a)
    t.add("attention log-sum-exp (fp32)", 4 * shape.heads)
    if batch > 1:
        # SDPA turns the boolean padding mask into an additive one of the query dtype, saved by every layer.
        t.per_token_seq.append(("attention mask, additive (batch × seq²)", a))
    if shape.attn_dropout > 0 and s.device == "cpu":  # no fused CPU kernel with dropout: see _encoder_layer
        t.per_token_seq.append(("attention probabilities: softmax, mask, dropped", shape.heads * (4 + 2 * a)))
    # LoRA and base layers per input tensor. The attention output is the tensor SDPA saves.
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


def _encoder_layer(shape: ModelShape, s: Setting, batch: int) -> LayerTerms:
    """A post-norm encoder layer (BERT family): x → q,k,v → attention → dense → dropout → +x → LayerNorm →
    intermediate → GELU → output → dropout → + → LayerNorm. The layer input x is the previous LayerNorm's output
    (fp32), so nothing saves it unless LoRA or int8 does."""
    t = LayerTerms()
    h, i, a = shape.hidden, shape.intermediate, s.act
    proj = 4 if (s.quant != "none" or not s.autocast) else a
    math_kernel = shape.attn_dropout > 0 and s.device == "cpu"
    if math_kernel:
        # CPU SDPA has no fused kernel with dropout: the math path saves q, k, v, the softmax output (fp32),
        # the dropout mask and the dropped probabilities, and the output is copied to (batch, seq, hidden).
        t.add("attention q, k, v", 3 * h * a)
        t.per_token_seq.append(("attention probabilities: softmax, mask, dropped", shape.heads * (4 + 2 * a)))
    else:
        t.add("attention q, k, v, output", 4 * h * a)
        t.add("attention log-sum-exp (fp32)", 4 * shape.heads)
        if batch > 1:
            t.per_token_seq.append(("attention mask, additive (batch × seq²)", a))
    if shape.hidden_dropout > 0:
        t.add("hidden dropout masks (2)", 2 * h * _mask_bytes(s, proj))
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


def _backward_working(shape: ModelShape, s: Setting, tokens: int, seq: int) -> tuple[float, str]:
    """Transient memory while a layer backpropagates, on top of its saved tensors (which are freed as their
    nodes run): the fp32 gradients of the residual stream and of the block output in flight, the softmax
    backward's two (batch × heads × seq²) gradients in the math attention kernel, and for quantized layers the
    weight de-quantized for the matmul."""
    grads = tokens * 4 * 2 * shape.hidden
    if shape.family == "encoder" and shape.attn_dropout > 0 and s.device == "cpu":
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
    proj = 4 if (s.quant != "none" or not s.autocast) else s.act
    layer = tokens * (2 * 4 * shape.hidden + (5 if shape.gated_mlp else 3) * shape.intermediate * proj)
    if batch > 1:
        layer += tokens * seq * s.act  # the additive padding mask
    logits = _loss_bytes(shape, s, batch, keep, grad=False)[0]
    return max(logits, layer), f"micro-batch {batch}, no gradients: " + ("logits" if logits >= layer else "one layer")


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


def overhead_bytes(s: Setting, peak: float) -> float:
    return CUDA_CONTEXT + CUDA_FRAGMENTATION * peak if s.device == "cuda" else CPU_RUNTIME


def estimate(shape: ModelShape, s: Setting, micro_batch: int, seq_len: int, answer_fraction: float = 1.0,
             answer_tokens: int | None = None) -> Estimate:
    """Predicted peak memory of one training step with ``micro_batch`` examples of ``seq_len`` tokens.

    Causal LM logits are computed for ``keep`` positions per example: ``answer_tokens`` when known (the longest
    stretch from the first label to the end of an example, from the data), else ``answer_fraction × seq_len``.
    """
    b, L = micro_batch, seq_len
    tokens = b * L
    keep = min(L, answer_tokens + 1) if answer_tokens else max(1, math.ceil(answer_fraction * L))
    rows = static_rows(shape, s)
    static = sum(r.bytes for r in rows)
    lt = layer_terms(shape, s, b)
    one_layer = lt.bytes(tokens, L)
    per_token_layer = one_layer / tokens
    # Outside the layers: the embedding output (and the encoder's embedding LayerNorm), the final norm.
    outer = tokens * 4 * shape.hidden * 2
    if s.gradient_checkpointing:
        # Each checkpointed layer keeps its input (fp32 residual stream); in backward one layer is recomputed,
        # its saved tensors live while its gradients flow.
        kept = shape.layers * tokens * 4 * shape.hidden
        acts = kept + outer
        act_note = (f"{shape.layers} layer inputs × {fmt_size(4 * shape.hidden)}/token (checkpointing); "
                    f"one layer recomputed: {fmt_size(per_token_layer)}/token")
    else:
        acts = shape.layers * one_layer + outer
        act_note = f"{shape.layers} layers × {fmt_size(per_token_layer)}/token × {tokens:,} tokens"
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
    evaluation, eval_note = _eval_bytes(shape, s, 2 * b, L, keep)
    rows.append(Row("evaluation step *", evaluation, eval_note))
    step_peak, eval_peak = static + acts + transient, static + evaluation
    return Estimate(b, L, keep, rows, step_peak, eval_peak, overhead_bytes(s, max(step_peak, eval_peak)),
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


# ---------------------------------------------------------------------------------------------- budgets
def device_memory(device: str) -> int:
    """The memory to plan against: the GPU's total memory, or the machine's physical memory (not what is free
    now, so that a resumed run picks the same micro-batch)."""
    import os

    if device == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError("--device cuda on a machine without a GPU: give the card's size with --memory")
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# ---------------------------------------------------------------------------------------------- auto batch
def _per_process_batch(tc, world: int) -> int:
    """The examples each process contributes to one optimizer step under ``micro_batch_size: auto``."""
    global_batch = tc.global_batch_size or REFERENCE_MICRO_BATCH * tc.grad_accum * world
    if global_batch % world:
        raise RecipeError(f"train.global_batch_size {global_batch} is not a multiple of the {world} processes")
    return global_batch // world


def _fitting_divisor(per_process: int, fit: int) -> int:
    """The largest micro-batch ≤ ``fit`` that divides the per-process batch (0 when nothing fits)."""
    return max((d for d in range(1, min(fit, per_process) + 1) if per_process % d == 0), default=0)


def resolve_auto_micro_batch(recipe: Recipe, world: int, device: str, budget: float | None = None,
                             answer_tokens: int | None = None, source: str | None = None,
                             bf16_supported: bool = True) -> Recipe:
    """``train.micro_batch_size: auto`` → the largest micro-batch the planner fits into ``budget`` at
    ``data.max_length``, with ``grad_accum`` derived so that the global batch stays the recipe's:

    - ``train.global_batch_size`` when given;
    - otherwise ``4 × grad_accum × processes`` (what the recipe would train with the default micro-batch 4).

    The micro-batch is the largest that fits *and* divides the global batch per process. Recipes with an int
    micro_batch_size are returned unchanged.
    """
    tc = recipe.train
    if tc.micro_batch_size != "auto":
        return recipe
    shape = model_shape(recipe, source)
    s = setting_for(recipe, device, bf16_supported)
    budget = device_memory(device) if budget is None else budget
    seq = recipe.data.max_length
    fit = largest_micro_batch(shape, s, seq, budget, answer_tokens=answer_tokens)
    if fit == 0:
        need = estimate(shape, s, 1, seq, answer_tokens=answer_tokens).total
        raise RecipeError(
            f"train.micro_batch_size auto: one example of data.max_length {seq} needs {fmt_size(need)}, more than the "
            f"{fmt_size(budget)} of this {device}; lower data.max_length, use model.quant nf4 or turn on "
            "train.gradient_checkpointing")
    per_process = _per_process_batch(tc, world)
    micro = _fitting_divisor(per_process, fit)
    log.info("micro_batch_size auto: %d (largest that fits %s at max_length %d: %d; global batch %d = %d × %d × %d)",
             micro, fmt_size(budget), seq, fit, per_process * world, micro, per_process // micro, world)
    tc = tc.model_copy(update={"micro_batch_size": micro, "grad_accum": per_process // micro,
                               "global_batch_size": tc.global_batch_size})
    return recipe.model_copy(update={"train": tc})


def resolve_auto_checkpointing(recipe: Recipe, world: int, device: str, budget: float,
                               answer_tokens: int | None = None, source: str | None = None,
                               bf16_supported: bool = True) -> Recipe:
    """``train.gradient_checkpointing: auto`` → on only when memory needs it: recomputing every layer costs about
    a third more compute, so it is worth it only when the step does not fit without it, or (with an ``auto``
    micro-batch) when it lets a larger micro-batch of the global batch fit."""
    tc = recipe.train
    if tc.gradient_checkpointing != "auto":
        return recipe
    shape = model_shape(recipe, source)
    s = setting_for(recipe, device, bf16_supported)
    on, off = replace(s, gradient_checkpointing=True), replace(s, gradient_checkpointing=False)
    seq = recipe.data.max_length
    if tc.micro_batch_size == "auto":
        per_process = _per_process_batch(tc, world)
        fits = {x: _fitting_divisor(per_process, largest_micro_batch(shape, x, seq, budget,
                                                                     answer_tokens=answer_tokens))
                for x in (on, off)}
        need = fits[on] > fits[off]
        why = f"micro-batch {fits[off]} without, {fits[on]} with it"
    else:
        peak = estimate(shape, off, tc.micro_batch_size, seq, answer_tokens=answer_tokens).total
        need = peak > budget
        why = f"without it the step needs {fmt_size(peak)}"
    log.info("gradient_checkpointing auto: %s (%s; %s of %s)", "on" if need else "off", why, fmt_size(budget), device)
    return recipe.model_copy(update={"train": tc.model_copy(update={"gradient_checkpointing": need})})


def answer_tokens_of(dataset) -> int | None:
    """The longest stretch from the first label token to the end of an example (what ``logits_to_keep``
    covers in the worst batch), from tokenized causal LM data."""
    if "labels" not in dataset.column_names or not len(dataset):
        return None
    longest = 0
    for labels in dataset["labels"]:
        if not isinstance(labels, list):
            return None
        first = next((k for k, v in enumerate(labels) if v != -100), len(labels))
        longest = max(longest, len(labels) - first)
    return longest


def answer_tokens_from_data(recipe: Recipe) -> int | None:
    """``answer_tokens_of`` the recipe's training split (tokenized as ``setup`` will, which reuses the datasets
    cache); None for classifiers. Without data the planner assumes the worst case: loss on every position."""
    if recipe.model.task != "causal_lm" or not recipe.data.train:
        return None
    from .data import prepare_data
    from .model import load_tokenizer, resolve_source

    tok = load_tokenizer(resolve_source(recipe.model.name), recipe.model)
    cfg = recipe.data.model_copy(update={"validation": None, "test": None, "validation_split": 0.0})
    return answer_tokens_of(prepare_data(cfg, "causal_lm", tok, recipe.train.seed).splits["train"])


def resolve_for_launch(recipe: Recipe, accelerator) -> Recipe:
    """``train()``'s step for the ``auto`` memory settings (``gradient_checkpointing``, then ``micro_batch_size``):
    plan against this process's device (its GPU's total memory, or the machine's RAM) with the data's longest
    answer, before any loader is built. The resolved values go to ``run_config.yaml``."""
    tc = recipe.train
    if tc.micro_batch_size != "auto" and tc.gradient_checkpointing != "auto":
        return recipe
    device = accelerator.device.type
    if device not in ("cuda", "cpu"):
        if tc.micro_batch_size == "auto":
            raise RecipeError(f"train.micro_batch_size auto plans for CUDA GPUs and the CPU, not {device}; "
                              "give a number")
        return recipe  # gradient_checkpointing auto keeps its device default (session.setup)
    from .model import resolve_source

    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    budget, world = device_memory(device), accelerator.num_processes
    with accelerator.main_process_first():  # as in session.setup: one rank fetches/converts example or GGUF models
        source = resolve_source(recipe.model.name)
    if tc.micro_batch_size != "auto":
        try:
            # A fixed micro-batch that fits with loss on every position needs no pass over the data.
            worst = resolve_auto_checkpointing(recipe, world, device, budget, source=source, bf16_supported=bf16)
            if not worst.train.gradient_checkpointing:
                return worst
            answer = answer_tokens_from_data(recipe)
            return resolve_auto_checkpointing(recipe, world, device, budget, answer, source, bf16)
        except RecipeError:
            raise
        except Exception as e:  # noqa: BLE001 - an architecture the planner cannot build must still train
            log.warning("gradient_checkpointing auto: cannot plan this model (%s); using the device default",
                        first_line(e))
            return recipe
    answer = answer_tokens_from_data(recipe)
    recipe = resolve_auto_checkpointing(recipe, world, device, budget, answer, source, bf16)
    return resolve_auto_micro_batch(recipe, world, device, budget, answer, source, bf16)


# ---------------------------------------------------------------------------------------------- report
def plan_report(recipe: Recipe, device: str, memory: int | None, answer_fraction: float = 1.0,
                seq_len: int | None = None, micro_batch: int | None = None) -> str:
    """``lora-ft plan``: the breakdown for the recipe's micro-batch × max_length, and what fits the budget."""
    shape = model_shape(recipe)
    budget = memory if memory is not None else device_memory(device)
    seq = seq_len or recipe.data.max_length
    if micro_batch and recipe.train.micro_batch_size == "auto":
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"micro_batch_size": micro_batch})})
    # As training decides it (resolve_for_launch), with the answer fraction standing in for the data.
    recipe = resolve_auto_checkpointing(recipe, 1, device, budget, max(1, math.ceil(answer_fraction * seq)) - 1 or None)
    s = setting_for(recipe, device)
    mb = micro_batch or (recipe.train.micro_batch_size if recipe.train.micro_batch_size != "auto" else None)
    if mb is None:
        mb = max(1, largest_micro_batch(shape, s, seq, budget, answer_fraction))
    e = estimate(shape, s, mb, seq, answer_fraction)
    quant = s.quant + (" + double quant" if s.quant in ("nf4", "fp4") and s.double_quant else "")
    lines = [
        f"{Path(shape.name).name or shape.name}: {shape.architecture}, {shape.total_params / 1e9:.2f}B parameters, "
        f"{shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}",
        f"quant {quant}; LoRA r={s.r} on {len(shape.layer_targets)} modules per layer; {s.device}, compute "
        f"{s.compute}, gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}",
        f"micro-batch {mb} × sequence {seq}"
        + (f"; logits for the last {e.keep} positions ({answer_fraction:.0%} of the sequence, --answer-fraction)"
           if shape.task == "causal_lm" else ""),
        "",
    ]
    width = max(len(r.label) for r in e.rows) + 2
    lines.append(f"{'component':<{width}}{'memory':>11}   note")
    for r in e.rows:
        lines.append(f"{r.label:<{width}}{fmt_size(r.bytes):>11}   {r.note}")
    peak_what = "torch.cuda.max_memory_allocated" if s.device == "cuda" else "tensor memory"
    over_what = "CUDA context + allocator slack" if s.device == "cuda" else "Python, torch and libraries"
    which = (f"the training step (evaluation: {fmt_size(e.eval_peak)})" if e.step_peak >= e.eval_peak
             else f"the evaluation step (training step: {fmt_size(e.step_peak)})")
    lines.append(f"{'peak (' + peak_what + ')':<{width}}{fmt_size(e.peak):>11}   {which}")
    lines.append(f"{'framework overhead':<{width}}{fmt_size(e.overhead):>11}   {over_what}")
    verdict = "fits" if e.total <= budget else "does NOT fit"
    lines.append(f"{'total':<{width}}{fmt_size(e.total):>11}   {verdict} in {fmt_size(budget)}")
    other = estimate(shape, replace(s, gradient_checkpointing=not s.gradient_checkpointing), mb, seq, answer_fraction)
    lines.append("* not at the same time: the training step holds the activations + the larger of logits and")
    lines.append("  working set; the evaluation step holds the weights and its own row.")
    lines.append(f"Gradient checkpointing {'off' if s.gradient_checkpointing else 'on'} would make the peak "
                 f"{fmt_size(other.peak)}.")
    lines.append("")
    lines.append(f"largest micro-batch that fits {fmt_size(budget)}, by sequence length:")
    lengths = sorted({2**k for k in range(7, 16) if 2**k <= max(seq, shape.max_positions or seq)} | {seq})
    cells = [f"{n}: {largest_micro_batch(shape, s, n, budget, answer_fraction)}" for n in lengths]
    lines.append("  " + " | ".join(cells))
    notes = list(shape.notes)
    if s.use_dora:
        notes.append("DoRA's weight-norm computation is not counted in the activations (the plan is low)")
    for note in notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def plan_command(recipe: Recipe, args) -> str:
    if not 0 < args.answer_fraction <= 1:
        raise RecipeError(f"--answer-fraction {args.answer_fraction}: give a fraction in (0, 1]")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    memory = parse_size(args.memory) if args.memory is not None else None
    return plan_report(recipe, device, memory, args.answer_fraction, args.seq_len, args.micro_batch)


# ---------------------------------------------------------------------------------------------- measuring
def _held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the distinct tensor storages the model and optimizer hold: parameters, buffers, bitsandbytes'
    quantization state (absmax, code books, int8 row scales) and the optimizer state."""
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    for module in model.modules():
        for p in module.parameters(recurse=False):
            add(p)
            qs = getattr(p, "quant_state", None)
            while qs is not None:
                for k in ("absmax", "code", "offset"):
                    add(getattr(qs, k, None))
                qs = getattr(qs, "state2", None)
            add(getattr(p, "SCB", None))
        for b in module.buffers(recurse=False):
            add(b)
        state = getattr(module, "state", None)
        for k in ("CB", "SCB"):
            add(getattr(state, k, None))
    if optimizer is not None:
        for st in optimizer.state.values():
            for v in st.values():
                add(v)
    seen.pop(0, None)
    return sum(seen.values())


def synthetic_batch(tokenizer, causal: bool, micro_batch: int, seq_len: int, answer_fraction: float, seed: int = 0):
    """A training batch as ``data.Collator`` builds it: random tokens, the last example 8 tokens shorter (so the
    batch carries padding, as length-grouped real batches do), labels on the last ``answer_fraction`` of each."""
    from .data import IGNORE, Collator

    g = torch.Generator().manual_seed(seed)
    rows = []
    low = min(1000, max(tokenizer.vocab_size - 1, 2))
    for k in range(micro_batch):
        n = seq_len - (8 if k == micro_batch - 1 and micro_batch > 1 else 0)
        ids = torch.randint(1, low, (n,), generator=g).tolist()
        if causal:
            answer = max(2, math.ceil(answer_fraction * n))
            rows.append({"input_ids": ids, "labels": [IGNORE] * (n - answer) + ids[n - answer:]})
        else:
            rows.append({"input_ids": ids, "attention_mask": [1] * n, "labels": k % 2})
    return Collator(tokenizer.pad_token_id, causal)(rows)


def measure_peak(recipe: Recipe, micro_batch: int, seq_len: int, answer_fraction: float = 1.0,
                 evaluation: bool = False) -> dict[str, float]:
    """Peak tensor memory of a training step, measured on this machine.

    The model is loaded and prepared as ``lora-ft train`` does (``load_model``, ``attach_adapters``, accelerate
    with the recipe's precision), then two steps run (forward, backward, gradient clipping, AdamW, zero_grad):
    the second is measured, so the optimizer state exists as it does for every later step (the first is a
    small one: it only has to create that state).

    - CUDA: ``torch.cuda.max_memory_allocated`` over the second step.
    - CPU: the bytes held before the step (distinct storages of parameters, buffers, quantization state and
      optimizer state) + the peak of the net allocations during the step, read from the profiler's CPU
      allocator events (``profile_memory=True``: every allocation and free with its size). Unlike RSS this
      ignores the allocator's cache, the Python heap and memory-mapped checkpoint files, so it is the CPU
      counterpart of ``max_memory_allocated``.

    ``evaluation``: measure an evaluation step instead (no gradients, as ``evaluate_loader`` runs it), on
    ``micro_batch`` examples.

    Meant for a process of its own (``scripts/bench_plan.py`` runs one per configuration): it resets
    accelerate's process state before and after.
    """
    from accelerate.state import AcceleratorState

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        # accelerate's process state is a singleton that refuses a second precision: each measurement sets
        # its recipe's own, and leaves none behind (see the finally below).
        AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return _measure(recipe, micro_batch, seq_len, answer_fraction, evaluation)
    finally:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            AcceleratorState._reset_state(reset_partial_state=True)


def _measure(recipe: Recipe, micro_batch: int, seq_len: int, answer_fraction: float,
             evaluation: bool) -> dict[str, float]:
    import gc

    from .adapters import attach_adapters
    from .evaluation import causal_loss, classification_logits, train_loss
    from .model import load_model, load_tokenizer, resolve_source
    from .session import make_accelerator

    accelerator, compute = make_accelerator(recipe)
    cfg = recipe.model
    source = resolve_source(cfg.name)
    tok = load_tokenizer(source, cfg)
    causal = cfg.task == "causal_lm"
    device = accelerator.device
    loaded = load_model(cfg.model_copy(update={"name": source}), compute, device,
                        None if causal else {0: "a", 1: "b"}, tok)
    gc_on = recipe.train.gradient_checkpointing
    model = attach_adapters(loaded.model, recipe.lora, cfg.task, loaded.head_modules,
                            (device.type == "cuda") if gc_on == "auto" else bool(gc_on))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    def on_device(batch: dict) -> dict:
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    batch = on_device(synthetic_batch(tok, causal, micro_batch, seq_len, answer_fraction))

    def step(batch: dict, evaluation: bool = False) -> None:
        if evaluation:  # as evaluate_loader runs it
            model.eval()
            with torch.no_grad():
                (causal_loss if causal else classification_logits)(model, batch)
            model.train()
            return
        loss, n = train_loss(model, batch, causal)
        accelerator.backward(loss / n)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(on_device(synthetic_batch(tok, causal, 1, 16, 0.5)))  # a small first step creates the AdamW state
    gc.collect()
    held = _held_bytes(model, optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(batch, evaluation)
        torch.cuda.synchronize()
        return {"held": held, "step": torch.cuda.max_memory_allocated() - before,
                "peak": float(torch.cuda.max_memory_allocated())}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(batch, evaluation)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    net = top = 0
    for e in events:
        net += e.nbytes()
        top = max(top, net)
    return {"held": held, "step": top, "peak": float(held + top)}
