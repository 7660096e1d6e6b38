"""Reward models: a new scalar head on a causal decoder (``model.task: reward``: ``AutoModelForSequenceClassification``
with one label, the head trained in full and never quantized), trained on the ``{prompt, chosen, rejected}`` pairs
the preference objectives read.

**The loss** is TRL 1.16 ``RewardTrainer``'s Bradley–Terry loss: −log σ(r(x, y_chosen) − r(x, y_rejected) − m), with
m the row's ``margin`` when the data has that column (TRL's optional margin), summed and divided by the pairs of the
global batch (TRL's mean per batch).

**The sequences** are TRL's: each side is the whole conversation (prompt and answer) as the tokenizer's chat
template renders it (``data.preference.encode_answer``, as the preference objectives render it), scored at its
last token by the head (transformers' sequence-classification models read the last non-padding token). Batches are
padded on the right, as TRL's collator pads them, so positions start at 0. A pair either side of which is longer
than ``data.max_length`` is dropped, as TRL drops it (a reward read before the answer's end would score another
text).

**Metrics**: ``reward_accuracy`` (the share of held-out pairs whose chosen side scores higher; ties count half) is
what the best adapter is selected by, then the loss; mean rewards and margin. **Checked against TRL 1.16** in
``tests/test_reward_model.py``: loss and every LoRA and head gradient to 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import torch
import torch.nn.functional as F

from ..data.cells import Where
from ..data.chat import prompt_text, render_prompt
from ..data.preference import encode_answer, pair_text, read_pair
from ..errors import DataError, RecipeError
from .base import Batch, GenerationExample, Objective
from .classification import pad_right
from .preference import TIE, check_pair

MARGIN_COLUMN = "margin"
"""TRL's optional column: how much more the chosen answer must score (a float per pair)."""


def rewards(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The head's scalar of every sequence of a batch, in fp32."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None) -> torch.Tensor:
    """Per-pair −log σ(chosen − rejected − margin), TRL ``RewardTrainer``'s loss before its mean."""
    delta = chosen - rejected
    return -F.logsigmoid(delta - margin if margin is not None else delta)


class RewardModel(Objective):
    """A scalar reward head on a decoder, trained on preference pairs (Bradley–Terry)."""

    model_task = "reward"
    length_window = 64
    formats = ("preference",)
    compared = "Bradley-Terry probabilities that the chosen answer wins (from the rewards of both answers)"
    sequences_per_example = 2
    selected_by = ("reward_accuracy", "loss")

    # ------------------------------------------------------------------------------------------- data
    def detect_format(self, columns: list[str], split: str) -> str:
        self.need_columns(columns, split, self.cfg.chosen_column, self.cfg.rejected_column)
        return "preference"

    def check_rows(self, ds: datasets.Dataset, fmt: str, where: Where) -> None:
        """Every row read as a pair (and its margin a number) before tokenizing: one DataError naming the file and
        row of the first that is not."""
        for i, row in enumerate(ds):
            check_pair(row, i, self.cfg, where)
            margin = row.get(MARGIN_COLUMN)
            if MARGIN_COLUMN in row and not (isinstance(margin, int | float) and not isinstance(margin, bool)):
                raise DataError(f"{where.cell(i, MARGIN_COLUMN)} is {margin!r}: a margin is a number (how much more "
                                "the chosen answer must score); remove the column to train without margins")

    def _sides(self, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        pair = read_pair(row, self.cfg)
        return tuple(encode_answer(self.tokenizer, pair.prompt, getattr(pair, s))["input_ids"]
                     for s in ("chosen", "rejected"))

    def encode(self, row: dict[str, Any], fmt: str) -> dict[str, Any]:
        """Both whole conversations; ``usable`` false when one is longer than ``max_length`` (dropped, as TRL
        drops it) or ends with the padding token (the head would read the token before it)."""
        chosen, rejected = self._sides(row)
        truncated = max(len(chosen), len(rejected)) > self.cfg.max_length
        pad = self.tokenizer.pad_token_id
        if chosen[-1] == pad or rejected[-1] == pad:
            raise RecipeError(f"the tokenizer pads with {self.tokenizer.pad_token!r}, which ends these conversations: "
                              "the reward head reads the last token that is not padding; give the tokenizer "
                              "another pad token")
        out = {"input_ids": chosen, "rejected_input_ids": rejected, "truncated": truncated, "usable": not truncated}
        if MARGIN_COLUMN in row:
            out["margin"] = float(row[MARGIN_COLUMN])
        return out

    def collate(self, rows: list[dict[str, Any]], augment: Callable[[dict], dict] | None = None) -> Batch:
        """Chosen then rejected sequences in one right-padded batch; ``margin`` when the data has one."""
        pad = self.tokenizer.pad_token_id
        seqs = [{"input_ids": r["input_ids"], "labels": 0} for r in rows] + \
            [{"input_ids": r["rejected_input_ids"], "labels": 0} for r in rows]
        batch = pad_right(seqs, pad)
        del batch["labels"]
        if "margin" in rows[0]:
            batch["margin"] = torch.tensor([r["margin"] for r in rows], dtype=torch.float)
        return batch

    def example_text(self, row: dict[str, Any], fmt: str) -> str:
        return pair_text(read_pair(row, self.cfg))

    def length(self, row: dict[str, Any], fmt: str) -> int:
        return max(len(s) for s in self._sides(row))

    def describe(self, row: dict[str, Any], fmt: str) -> str:
        """Both conversations as the head reads them (scored at the last token)."""
        return "\n".join(f"--- {side}: {self.tokenizer.decode(ids)}"
                         for side, ids in zip(("chosen", "rejected"), self._sides(row), strict=True))

    def generation_example(self, row: dict[str, Any], fmt: str) -> GenerationExample | None:
        return None  # a reward model scores text, it does not generate

    def prompt_of(self, row: dict[str, Any]) -> tuple[str, str]:
        """(the prompt as the model reads it, as text): what ``lora-ft predict`` scores completions after."""
        pair = read_pair(row, self.cfg)
        return render_prompt(self.tokenizer, pair.prompt), prompt_text(pair.prompt)

    # ------------------------------------------------------------------------------------ optimisation
    def items(self, batch: Batch) -> torch.Tensor:
        return batch["input_ids"].new_tensor(batch["input_ids"].shape[0] // 2)

    def _scores(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        r = rewards(model, batch)
        n = r.shape[0] // 2
        return r[:n], r[n:]

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        chosen, rejected = self._scores(model, batch)
        return bradley_terry(chosen, rejected, batch.get("margin")).sum()

    # -------------------------------------------------------------------------------------- evaluation
    def eval_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        chosen, rejected = self._scores(model, batch)
        return {"loss": bradley_terry(chosen, rejected, batch.get("margin")), "reward_chosen": chosen,
                "reward_rejected": rejected}

    def summarize(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean loss; reward accuracy (ties count half), margin and mean rewards of both sides."""
        v = {k: t.double() for k, t in values.items()}
        margin = v["reward_chosen"] - v["reward_rejected"]
        return {"loss": v["loss"].mean().item(), "examples": len(margin),
                "reward_accuracy": ((margin > TIE).double() + 0.5 * (margin.abs() <= TIE).double()).mean().item(),
                "reward_margin": margin.mean().item(), "reward_chosen": v["reward_chosen"].mean().item(),
                "reward_rejected": v["reward_rejected"].mean().item()}

    def selection_noise(self, metrics: dict[str, float]) -> list[float]:
        """Accuracy's standard error at 50% on this many pairs, then float noise for the loss."""
        return [1e-6 if m == "loss" else 0.5 / max(metrics["examples"], 1) ** 0.5 for m in self.selected_by]

    @torch.no_grad()
    def label_logits(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pair's (chosen, rejected) rewards as two logits, the chosen side the target: the merge check compares
        the Bradley-Terry probabilities a merged model gives (a one-label softmax would always be 1)."""
        chosen, rejected = self._scores(model, batch)
        return torch.stack([chosen, rejected], -1), torch.zeros(len(chosen), dtype=torch.long, device=chosen.device)
