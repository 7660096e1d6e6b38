"""What the planner knows before anything is loaded: the model's shape from its config and meta-device skeleton,
and the training setting that decides what each parameter and activation costs.

Nothing is loaded but ``config.json``: the model is built on the meta device to count its parameters module by
module. ``estimate.py`` turns a shape and a setting into bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.quantizers_utils import should_convert_module

from ..errors import UsageError
from ..modeling.adapters import linear_modules, resolve_targets, unused_modules
from ..modeling.loading import auto_class, load_config, new_head_modules, remote_code, resolve_source
from ..modeling.model_dropout import attention_dropout
from ..modeling.precision import resolve_compute_dtype
from ..objectives.causal_lm import PACKING_MODELS
from ..objectives.chunked_loss import PLAIN_HEAD_MODELS
from ..recipe import ModelConfig, Recipe

KiB, MiB, GiB = 1024, 1024**2, 1024**3
BLOCK_4BIT = 64  # bitsandbytes Params4bit blocksize (transformers does not change it)
BLOCK_NESTED = 256  # blocks of absmax values per second-level fp32 scale (double quantization)
# Framework memory outside the tensors: the CUDA context and kernels (not seen by max_memory_allocated) plus
# the caching allocator's slack; on the CPU the Python process with torch, transformers and datasets imported.
CUDA_CONTEXT = 0.6 * GiB
CUDA_FRAGMENTATION = 0.06  # of the tensor peak: the caching allocator reserves more than it hands out
CPU_RUNTIME = 0.75 * GiB
"""The CPU process beside its tensors: the libraries (0.57-0.61 GiB measured before a model loads) and the heap the
allocator keeps. Measured (``scripts/bench_scale.py``, bf16 compute, 2026-12-06) as peak RSS − the planner's tensor
peak on steps without checkpointing: 0.71 / 0.82 / 0.71 GiB (SmolLM2-135M at 256 / 512 / 1,024 tokens), 1.03
(Llama-3.2-1B, 2,048), 0.81 (Llama-3.2-3B, 512). It was 1.0 GiB, which put the smallest job 21% high.
Checkpointed steps keep more: ``estimate.overhead_bytes``."""
ENCODERS = {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "mpnet", "deberta", "deberta-v2",
            "albert", "ernie", "modernbert", "nomic_bert"}



# ---------------------------------------------------------------------------------------------- sizes
_UNITS = {"": 1, "b": 1, "k": KiB, "kb": KiB, "kib": KiB, "m": MiB, "mb": MiB, "mib": MiB, "g": GiB, "gb": GiB,
          "gib": GiB, "t": 1024**4, "tb": 1024**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """``24GB`` / ``24GiB`` / ``24g`` / ``1500MB`` → bytes. GB is read as GiB, as GPU makers mean it."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"--memory {text!r}: give a size such as 24GB, 80GiB or 16000MB")
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
    head_shapes: tuple[tuple[int, ...], ...] = ()  # the new heads' parameters (their optimizer state's shapes)

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


def _one_layer(model: torch.nn.Module, n_layers: int, linear: list[tuple[str, int, int, bool]], lora_names: set[str],
               hidden: int, intermediate: int) -> tuple[list[Target], list[Target], bool]:
    """The linear modules of the first transformer layer (all are alike), those that carry LoRA, and whether the
    MLP is gated; empty when the layer list is not found."""
    layers_name = _layer_list(model, n_layers)
    layer_linear, layer_targets, gated = [], [], False
    if not layers_name:
        return layer_linear, layer_targets, gated
    prefix = f"{layers_name}.0."
    for name, fan_in, fan_out, _ in linear:
        if name.startswith(prefix):
            rel = name[len(prefix):]
            gated |= rel.rsplit(".", 1)[-1] in ("gate_proj", "gate_up_proj", "w1", "wi_0")
            layer_linear.append(Target(rel, fan_in, fan_out, _role(rel, fan_in, hidden, intermediate)))
            if name in lora_names:
                layer_targets.append(layer_linear[-1])
    return layer_linear, layer_targets, gated


@lru_cache(maxsize=16)
def _model_shape(source: str, task: str, lora_targets: tuple[str, ...] | str, quant: str,
                 trust_remote_code: bool, revision: str | None) -> ModelShape:
    config = load_config(source, ModelConfig(name=source, task=task, quant=quant, trust_remote_code=trust_remote_code,
                                             revision=revision))
    if task == "reward":  # the head is one scalar (classifiers are planned with the config's labels)
        config.num_labels = 1
    heads_new, keep_full = new_head_modules(config, task, source, revision, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = auto_class(task).from_config(config, **remote_code(trust_remote_code, source))
    skip = sorted(set(heads_new) | set(keep_full) | set(getattr(model, "_keep_in_fp32_modules", None) or []))
    linear = []
    quantizable = set()
    for name, module in model.named_modules():
        if isinstance(module, Conv1D) or type(module) is torch.nn.Linear:
            fan_in, fan_out = (module.weight.shape if isinstance(module, Conv1D) else module.weight.shape[::-1])
            linear.append((name, int(fan_in), int(fan_out), module.bias is not None))
            if quant != "none" and should_convert_module(name, skip):
                quantizable.add(name)
    head_shapes = tuple(tuple(p.shape) for h in heads_new for p in model.get_submodule(h).parameters())
    head_params = sum(math.prod(s) for s in head_shapes)
    requested = "auto" if lora_targets == "auto" else list(lora_targets)
    skipped = heads_new + unused_modules(model, task)  # as attach_adapters skips them
    targets = resolve_targets(model, requested, skipped)
    dims = {n: (i, o) for n, i, o, _ in linear}
    lora_modules = tuple((n, *dims[n]) for n in linear_modules(model, skipped)
                         if n in dims and any(n == t or n.endswith("." + t) for t in targets))

    n_layers = int(_cfg(config, "num_hidden_layers", "n_layer", "num_layers"))
    hidden = int(_cfg(config, "hidden_size", "n_embd", "d_model"))
    heads = int(_cfg(config, "num_attention_heads", "n_head"))
    head_dim = int(_cfg(config, "head_dim", default=hidden // heads))
    intermediate = int(_cfg(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden))
    notes = []
    layer_linear, layer_targets, gated = _one_layer(model, n_layers, linear, {n for n, _, _ in lora_modules}, hidden,
                                                    intermediate)
    if not layer_linear:
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
        attn_dropout=attention_dropout(config),
        hidden_dropout=float(_cfg(config, "hidden_dropout_prob", "hidden_dropout", "resid_pdrop", default=0.0)
                             or 0.0),
        max_positions=_cfg(config, "max_position_embeddings", "n_positions"),
        total_params=sum(p.numel() for p in model.parameters()), linear=tuple(linear),
        quantizable=frozenset(quantizable), head_params=int(head_params), lora_modules=lora_modules,
        layer_linear=tuple(layer_linear), layer_targets=tuple(layer_targets), notes=tuple(notes),
        chunked_loss=task == "causal_lm" and model_type in PLAIN_HEAD_MODELS, head_shapes=head_shapes)


def model_shape(recipe: Recipe, source: str | None = None) -> ModelShape:
    """The recipe's model as the planner sees it (config only; nothing is downloaded but config.json)."""
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
    sequences: int = 1
    """Sequences per example with gradients: 2 for a preference objective and a reward model (chosen and
    rejected in one batch), the group for GRPO."""
    scored: int = 0
    """Sequences per example scored without gradients besides those: KTO's mismatched KL sequence (its passes, like
    the reference's, come before the policy's and hold no activations; evaluation scores both sequences of a row)."""
    optimizer: str = "adamw"  # train.optimizer: its state per trained tensor (optimizer_state.py)
    generated: int = 0
    """Tokens generated after each prompt before the step (GRPO's ``max_new_tokens``); 0: none."""
    packed: bool = False  # training rows of packed examples: an attention mask even for one row

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
    # A GPU plan may be made on a machine without one: its bf16 support is the caller's assumption, not measured.
    compute = ("bf16" if bf16_supported else "fp32") if cuda and recipe.model.compute_dtype == "auto" else \
        resolve_compute_dtype(recipe.model, cuda).dtype
    return Setting(device="cuda" if cuda else "cpu", quant=recipe.model.quant, double_quant=recipe.model.double_quant,
                   compute=compute,
                   gradient_checkpointing=cuda if gc == "auto" else bool(gc), r=recipe.lora.r,
                   lora_dropout=recipe.lora.dropout, use_dora=recipe.lora.use_dora,
                   sequences=sequences_per_example(recipe), scored=1 if recipe.objective.type == "kto" else 0,
                   packed=packs(recipe), optimizer=recipe.train.optimizer,
                   generated=recipe.objective.max_new_tokens if recipe.objective.type == "grpo" else 0)


def sequences_per_example(recipe: Recipe) -> int:
    """Sequences an example puts through the model: a pair's two (preference, reward model; an embedding pair's
    anchor and positive are both held for the backward), GRPO's group of completions, else one."""
    o = recipe.objective
    if o.paired or recipe.model.task in ("embedding", "reward"):
        return 2
    return o.num_generations if o.type == "grpo" else 1


def packs(recipe: Recipe) -> bool:
    """Whether training will pack (``data.packing``; as ``CausalLM.use_packing`` decides it for the default
    attention implementation, from the config alone). Preference pairs are never packed (``Preference.cannot_pack``)."""
    if recipe.data.packing is False or recipe.model.task != "causal_lm" or recipe.objective.type not in ("auto", "sft"):
        return False
    return recipe.data.packing is True or _model_type(recipe) in PACKING_MODELS


def _model_type(recipe: Recipe) -> str:
    return getattr(load_config(resolve_source(recipe.model.name), recipe.model), "model_type", "")


