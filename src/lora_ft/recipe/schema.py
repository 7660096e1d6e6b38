"""The recipe schema: typed sections, strict keys, and the values derived from them.

A recipe is YAML with the sections ``model`` (``model.py``), ``objective`` (``objective.py``), ``lora``, ``data``,
``train``, ``freeze``, ``forgetting`` and ``output_dir``. Every field has a default, so a recipe names only what
differs; unknown keys are rejected with a did-you-mean (``loading.py``) instead of being silently ignored (the
failure mode of flat dict configs). Values derived from several fields (the batch arithmetic, the compute dtype) are
methods here and in ``train.py`` (the ``train`` section), so each is computed in one place; the ``auto`` training
values are resolved by the rules in ``defaults.py``. This package imports nothing of ours but ``errors``.
(About 470 lines: the cross-section rules in ``Recipe`` read every section, and each task and objective adds its
own; ``model.py``, ``objective.py``, ``train.py`` and ``evaluation.py`` already hold the sections that stand alone.)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from ..errors import did_you_mean
from .evaluation import EvalConfig
from .model import ModelConfig
from .objective import PREFERENCE_OBJECTIVES, REFERENCE_OBJECTIVES, ObjectiveConfig
from .section import Section as _Section
from .streaming import streaming_problems
from .train import TrainConfig

LABEL_HEAD_TASKS = ("sequence_classification", "token_classification", "regression")
"""``model.task`` values that put a new head with one output per label on an encoder (``freeze.strategy: head_first``
trains it first)."""


LORA_INITS = ("gaussian", "pissa", "olora", "loftq")
"""``lora.init`` names (besides true/false) that lora_ft supports end to end: they need no data pass, and
``PeftModel.from_pretrained`` on the original base reproduces the trained model (peft re-runs the
deterministic SVD/QR on load, then loads the trained factors; LoftQ leaves the quantized base as it is)."""
FULL_PRECISION_INITS = ("pissa", "olora")
"""Inits that rewrite the base weights (W - BA): they need model.quant none."""
AWAY_FROM_BASE_INITS = (*FULL_PRECISION_INITS, "loftq")
"""Inits whose starting model differs from the base with the adapter switched off (what the forgetting guard and
a preference objective's reference compare with): PiSSA/OLoRA rewrote the base; LoftQ's adapter starts at the
NF4 base's quantization error (B ≠ 0), so the adapter-off model is the quantized base, not the starting one."""
_REFUSED_INITS = {
    "eva": "needs a pass over the training data (peft's initialize_lora_eva_weights) that lora_ft does not run",
    "corda": "needs peft's preprocess_corda pass over the training data, which lora_ft does not run",
    "lora_ga": "needs gradients from a pass over the training data, which lora_ft does not run",
}


class LoraConfigSection(_Section):
    """The adapter: passed to peft's ``LoraConfig``."""

    r: int = Field(16, gt=0)
    """Rank 16 with alpha 32 (a scale of 2) on every linear layer: the QLoRA paper's finding that covering all
    layers matters more than the rank, at the rank TRL's and peft's examples use."""
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    """On the adapters' input (QLoRA's 0.05 for small models)."""
    target_modules: Literal["auto"] | list[str] = "auto"
    """``auto``: every linear layer of the backbone, never the output or task head."""
    use_dora: bool = False
    use_rslora: bool = False
    init_from: str | None = None
    """Start from a trained adapter instead of a fresh one: a run's ``output_dir`` or an adapter folder (e.g. an
    SFT run before preference tuning). Its shape (r, alpha, dropout, targets, DoRA, rsLoRA) is the adapter's; a
    preference objective's reference is then that starting adapter (see ``ObjectiveConfig``)."""
    plus_lr_ratio: float | None = Field(None, ge=1)
    """LoRA+ (peft's ``create_loraplus_optimizer``): the B matrices (and vectors such as biases) train at ``lr`` ×
    this, the A matrices at ``lr``; the paper's 16 is a common start. None: one rate."""
    init: bool | str = True
    """peft's ``init_lora_weights``: true (B = 0, the adapter starts as a no-op), false (random, for
    debugging), ``gaussian``, or ``pissa`` / ``olora`` (start from the base weights' principal directions;
    model.quant none only), or ``loftq`` (model.quant nf4 only: A and B start at the rank-r SVD of the base's NF4
    quantization error divided by the adapter's scale, so the starting model is closer to the full-precision one;
    on any device, see ``modeling/loftq.py``). Data-driven inits (``eva``, ``corda``) and
    ``pissa_niter_N`` are refused."""

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("give at least one module name, or 'auto'")
        return v

    @field_validator("init")
    @classmethod
    def _supported_init(cls, v: bool | str) -> bool | str:
        if isinstance(v, bool):
            return v
        name = v.strip().lower()
        if name in LORA_INITS:
            return name
        supported = "true, false, " + ", ".join(LORA_INITS)
        if name.startswith("pissa_niter"):
            # peft runs the randomized SVD again when the adapter is loaded: the residual base differs
            # from the one the adapter was trained on (max |Δlogit| 0.065 on a tiny Llama).
            raise ValueError(f"'{v}' re-runs a randomized SVD when the adapter is loaded, so the saved adapter "
                             "would not reload faithfully: use 'pissa'")
        if name in _REFUSED_INITS:
            raise ValueError(f"'{v}' {_REFUSED_INITS[name]}: use one of {supported}")
        raise ValueError(f"unknown init '{v}'{did_you_mean(name, ['true', 'false', *LORA_INITS])}")


class AugmentConfig(_Section):
    """On-the-fly augmentation of the training split only (never validation/test), seeded."""

    neftune_alpha: float | None = Field(None, gt=0)
    """Causal LMs: NEFTune noise on the input embeddings while training (5 is the paper's default)."""
    token_dropout: float = Field(0.0, ge=0, lt=1)
    """Classification: probability that a token is replaced by the unknown/mask token."""
    random_deletion: float = Field(0.0, ge=0, lt=1)
    """Classification: probability that a token is deleted (EDA)."""
    random_swap: float = Field(0.0, ge=0, lt=1)
    """Classification: fraction of positions swapped with a random other position (EDA)."""


class DataConfig(_Section):
    """Where the data is and how to read it."""

    train: str | None = None
    validation: str | None = None
    validation_split: float = Field(0.0, ge=0, lt=1)
    """Fraction of ``train`` carved out (with ``train.seed``) when no ``validation`` file is given."""
    test: str | None = None
    format: Literal["auto", "messages", "sharegpt", "prompt_completion", "alpaca", "text", "classification",
                    "multilabel", "regression", "tokens", "spans", "preference", "pairs", "scored_pairs"] = "auto"
    messages_column: str = "messages"
    conversations_column: str = "conversations"
    """``sharegpt``: the column of ``{from, value}`` turns (roles human/gpt/system; user/assistant too)."""
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    anchor_column: str = "anchor"
    """``model.task: embedding``: the query (sentence-transformers' column names, as the next three)."""
    positive_column: str = "positive"
    negative_column: str = "negative"
    """Hard negatives (optional: the column may be absent)."""
    score_column: str = "score"
    """Scored pairs: the target cosine similarity of anchor and positive (its presence selects ``scored_pairs``)."""
    tokens_column: str = "tokens"
    """Token classification: the column of words (the CoNLL layout as JSON), with ``tags_column`` beside it."""
    tags_column: str = "tags"
    """Token classification: one BIO/IOB2 tag per word (``B-PER``, ``I-PER``, ``O``)."""
    spans_column: str = "spans"
    """Token classification, ``spans`` format: ``{start, end, label}`` character spans of ``text_column``."""
    label_all_tokens: bool = False
    """Token classification: label every sub-word token of a word (the rest of a ``B-`` word as ``I-``) instead of
    its first one only (the rest ignored, as transformers' token-classification example does by default)."""
    system_prompt: str | None = None
    max_length: int = Field(512, gt=1)
    train_on_prompt: bool = False
    """Chat/instruction data: also put loss on the prompt tokens (default: answers only)."""
    group_by_length: Literal["auto"] | bool = "auto"
    """Batch examples of similar length (less padding). ``auto``: causal LMs sort within windows of 64 batches;
    classifiers within windows of 4 only, because length can correlate with the label and single-class
    batches make training erratic (fortunes: padding 55% → 27%, batches still mix 3-4 labels); packed classifier
    batches (``packing``) carry no padding, so ``auto`` only shuffles them. ``true``: windows of 64 for both;
    ``false``: only shuffled."""
    packing: Literal["auto"] | bool = "auto"
    """Training batches of a causal LM as rows of whole examples laid end to end (position ids restart on each
    example, attention stays inside it), so no compute goes to padding. ``auto``: wherever that is exact for the
    model and its attention implementation (``objectives.causal_lm.PACKING_MODELS``); ``true``: an error where it
    is not. A packed micro-batch is ``train.micro_batch_size`` rows of ``max_length`` tokens (or
    ``train.max_tokens_per_batch``), so one step sees more examples than unpacked. Sequence classification packs
    too, where the encoder is proven exact (``objectives.encoder_packing.ENCODERS``: BERT, RoBERTa, DistilBERT,
    ELECTRA, DeBERTa-v2, ModernBERT): the same ``micro_batch_size`` examples as unpadded, only laid end to end
    (and, under ``group_by_length: auto``, shuffled without length grouping). Evaluation is never packed."""
    augment: AugmentConfig = AugmentConfig()
    max_eval_examples: Annotated[int, Field(gt=0)] | Literal["auto"] | None = "auto"
    """Evaluate on at most this many examples per split (the first ones, so runs stay comparable). ``auto``: splits
    of more than 1,000 examples are evaluated on 1,000 spread evenly over them (logged; ``data.prepare``), smaller
    ones whole; null: always whole."""
    streaming: bool = False
    """Read ``train`` as a stream (``datasets.load_dataset(..., streaming=True)``) for files larger than memory:
    examples are checked, tokenized and packed on the fly, never all at once (``data/streaming.py``). Needs
    ``train.max_steps``; trains objective sft on causal LMs; validation and test stay read whole."""
    shuffle_buffer: int = Field(10_000, ge=0)
    """Under ``streaming``: datasets' ``shuffle(buffer_size=..., seed=train.seed)`` of the stream (a new order each
    epoch); 0 reads the file in its order."""


class FreezeConfig(_Section):
    """Which adapters train when (the backbone itself always stays frozen)."""

    strategy: Literal["none", "head_first", "gradual_unfreeze"] = "none"
    """``head_first``: only the new head for ``head_steps`` (a linear probe), then everything (LP-FT).
    ``gradual_unfreeze``: the top ``blocks_per_stage`` blocks' adapters first, one stage lower every
    ``unfreeze_every`` steps (ULMFiT)."""
    head_steps: int = Field(50, gt=0)
    unfreeze_every: int = Field(50, gt=0)
    blocks_per_stage: int = Field(1, gt=0)


class ForgettingConfig(_Section):
    """Guard against catastrophic forgetting: the model against its own base on general text."""

    enabled: bool = False
    reference: str | None = None
    """jsonl/json/csv/parquet with a ``text`` column; default: the general-text sample shipped with lora_ft."""
    max_examples: int = Field(64, gt=0)
    max_kl: float | None = Field(None, gt=0)
    """Stop when the mean per-token KL(adapted ‖ base) on the reference text exceeds this."""
    max_ppl_increase: float | None = Field(None, gt=0)
    """Stop when reference perplexity rises by more than this fraction over the base (0.1 = +10%)."""
    action: Literal["stop", "rollback"] = "stop"
    """On a breach: ``stop`` keeps the best adapter so far; ``rollback`` keeps the last one within budget."""


class Recipe(_Section):
    """A whole run."""

    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    lora: LoraConfigSection = LoraConfigSection()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    freeze: FreezeConfig = FreezeConfig()
    forgetting: ForgettingConfig = ForgettingConfig()
    eval: EvalConfig = EvalConfig()
    output_dir: str = "runs/default"

    @field_validator("output_dir")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty: name the run's own folder, e.g. runs/my-run (an empty value would write "
                             "into the current directory)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _reward_task(cls, data: Any) -> Any:
        """``objective.type: reward`` alone is enough: it trains ``model.task: reward`` unless the task is given."""
        objective, model = (data.get(k) if isinstance(data, dict) else None for k in ("objective", "model"))
        kind = objective.get("type") if isinstance(objective, dict) else None
        given = isinstance(model, dict) and "task" in model
        if isinstance(kind, str) and kind.strip().lower() == "reward" and not given:
            data = {**data, "model": {**(model if isinstance(model, dict) else {}), "task": "reward"}}
        return data

    @field_validator("lora")
    @classmethod
    def _init_fits_quant(cls, lora: LoraConfigSection, info: ValidationInfo) -> LoraConfigSection:
        # peft refuses PiSSA on quantized weights (TypeError after the model has loaded); for OLoRA it
        # de-quantizes, subtracts and re-quantizes, a path lora_ft does not test. A field validator, not part of
        # _consistent: pydantic runs model validators only once every field is valid, and this rule should be
        # reported together with the other problems of the recipe.
        model = info.data.get("model")
        if isinstance(model, ModelConfig) and model.quant != "none" and lora.init in FULL_PRECISION_INITS:
            raise ValueError(f"lora.init: '{lora.init}' rewrites the base weights, which needs them in full "
                             f"precision, not model.quant {model.quant}: set model.quant: none, or lora.init: true")
        if isinstance(model, ModelConfig) and lora.init == "loftq" and model.quant != "nf4":
            raise ValueError(f"lora.init: 'loftq' starts the adapter at the NF4 quantization error of the base, not "
                             f"model.quant {model.quant}: set model.quant: nf4, or lora.init: true")
        return lora

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        d = self.data
        own = {"classification": "sequence_classification", "multilabel": "sequence_classification",
               "regression": "sequence_classification or regression", "tokens": "token_classification",
               "spans": "token_classification", "pairs": "embedding", "scored_pairs": "embedding"}
        if d.format in own and self.model.task not in own[d.format].split(" or "):
            raise ValueError(f"data.format '{d.format}' needs model.task: {own[d.format]}")
        encoder = {t for ts in own.values() for t in ts.split(" or ")}
        if self.model.task in encoder and d.format not in ("auto", *(f for f, t in own.items()
                                                                     if self.model.task in t.split(" or "))):
            raise ValueError(f"model.task {self.model.task} cannot train on data.format '{d.format}'")
        if self.freeze.strategy == "head_first" and self.model.task not in LABEL_HEAD_TASKS:
            raise ValueError("freeze.strategy head_first needs a new task head: an encoder model.task "
                             "(sequence_classification, token_classification, regression)")
        if self.forgetting.enabled and self.model.task != "causal_lm":
            raise ValueError("forgetting.enabled measures language-model perplexity: it needs model.task causal_lm")
        if self.forgetting.enabled and self.lora.init in AWAY_FROM_BASE_INITS:
            # The guard's "base" is the model with the adapter switched off, which is not where these inits start.
            raise ValueError(f"forgetting.enabled compares with the base model, which lora.init '{self.lora.init}' "
                             "does not start from: use lora.init: true, or turn the guard off")
        if d.packing is True and self.model.task not in ("causal_lm", "sequence_classification"):
            raise ValueError("data.packing true lays examples end to end for model.task causal_lm or "
                             "sequence_classification (set data.packing: auto or false)")
        t = self.train
        if self.lora.plus_lr_ratio is not None and (t.lr_layer_decay is not None
                                                    or t.head_lr not in ("auto", None, t.lr)):
            # peft's LoRA+ builds its own groups (A at lr, B at lr × ratio): no place for per-layer or head rates
            # (a head rate equal to lr is what `auto` resolves to, as run_config.yaml records it).
            raise ValueError("lora.plus_lr_ratio (LoRA+) sets its own parameter groups: remove train.lr_layer_decay "
                             "and train.head_lr, or lora.plus_lr_ratio")
        if d.validation and d.validation_split:
            raise ValueError("give data.validation or data.validation_split, not both")
        if streaming := streaming_problems(self):
            raise ValueError("data.streaming true: " + "; ".join(streaming))
        self._objective_fits()
        self._generation_fits()
        return self

    def _generation_fits(self) -> None:
        """The ``eval`` section's rules: generation needs a causal LM; selection by a generated metric needs it at
        every evaluation."""
        e = self.eval
        if isinstance(e.max_new_tokens, int) and e.max_new_tokens < 1:
            raise ValueError("eval.max_new_tokens must be at least 1 (or auto)")
        if e.generate is True and self.model.task != "causal_lm":
            raise ValueError("eval.generate true generates answers: it needs model.task causal_lm (a classifier is "
                             "judged by accuracy and F1)")
        if "regex_match" in e.metrics and not e.regex:
            raise ValueError("eval.metrics regex_match needs eval.regex: the pattern a whole answer must match")
        if e.select_by in (None, "loss"):
            return
        if self.model.task == "causal_lm" and e.select_by in e.metric_names:
            if e.generate is False or not e.every_eval:
                raise ValueError(f"eval.select_by {e.select_by} is a generated metric: it needs eval.every_eval: "
                                 "true (and eval.generate not false) so that every validation generates")

    def _objective_fits(self) -> None:
        """The objective's rules: which task and data it trains on, and what preference tuning cannot combine with."""
        o, task, d = self.objective, self.model.task, self.data
        own = {"sft": "causal_lm", "classification": "sequence_classification", "reward": "reward"}
        if o.type in own and task != own[o.type]:
            raise ValueError(f"objective.type {o.type} needs model.task {own[o.type]}")
        if task == "reward" and o.type not in ("auto", "reward"):
            raise ValueError(f"model.task reward trains a reward model (objective.type reward), not {o.type}")
        if o.type not in ("kto", "reward") and (o.desirable_weight, o.undesirable_weight) != (1.0, 1.0):
            raise ValueError(f"objective.desirable_weight and undesirable_weight apply to kto, not {o.type}")
        if o.type == "grpo" or o.grpo_settings:
            return self._grpo_fits()
        if o.type in ("kto", "reward"):
            self._unpaired_or_reward_fits()
            return
        if d.format == "preference" and not o.paired:
            raise ValueError(f"data.format preference needs a preference objective: objective.type "
                             f"{', '.join(PREFERENCE_OBJECTIVES)}")
        if not o.paired:
            if o.beta is not None or o.precompute_reference != "auto":
                raise ValueError(f"objective.beta and objective.precompute_reference apply to the preference "
                                 f"objectives ({', '.join(PREFERENCE_OBJECTIVES)}), not {o.type}")
            return
        if task != "causal_lm":
            raise ValueError(f"objective.type {o.type} tunes a language model on preference pairs: it needs "
                             "model.task causal_lm")
        if d.format not in ("auto", "preference"):
            raise ValueError(f"objective.type {o.type} trains on preference pairs: data.format auto or preference, "
                             f"not '{d.format}'")
        if d.packing is True:
            raise ValueError(f"data.packing true: objective.type {o.type} scores each pair's answers side by side, "
                             "pairs are not packed; set data.packing: auto or false")
        if self.train.max_tokens_per_batch:  # the length-grouped sampler sees one sequence per example, not two
            raise ValueError(f"train.max_tokens_per_batch does not count the two sequences of a pair yet: remove it "
                             f"for objective.type {o.type} and bound memory with train.micro_batch_size")
        if d.train_on_prompt or d.augment.neftune_alpha:
            raise ValueError("data.train_on_prompt and data.augment.neftune_alpha apply to objective sft, not "
                             f"{o.type}")
        if o.type in REFERENCE_OBJECTIVES and self.lora.init in AWAY_FROM_BASE_INITS and not self.lora.init_from:
            # The reference is the model with the adapter switched off, which these inits have rewritten.
            raise ValueError(f"objective.type {o.type} compares with the base model, which lora.init "
                             f"'{self.lora.init}' does not start from: use lora.init: true")
        if o.type in REFERENCE_OBJECTIVES and self.lora.init_from and o.precompute_reference is False:
            raise ValueError("objective.precompute_reference false: with lora.init_from the reference is the starting "
                             "adapter, whose log-probs are computed before training; remove the setting")
        if (o.simpo_gamma != 0.5 or o.cpo_alpha) and o.type != "simpo":
            raise ValueError(f"objective.simpo_gamma and objective.cpo_alpha apply to simpo, not {o.type}")

    def _unpaired_or_reward_fits(self) -> None:
        """KTO (``objectives/kto.py``) and reward models (``objectives/reward.py``): what their data and batches
        cannot combine with."""
        o, d = self.objective, self.data
        if d.format not in ("auto", "preference" if o.type == "reward" else "auto"):
            raise ValueError(f"objective.type {o.type} reads its own columns: data.format auto, not '{d.format}'")
        if d.packing is True or self.train.max_tokens_per_batch or d.train_on_prompt or d.augment.neftune_alpha:
            raise ValueError(f"data.packing, train.max_tokens_per_batch, data.train_on_prompt and "
                             f"data.augment.neftune_alpha do not apply to objective.type {o.type}: remove them")
        if o.precompute_reference not in ("auto", False) or (o.simpo_gamma != 0.5 or o.cpo_alpha):
            raise ValueError(f"objective.precompute_reference, simpo_gamma and cpo_alpha do not apply to {o.type}")
        if o.type == "reward":
            if o.beta is not None or (o.desirable_weight, o.undesirable_weight) != (1.0, 1.0):
                raise ValueError("objective.beta and the kto weights do not apply to a reward model: remove them")
            return
        if self.model.task != "causal_lm":
            raise ValueError("objective.type kto tunes a language model: it needs model.task causal_lm")
        if self.eval.generate is True:
            raise ValueError("eval.generate true: KTO rows hold no reference answers (half the completions are what "
                             "not to answer); set eval.generate: auto or false")
        if self.lora.init_from or self.lora.init in FULL_PRECISION_INITS:
            # The reference is the model with the adapter switched off: a starting adapter or a rewritten base would
            # need a reference computed before training, which the batch-dependent KL estimate cannot use.
            raise ValueError("objective.type kto compares with the base model (the adapter switched off): "
                             "lora.init_from and lora.init pissa/olora are not supported with it")
    def _grpo_fits(self) -> None:
        """GRPO's rules: a causal LM, prompts read as they are (``data.format`` auto), at least one reward."""
        o, d = self.objective, self.data
        if o.type != "grpo":
            raise ValueError(f"objective.{sorted(o.grpo_settings)[0]} applies to objective.type grpo, not {o.type}")
        if self.model.task != "causal_lm":
            raise ValueError("objective.type grpo samples completions from a language model: it needs model.task "
                             "causal_lm")
        if not o.rewards:
            raise ValueError("objective.type grpo needs objective.rewards: e.g. [numeric_match] (the last number of a "
                             "completion against the 'answer' column)")
        if d.format != "auto" or d.packing is True or d.train_on_prompt or d.augment.neftune_alpha:
            raise ValueError("objective.type grpo reads a 'prompt' column (text or messages) and the reference "
                             "columns its rewards read: leave data.format auto, and data.packing, "
                             "data.train_on_prompt and data.augment.neftune_alpha unset")
        if self.train.max_tokens_per_batch:
            raise ValueError("train.max_tokens_per_batch counts prompts, not the completions GRPO samples: remove it "
                             "and bound memory with train.micro_batch_size and objective.num_generations")
        if o.precompute_reference != "auto":
            raise ValueError("objective.precompute_reference applies to dpo and ipo, not grpo (its reference "
                             "log-probs are of completions sampled during training)")

    @property
    def validates(self) -> bool:
        """Whether the run has validation data (a file, or a fraction carved from train)."""
        return bool(self.data.validation or self.data.validation_split)

    def inert_settings(self) -> tuple[list[str], list[str]]:
        """(errors, warnings) for settings that cannot act with the rest of the recipe.

        An error where the recipe asks for an action that could never happen, so the run would silently do
        something else than asked: early stopping or a forgetting budget (both are checked at each validation)
        without validation data. A warning where a setting is merely inert: ``eval_every`` with nothing to
        evaluate, ``action: rollback`` without a budget to breach, budgets of a guard that is switched off.
        """
        errors, warnings = [], []
        fix = "set data.validation or data.validation_split, or unset it"
        f = self.forgetting
        budgets = [k for k in ("max_kl", "max_ppl_increase") if getattr(f, k) is not None]
        if not self.validates:
            if self.train.early_stopping_patience not in (None, "auto"):
                errors.append(f"train.early_stopping_patience watches the validation score, and the recipe has no "
                              f"validation data: {fix}")
            if f.enabled and budgets:
                errors.append(f"forgetting.{budgets[0]} is checked at each validation, and the recipe has no "
                              f"validation data: {fix}")
            if self.eval.select_by is not None:
                errors.append(f"eval.select_by ranks the validation results, and the recipe has no validation "
                              f"data: {fix}")
            if self.train.eval_every not in (None, "auto"):
                warnings.append("train.eval_every has nothing to evaluate: the recipe has no validation data")
        if "shuffle_buffer" in self.data.model_fields_set and not self.data.streaming:
            warnings.append("data.shuffle_buffer orders a stream: it does nothing without data.streaming true")
        if f.enabled and f.action == "rollback" and not budgets:
            warnings.append("forgetting.action rollback acts when forgetting.max_kl or max_ppl_increase is exceeded, "
                            "and neither is set")
        if budgets and not f.enabled:
            warnings.append(f"forgetting.{budgets[0]} is set but forgetting.enabled is false: nothing checks it")
        return errors, warnings

    def dump(self) -> str:
        """The fully resolved recipe as YAML (what ``run_config.yaml`` holds)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelConfig,
    "objective": ObjectiveConfig,
    "lora": LoraConfigSection,
    "data": DataConfig,
    "train": TrainConfig,
    "freeze": FreezeConfig,
    "forgetting": ForgettingConfig,
    "eval": EvalConfig,
}
