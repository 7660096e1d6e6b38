"""KTO (Ethayarajh et al. 2024) on unpaired feedback: ``{prompt, completion, label}`` rows, ``label`` true for a
desirable completion (thumbs up), false for an undesirable one.

**The loss**, as TRL 1.16's ``KTOTrainer`` (``loss_type: kto``) computes it: with r = log π(y|x) − log π_ref(y|x)
and z the KL estimate below, a desirable row costs ``desirable_weight · (1 − σ(β (r − z)))``, an undesirable one
``undesirable_weight · (1 − σ(β (z − r)))``; the losses are summed and divided by the rows of the global batch
(TRL's mean per batch).

**The KL estimate** z is TRL's: each row's prompt is paired with the completion of the row before it in the
micro-batch (the first with the last: (x₁, yₙ), (x₂, y₁), …, (xₙ, yₙ₋₁), TRL's rotation by one), and z is the mean
over the micro-batch of log π(y'|x) − log π_ref(y'|x) on those mismatched pairs, without gradients, clamped at 0.
TRL rotates within each ``per_device_train_batch_size`` block of the dataset in order (which is why it needs
sequential sampling); lora_ft rotates within the micro-batch it draws, so the mismatched completions are always
the completions of the same batch, as the KTO paper asks, under any sampler. TRL also averages z over the processes
(``gather_for_metrics``); lora_ft keeps each micro-batch's own, so 2 processes give what 1 process accumulating 2
micro-batches gives (on one process without accumulation both are the same number). Evaluation splits are
rotated once as a whole (``prepare``) and scored with the KL estimate of the whole split, so their metrics depend on
no batching or process count.

**The reference** is the base model: the same weights with the adapter switched off (``preference.reference_logps``),
as for DPO. Log-probs come from ``preference.sequence_logps`` (the chunked head on the answer positions only, never
the full logits). Rows are rendered as the preference objectives render a prompt and an answer
(``data.preference``): chat template, labels on the answer up to its turn end.

**Checked against TRL 1.16** in ``tests/test_kto.py``: loss and every LoRA gradient to 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from ..data.cells import Where, text_problem
from ..data.chat import IGNORE, prompt_text
from ..data.preference import encode_answer, read_answer, read_prompt
from ..errors import DataError, RecipeError
from ..recipe import AugmentConfig, DataConfig, ObjectiveConfig
from .base import Batch, GenerationExample
from .causal_lm import CausalLM, pad_left
from .preference import TIE, peft_model_of, reference_logps, sequence_logps

_KL = "kl_"
"""Prefix of the mismatched (KL) sequences' tensors in a batch."""
_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "labels", "logits_to_keep", "completion")
_LABELS = {True: True, False: False, "true": True, "false": False, "1": True, "0": False}
"""Also the ints 1 and 0, which hash and compare as True and False."""


def read_label(value: Any, column: str) -> bool:
    """A row's feedback: a boolean (JSON ``true``/``false``), 0/1, or the text of either (CSV cells)."""
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, bool | int | str) and key in _LABELS:
        return _LABELS[key]
    raise RecipeError(f"data.{column}: a KTO label is true (desirable) or false (undesirable), got {value!r}")


def kto_losses(logratio: torch.Tensor, kl: torch.Tensor, desirable: torch.Tensor, beta: float,
               weights: tuple[float, float]) -> torch.Tensor:
    """Per-row weighted KTO losses (TRL's ``loss_type: kto``, the KTO paper's eq. 7).

    Args:
        logratio: log π(y|x) − log π_ref(y|x) of each row.
        kl: the batch's KL estimate (no gradient).
        desirable: each row's label.
        beta: the temperature β.
        weights: (desirable_weight, undesirable_weight).
    """
    chosen = weights[0] * (1 - F.sigmoid(beta * (logratio - kl)))
    rejected = weights[1] * (1 - F.sigmoid(beta * (kl - logratio)))
    return torch.where(desirable, chosen, rejected)


def _half(batch: Batch, prefix: str) -> Batch:
    return {k: batch[prefix + k] for k in _MODEL_KEYS}


class KTO(CausalLM):
    """KTO on unpaired ``{prompt, completion, label}`` rows.

    Args:
        cfg: the recipe's ``data`` section (``prompt_column``, ``completion_column``, ``label_column``).
        tokenizer: the model's tokenizer, with its pad token set.
        objective: the recipe's ``objective`` section (β, the desirable and undesirable weights).
    """

    formats = ("unpaired",)
    compared = "next-token distributions on completion tokens"
    sequences_per_example = 2
    """The completion and a mismatched one (the KL estimate's, scored without gradients)."""

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, objective: ObjectiveConfig):
        super().__init__(cfg, tokenizer)
        self.beta = objective.resolved_beta
        self.weights = (objective.desirable_weight, objective.undesirable_weight)

    # ------------------------------------------------------------------------------------------- data
    def detect_format(self, columns: list[str], split: str) -> str:
        self.need_columns(columns, split, self.cfg.prompt_column, self.cfg.completion_column, self.cfg.label_column)
        return "unpaired"

    def columns(self, fmt: str) -> dict[str, str]:
        return {}  # prompts and completions take several shapes: check_rows reads whole rows

    def label_column(self) -> str:
        return self.cfg.label_column

    def _read(self, row: dict[str, Any]) -> tuple[list[dict[str, str]], str, bool]:
        cfg = self.cfg
        return (read_prompt(row, cfg), read_answer(row[cfg.completion_column], cfg.completion_column),
                read_label(row[cfg.label_column], cfg.label_column))

    def check_rows(self, ds: datasets.Dataset, fmt: str, where: Where) -> None:
        """Every row read before tokenizing: one DataError naming the file and row of the first that is not a
        prompt, a non-empty completion and a label."""
        for i, row in enumerate(ds):
            try:
                _, completion, _ = self._read(row)
            except RecipeError as e:
                raise DataError(f"{where.field}: {where.source} row {i + 1}: {e}") from None
            problem = text_problem(completion)
            if problem is not None:
                raise DataError(f"{where.cell(i, self.cfg.completion_column)} {problem}")

    def encode_full(self, row: dict[str, Any], fmt: str) -> dict[str, list[int]]:
        prompt, completion, _ = self._read(row)
        return encode_answer(self.tokenizer, prompt, completion)

    def encode(self, row: dict[str, Any], fmt: str) -> dict[str, Any]:
        """The row's sequence, and its prompt and answer tokens apart: the KL sequences join one row's prompt to
        another's answer."""
        full = self.encode_full(row, fmt)
        n = self.cfg.max_length
        out: dict[str, Any] = {k: v[:n] for k, v in full.items()}
        out["truncated"] = len(full["input_ids"]) > n
        out["usable"] = any(t != IGNORE for t in out["labels"][1:])  # position 0 predicts nothing
        labelled = [i for i, t in enumerate(full["labels"]) if t != IGNORE]
        start, end = (labelled[0], labelled[-1] + 1) if labelled else (len(full["labels"]), len(full["labels"]))
        out["prompt_ids"], out["answer_ids"] = full["input_ids"][:start], full["input_ids"][start:end]
        out["desirable"] = read_label(row[self.cfg.label_column], self.cfg.label_column)
        return out

    def collate(self, rows: list[dict[str, Any]], augment: Callable[[dict], dict] | None = None) -> Batch:
        """The rows' sequences, and in ``kl_*`` each row's prompt with the previous row's answer (TRL's rotation;
        an evaluation split's rows carry theirs, ``prepare``), both left-padded; ``desirable`` the labels. Single
        sequences (the forgetting guard's general text) are collated as supervised fine-tuning collates them."""
        if "desirable" not in rows[0]:
            return super().collate(rows)
        pad, n = self.tokenizer.pad_token_id, self.cfg.max_length
        batch = pad_left([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], pad)
        batch["completion"] = batch["labels"] != IGNORE
        others = [r["kl_answer_ids"] for r in rows] if "kl_answer_ids" in rows[0] else \
            [o["answer_ids"] for o in rows[-1:] + rows[:-1]]
        mismatched = []
        for r, answer in zip(rows, others, strict=True):
            ids = (r["prompt_ids"] + answer)[:n]
            labels = ([IGNORE] * len(r["prompt_ids"]) + answer)[:n]
            mismatched.append({"input_ids": ids, "labels": labels})
        kl = pad_left(mismatched, pad)
        kl["completion"] = kl["labels"] != IGNORE
        batch.update({_KL + k: v for k, v in kl.items()})
        batch["desirable"] = torch.tensor([bool(r["desirable"]) for r in rows])
        return batch

    def example_text(self, row: dict[str, Any], fmt: str) -> str:
        prompt, completion, label = self._read(row)
        return f"{prompt_text(prompt)}\ncompletion ({'desirable' if label else 'undesirable'}): {completion}"

    def generation_example(self, row: dict[str, Any], fmt: str) -> GenerationExample | None:
        """None: half the rows' completions are what not to answer, so the rows hold no reference answers to
        compare generations with (``eval.generate: auto`` stays off; ``true`` is refused by the recipe)."""
        return None

    def describe(self, row: dict[str, Any], fmt: str) -> str:
        label = "desirable" if self._read(row)[2] else "undesirable"
        return f"({label}) " + super().describe(row, fmt)

    def neftune_alpha(self, cfg: AugmentConfig) -> float | None:
        return None  # refused by the recipe: noise in the policy's forward but not the reference's

    def cannot_pack(self, model: torch.nn.Module) -> str | None:
        return "a KTO row is scored beside a mismatched completion and against the reference; rows are not packed"

    def head_positions(self, batch: Batch) -> torch.Tensor:
        """The labelled positions of the policy's pass with gradients (the reference and KL passes are not
        counted, so MFU is understated)."""
        return (batch["labels"][:, 1:] != IGNORE).sum()

    # ------------------------------------------------------------------------------------ optimisation
    def items(self, batch: Batch) -> torch.Tensor:
        """Rows: the losses are summed and divided by the rows of the global batch."""
        return batch["labels"].new_tensor(batch["labels"].shape[0])

    def scores(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-ratio of each row's completion, per-row KL terms of the mismatched pairs, the policy's log-probs).

        The passes without gradients come first (reference on both halves, then the policy on the mismatched
        pairs, on the PeftModel itself: nothing there is synchronised by DDP), so no activations are held then."""
        real, kl = _half(batch, ""), _half(batch, _KL)
        ref, ref_kl = reference_logps(model, real), reference_logps(model, kl)
        with torch.no_grad():
            policy_kl = sequence_logps(peft_model_of(model), kl)[0]
        logps = sequence_logps(model, real)[0]
        return logps - ref, (policy_kl - ref_kl).float(), logps

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The summed weighted losses of the batch's rows."""
        logratio, kl_terms, _ = self.scores(model, batch)
        kl = kl_terms.mean().clamp(min=0)
        return kto_losses(logratio, kl, batch["desirable"], self.beta, self.weights).sum()

    # -------------------------------------------------------------------------------------- evaluation
    def prepare(self, model: torch.nn.Module, accelerator, splits: dict[str, datasets.Dataset], batch_size: int,
                cache=None) -> dict[str, datasets.Dataset]:
        """Evaluation splits get their mismatched completions once, rotated by one over the whole split (TRL's
        rotation, in one block): a row's KL term then depends on no batching, and the split's metrics are the
        same on any number of processes and with any evaluation batch."""
        out = {}
        for name, ds in splits.items():
            if name != "train" and len(ds) and "answer_ids" in ds.column_names:
                answers = ds["answer_ids"]
                ds = ds.add_column("kl_answer_ids", answers[-1:] + answers[:-1])
            out[name] = ds
        return out

    def eval_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logratio, kl_terms, logps = self.scores(model, batch)
        return {"logratio": logratio.float(), "kl_term": kl_terms, "logp": logps.float(),
                "desirable": batch["desirable"]}

    def summarize(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """The loss with the KL estimate of the whole split (its rows' mismatched pairs, clamped at 0); that
        estimate; mean implicit reward β·r of the desirable and the undesirable rows and their margin; the share of
        rows whose reward has the label's sign (``reward_accuracy``: 0.5 before training, when every reward is 0)."""
        v = {k: t.double() for k, t in values.items()}
        good = values["desirable"].bool()
        kl = v["kl_term"].mean().clamp(min=0) if len(v["kl_term"]) else v["kl_term"].new_zeros(())
        losses = kto_losses(v["logratio"], kl, good, self.beta, self.weights)
        reward = self.beta * v["logratio"]

        def mean(x: torch.Tensor) -> float:
            return x.mean().item() if len(x) else 0.0

        right = torch.where(good, reward > TIE, reward < -TIE).double() + 0.5 * (reward.abs() <= TIE).double()
        chosen, rejected = mean(reward[good]), mean(reward[~good])
        return {"loss": mean(losses), "examples": len(reward), "kl": kl.item(), "reward_chosen": chosen,
                "reward_rejected": rejected, "reward_margin": chosen - rejected, "reward_accuracy": mean(right),
                "logp_chosen": mean(v["logp"][good]), "logp_rejected": mean(v["logp"][~good])}

    @torch.no_grad()
    def label_logits(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The next-token logits of the rows' completion tokens."""
        if "desirable" not in batch:
            return super().label_logits(model, batch)
        return super().label_logits(model, {k: batch[k] for k in _MODEL_KEYS if k != "completion"})
