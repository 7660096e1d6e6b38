"""The ``model`` section: which pre-trained model to load, how (quantization, compute dtype), for which task, and
which chat template renders its conversations."""

from __future__ import annotations

from typing import Literal

from pydantic import ValidationInfo, field_validator

from .section import Section as _Section


class ModelConfig(_Section):
    """Which pre-trained model to load and how."""

    name: str = "example:smollm2-135m-instruct"
    """Hub id, local folder, path to a ``.gguf`` file, or ``example:NAME``."""
    task: Literal["causal_lm", "sequence_classification", "token_classification", "regression", "embedding",
                  "reward"] = "causal_lm"
    """``sequence_classification`` also trains multi-label data (a list of labels per example) and, where every label
    is a number with a fraction, regression (``data.format`` says which; ``auto`` detects it). ``reward``: a causal
    decoder with a new scalar head (``AutoModelForSequenceClassification``, one label), a reward model trained on
    preference pairs; ``objective.type: reward`` sets it."""
    quant: Literal["none", "int8", "nf4", "fp4"] = "none"
    double_quant: bool = True
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 (autocast) on GPUs that support it and on CPUs with native bf16 units whose bf16 GEMM is
    measured clearly faster than fp32, else fp32 (``modeling.precision``); ``run_config.yaml`` records the choice
    and why. Set fp32 for bit-for-bit comparisons."""
    trust_remote_code: bool = False
    revision: str | None = None
    chat_template: str | None = None
    """Render conversations with this template instead of the tokenizer's (a base model's has none): ``chatml``, a
    ``.jinja`` file, or a tokenizer folder / Hub id whose template to take. The special tokens it writes are added
    if missing and their embedding rows trained; its answers' end token becomes EOS (``modeling.chat_template``)."""

    @field_validator("chat_template")
    @classmethod
    def _template_for_decoders(cls, v: str | None, info: ValidationInfo) -> str | None:
        # A field validator, so that it is reported with the section's other problems (see Recipe._init_fits_quant).
        task = info.data.get("task")
        if v is not None and task not in ("causal_lm", "reward", None):
            raise ValueError(f"renders conversations for a decoder: it needs model.task causal_lm or reward, "
                             f"not {task}")
        return v
