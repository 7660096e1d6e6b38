"""Preference tuning of a causal LM: DPO, IPO, SimPO (and CPO-SimPO) and ORPO on ``{prompt, chosen, rejected}``.

**Batches.** The chosen and rejected answers of n pairs are one left-padded batch of 2n sequences (chosen first,
``causal_lm.pad_left``), so one forward scores both and every answer ends at the right edge: ``logits_to_keep``
and the chunked head (``chunked_loss``) give the per-token losses of the answer positions only, never the full
vocabulary for every position. A sequence's log-probability is minus the sum of its answer tokens' losses.

**The reference (DPO, IPO).** The reference model is the model before preference tuning. For a fresh adapter that
is the base model, which is the same weights with the adapter switched off (``PeftModel.disable_adapter``): no
second copy is loaded, quantized or not; its log-probs are computed once per batch, without gradients, in eval
mode (no dropout). With ``lora.init_from`` (SFT → DPO) the reference is the *starting adapter*, as TRL makes it
(its frozen "ref" copy), not the base: its log-probs are computed once for every split before the first step
(``prepare``), while the model still holds the starting adapter. That needs neither a second adapter in memory
nor switching adapters inside a DDP step. ``objective.precompute_reference: true`` does the same for a fresh
adapter. The values are cached in the run folder, so a resumed run reuses them.

**Normalisation.** The loss of a pair is summed and divided by the pairs of the whole global batch (``items``),
as TRL's per-batch mean; ORPO's (and CPO-SimPO's) NLL term is summed over tokens and divided by the NLL tokens of
the global batch, as TRL's token mean: ``items`` returns both counts, ``loss`` both sums.

**Checked against TRL 1.16** (``tests/test_preference.py``): the loss values and LoRA gradients of ``DPOTrainer``
(``sigmoid``, ``ipo``), ``experimental.cpo.CPOTrainer`` (``simpo``) and ``experimental.orpo.ORPOTrainer``.
ORPO's NLL covers the chosen prompt as well as the answer, as TRL and the ORPO authors' code do.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ..data.cells import Where, text_problem
from ..data.chat import IGNORE, prompt_text, render_prompt
from ..data.preference import encode_answer, pair_text, read_pair
from ..errors import DataError, RecipeError
from ..modeling.adapters import adapter_state_dict
from ..recipe import AugmentConfig, DataConfig, ObjectiveConfig
from ..recipe.objective import REFERENCE_OBJECTIVES
from .base import Batch, GenerationExample
from .causal_lm import CausalLM, pad_left, token_losses
from .chunked_loss import innermost

log = logging.getLogger(__name__)
_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "labels", "logits_to_keep")
TIE = 1e-4
"""Rewards closer than this count as a tie in the reward accuracy: fp32 rounding of a sequence's summed log-prob
(a few 1e-6 between batches padded differently) must not decide a pair, and no trained margin is that small."""


@dataclass
class PairScores:
    """Per-pair log-probabilities of one batch: summed over each answer's tokens, with the answers' token counts,
    the reference's (DPO/IPO) and the NLL of the chosen sequences (ORPO, CPO-SimPO)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    nll: torch.Tensor
    nll_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    @property
    def avg_chosen(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def avg_rejected(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0 without cancellation (branch at −ln 2, Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# ------------------------------------------------------------------------------------------ losses, per pair
def dpo_loss(s: PairScores, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): −log σ(β · (chosen − rejected log-ratio to the reference))."""
    return -F.logsigmoid(beta * ((s.chosen - s.ref_chosen) - (s.rejected - s.ref_rejected)))


def ipo_loss(s: PairScores, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17) on per-token log-ratios, as TRL normalises it: (Δ − 1/(2β))²."""
    delta = (s.chosen - s.ref_chosen) / s.chosen_tokens.clamp(min=1) \
        - (s.rejected - s.ref_rejected) / s.rejected_tokens.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


def simpo_loss(s: PairScores, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024): −log σ(β · (mean log-prob chosen − rejected) − γ), reference-free."""
    return -F.logsigmoid(beta * (s.avg_chosen - s.avg_rejected) - gamma)


def orpo_loss(s: PairScores, beta: float) -> torch.Tensor:
    """ORPO's odds-ratio term (Hong et al. 2024): −β · log σ(log odds(chosen) − log odds(rejected)), on mean
    per-token log-probs; the NLL term is added separately (its own normalisation)."""
    log_odds = (s.avg_chosen - s.avg_rejected) - (log1mexp(s.avg_chosen) - log1mexp(s.avg_rejected))
    return -beta * F.logsigmoid(log_odds)


def pair_rewards(s: PairScores, kind: str, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit rewards TRL logs: β × log-ratio to the reference (DPO, IPO), β × mean log-prob (SimPO, ORPO)."""
    if kind in REFERENCE_OBJECTIVES:
        return beta * (s.chosen - s.ref_chosen), beta * (s.rejected - s.ref_rejected)
    return beta * s.avg_chosen, beta * s.avg_rejected


# ------------------------------------------------------------------------------------------ forward passes
def peft_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The PeftModel under DDP/accelerate wrappers: the module whose adapter can be switched off."""
    while not hasattr(model, "disable_adapter") and hasattr(model, "module"):
        model = model.module
    return model


def sequence_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, ...]:
    """(answer log-prob, answer tokens, summed loss of the labelled tokens, labelled tokens) of every sequence of a
    collated pair batch, from one forward through the chunked loss."""
    losses, target = token_losses(model, {k: batch[k] for k in _MODEL_KEYS})
    answer = batch["completion"][:, batch["completion"].shape[1] - target.shape[1]:]
    return (-(losses * answer).sum(-1), answer.sum(-1), losses.sum(-1), (target != IGNORE).sum(-1))


@torch.no_grad()
def reference_logps(model: torch.nn.Module, batch: Batch, adapter: bool = False) -> torch.Tensor:
    """The answers' log-probs under the reference: the same weights with the adapter switched off (``adapter``:
    left on, for the starting adapter before training), in eval mode, without gradients. Runs on the PeftModel
    itself, not a DDP wrapper: nothing here is synchronised."""
    peft = peft_model_of(model)
    was_training = peft.training
    peft.eval()
    try:
        with nullcontext() if adapter else peft.disable_adapter():
            return sequence_logps(peft, batch)[0]
    finally:
        peft.train(was_training)


def check_pair(row: dict[str, Any], i: int, cfg: DataConfig, where: Where) -> None:
    """Row ``i`` read as a pair (``read_pair``'s layouts) with two non-empty answers, else one DataError naming the
    file and row (preference objectives and reward models read the same pairs)."""
    try:
        pair = read_pair(row, cfg)
    except RecipeError as e:
        raise DataError(f"{where.field}: {where.source} row {i + 1}: {e}") from None
    for side in ("chosen", "rejected"):
        problem = text_problem(getattr(pair, side))
        if problem is not None:
            raise DataError(f"{where.cell(i, getattr(cfg, f'{side}_column'))} {problem}")


class Preference(CausalLM):
    """One of ``PREFERENCE_OBJECTIVES`` on preference pairs.

    Args:
        cfg: the recipe's ``data`` section.
        tokenizer: the model's tokenizer, with its pad token set.
        objective: the recipe's ``objective`` section (type, β, γ, α).
        precompute: compute the reference log-probs once before training (``ObjectiveConfig.precomputes_reference``).
        reference_is_start: the reference is the starting adapter (``lora.init_from``), not the base model.
    """

    formats = ("preference",)
    compared = "next-token distributions on chosen answer tokens"
    sequences_per_example = 2

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, objective: ObjectiveConfig,
                 precompute: bool = False, reference_is_start: bool = False):
        super().__init__(cfg, tokenizer)
        self.kind, self.beta, self.gamma = objective.type, objective.resolved_beta, objective.simpo_gamma
        self.nll_weight = {"orpo": 1.0, "simpo": objective.cpo_alpha}.get(self.kind, 0.0)
        self.uses_reference = self.kind in REFERENCE_OBJECTIVES
        self.precompute = precompute and self.uses_reference
        self.reference_is_start = reference_is_start and self.uses_reference

    # ------------------------------------------------------------------------------------------- data
    def detect_format(self, columns: list[str], split: str) -> str:
        self.need_columns(columns, split, self.cfg.chosen_column, self.cfg.rejected_column)
        return "preference"

    def columns(self, fmt: str) -> dict[str, str]:
        return {}  # a pair's cells take several shapes (strings, message lists): check_rows reads whole pairs

    def check_rows(self, ds: datasets.Dataset, fmt: str, where: Where) -> None:
        """Every row read as a pair before tokenizing: one DataError naming the file and row of the first that is
        not one (``read_pair``'s layouts), or whose answer is empty."""
        for i, row in enumerate(ds):
            check_pair(row, i, self.cfg, where)

    def encode_full(self, row: dict[str, Any], fmt: str) -> dict[str, list[int]]:
        """Both sides of a pair (``fmt`` ``chosen`` or ``rejected``: that side alone, for ``describe``)."""
        pair = read_pair(row, self.cfg)
        if fmt in ("chosen", "rejected"):
            return encode_answer(self.tokenizer, pair.prompt, getattr(pair, fmt))
        chosen = encode_answer(self.tokenizer, pair.prompt, pair.chosen)
        rejected = encode_answer(self.tokenizer, pair.prompt, pair.rejected)
        return {**chosen, "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"]}

    def encode(self, row: dict[str, Any], fmt: str) -> dict[str, Any]:
        out: dict[str, Any] = self.encode_full(row, fmt)
        n = self.cfg.max_length
        out["truncated"] = max(len(out["input_ids"]), len(out["rejected_input_ids"])) > n
        out = {k: v[:n] if isinstance(v, list) else v for k, v in out.items()}
        # Both answers must keep a token; position 0 predicts nothing.
        out["usable"] = all(any(t != IGNORE for t in out[k][1:]) for k in ("labels", "rejected_labels"))
        return out

    def collate(self, rows: list[dict[str, Any]], augment: Callable[[dict], dict] | None = None) -> Batch:
        """Chosen then rejected sequences in one left-padded batch; ``completion`` marks the answer tokens, and
        ``labels`` also the chosen prompts for ORPO's NLL; ``ref_logps`` when precomputed. Single sequences (the
        forgetting guard's general text) are collated as supervised fine-tuning collates them."""
        if "rejected_input_ids" not in rows[0]:
            return super().collate(rows)
        pad = self.tokenizer.pad_token_id
        chosen = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
        rejected = [{"input_ids": r["rejected_input_ids"], "labels": r["rejected_labels"]} for r in rows]
        batch = pad_left(chosen + rejected, pad)
        batch["completion"] = batch["labels"] != IGNORE
        if self.kind == "orpo":
            nll = pad_left([_prompt_and_answer(r) for r in chosen] + rejected, pad)
            batch["labels"], batch["logits_to_keep"] = nll["labels"], nll["logits_to_keep"]
        if "ref_chosen" in rows[0]:
            batch["ref_logps"] = torch.tensor([r["ref_chosen"] for r in rows] + [r["ref_rejected"] for r in rows])
        return batch

    def example_text(self, row: dict[str, Any], fmt: str) -> str:
        return pair_text(read_pair(row, self.cfg))

    def generation_example(self, row: dict[str, Any], fmt: str) -> GenerationExample | None:
        """The pair's prompt, with the chosen answer as the reference."""
        pair = read_pair(row, self.cfg)
        return GenerationExample(render_prompt(self.tokenizer, pair.prompt), prompt_text(pair.prompt), pair.chosen)

    def length(self, row: dict[str, Any], fmt: str) -> int:
        encoded = self.encode_full(row, fmt)
        return max(len(encoded["input_ids"]), len(encoded["rejected_input_ids"]))

    def describe(self, row: dict[str, Any], fmt: str) -> str:
        """Both sides, with the answer tokens that are scored wrapped in [[...]]."""
        return "\n".join(f"--- {side}: " + super(Preference, self).describe(row, side)
                         for side in ("chosen", "rejected"))

    def neftune_alpha(self, cfg: AugmentConfig) -> float | None:
        return None  # refused by the recipe: noise in the policy's forward but not the reference's

    def cannot_pack(self, model: torch.nn.Module) -> str | None:
        return ("a pair's chosen and rejected answers are scored side by side in one left-padded batch (and against "
                "the reference's log-probs); preference pairs are not packed")

    def head_positions(self, batch: Batch) -> torch.Tensor:
        """The labelled positions of the policy's pass (MFU counts the policy's step; a per-batch reference
        forward, 2 FLOPs per weight and token more for dpo/ipo, is not counted, so MFU is understated there)."""
        return (batch["labels"][:, 1:] != IGNORE).sum()

    # ------------------------------------------------------------------------------------ optimisation
    def items(self, batch: Batch) -> torch.Tensor:
        """[pairs, NLL tokens of the chosen sequences]: what ``loss``'s two sums are divided by."""
        labels = batch["labels"]
        n = labels.shape[0] // 2
        return torch.stack([labels.new_tensor(n), (labels[:n, 1:] != IGNORE).sum()])

    def scores(self, model: torch.nn.Module, batch: Batch) -> PairScores:
        """The reference's log-probs, then the policy's (one forward, with gradients when enabled). In that order:
        the reference pass then runs while no activations are held for the backward."""
        ref = None
        if self.uses_reference:
            if "ref_logps" in batch:
                ref = batch["ref_logps"].float()
            elif self.reference_is_start:  # a bug, not a user error: prepare() fills ref_logps first
                raise RuntimeError("the starting adapter's reference log-probs were not precomputed")
            else:
                ref = reference_logps(model, batch)
        logps, tokens, nll, nll_tokens = sequence_logps(model, batch)
        n = logps.shape[0] // 2
        return PairScores(logps[:n], logps[n:], tokens[:n], tokens[n:], nll[:n], nll_tokens[:n],
                          *((ref[:n], ref[n:]) if ref is not None else ()))

    def pair_losses(self, s: PairScores) -> torch.Tensor:
        if self.kind == "dpo":
            return dpo_loss(s, self.beta)
        if self.kind == "ipo":
            return ipo_loss(s, self.beta)
        if self.kind == "simpo":
            return simpo_loss(s, self.beta, self.gamma)
        return orpo_loss(s, self.beta)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """[summed pair losses, weighted summed NLL] (divided by ``items`` by the trainer)."""
        s = self.scores(model, batch)
        return torch.stack([self.pair_losses(s).sum(), self.nll_weight * s.nll.sum()])

    # -------------------------------------------------------------------------------------- evaluation
    def eval_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        s = self.scores(model, batch)
        chosen, rejected = pair_rewards(s, self.kind, self.beta)
        return {"loss": self.pair_losses(s).float(), "nll": s.nll.float(), "nll_tokens": s.nll_tokens,
                "reward_chosen": chosen.float(), "reward_rejected": rejected.float(), "logp_chosen": s.chosen.float(),
                "logp_rejected": s.rejected.float()}

    def summarize(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Loss as training normalises it; reward accuracy (ties count half: before training every DPO reward is
        0, up to float rounding when the reference was precomputed in other batches), margin, mean rewards and mean
        answer log-probs."""
        v = {k: t.double() for k, t in values.items()}
        nll = (v["nll"].sum() / v["nll_tokens"].sum().clamp(min=1)).item()
        chosen, rejected = v["reward_chosen"], v["reward_rejected"]
        margin = chosen - rejected
        out = {"loss": v["loss"].mean().item() + self.nll_weight * nll, "examples": len(chosen),
               "reward_accuracy": ((margin > TIE).double() + 0.5 * (margin.abs() <= TIE).double()).mean().item(),
               "reward_margin": margin.mean().item(), "reward_chosen": chosen.mean().item(),
               "reward_rejected": rejected.mean().item(), "logp_chosen": v["logp_chosen"].mean().item(),
               "logp_rejected": v["logp_rejected"].mean().item()}
        if self.nll_weight:
            out["nll"] = nll
        return out

    @torch.no_grad()
    def label_logits(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The next-token logits of the chosen answers' tokens."""
        n = batch["input_ids"].shape[0] // 2
        chosen = {k: batch[k][:n] for k in ("input_ids", "attention_mask", "position_ids")}
        labels = batch["labels"][:n].masked_fill(~batch["completion"][:n], IGNORE)
        return super().label_logits(model, {**chosen, "labels": labels, "logits_to_keep": batch["logits_to_keep"]})

    # ----------------------------------------------------------------------------- reference precompute
    def prepare(self, model: torch.nn.Module, accelerator, splits: dict[str, datasets.Dataset], batch_size: int,
                cache: Path | None = None) -> dict[str, datasets.Dataset]:
        """With ``precompute``: every split's reference log-probs as the columns ``ref_chosen``/``ref_rejected``,
        read from ``cache`` when it holds them for these examples and this starting model, else computed (each
        process scores a share) and written there by the main process."""
        if not self.precompute:
            return splits
        keys = {name: _fingerprint(ds, model) for name, ds in splits.items()}
        cached = _read_cache(cache, keys) if cache else {}
        out = {}
        for name, ds in splits.items():
            if name not in cached:
                log.info("reference log-probs of %s (%d pairs), once before training", name, len(ds))
                cached[name] = self._reference_of(ds, model, accelerator, batch_size)
            out[name] = ds.add_column("ref_chosen", cached[name][0].tolist()).add_column(
                "ref_rejected", cached[name][1].tolist())
        if cache is not None and accelerator.is_main_process:
            _write_cache(cache, cached, keys)
        return out

    def _reference_of(self, ds: datasets.Dataset, model: torch.nn.Module, accelerator,
                      batch_size: int) -> torch.Tensor:
        """(2, len(ds)) reference log-probs of chosen and rejected; each process scores every world-th pair, in
        batches of similar length."""
        lengths = [len(x) for x in ds["input_ids"]]
        mine = sorted(range(accelerator.process_index, len(ds), accelerator.num_processes), key=lengths.__getitem__)
        loader = DataLoader(ds.select(mine), batch_size=batch_size, collate_fn=self.collate)
        values = []
        with accelerator.autocast():  # as the per-batch reference runs: the prepared model's precision
            for batch in loader:
                batch = {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                ref = reference_logps(model, batch, adapter=self.reference_is_start).float().cpu()
                n = len(ref) // 2
                values += list(zip(ref[:n].tolist(), ref[n:].tolist(), strict=True))
        gathered = gather_object([(i, c, r) for i, (c, r) in zip(mine, values, strict=True)])
        out = torch.empty(2, len(ds))
        for i, c, r in gathered:
            out[0, i], out[1, i] = c, r
        return out


def _prompt_and_answer(row: dict[str, list[int]]) -> dict[str, list[int]]:
    """ORPO's NLL targets: every token of the prompt and the answer (the first predicts nothing; the template's
    text after the answer's EOS is not learned, as in supervised fine-tuning)."""
    ids, labels = row["input_ids"], row["labels"]
    last = max(i for i, t in enumerate(labels) if t != IGNORE)
    return {"input_ids": ids, "labels": [IGNORE, *ids[1:last + 1], *[IGNORE] * (len(ids) - last - 1)]}


def _fingerprint(ds: datasets.Dataset, model: torch.nn.Module) -> str:
    """What a split's reference log-probs depend on: its tokens, the base model and the starting adapter."""
    h = hashlib.sha256()
    for column in ("input_ids", "labels", "rejected_input_ids", "rejected_labels"):
        h.update(repr(ds[column]).encode())
    base = innermost(model)
    h.update(repr((getattr(base.config, "_name_or_path", ""), getattr(base.config, "quantization_config", None),
                   str(next(base.parameters()).dtype))).encode())
    for name, value in sorted(adapter_state_dict(peft_model_of(model)).items()):
        h.update(name.encode())
        h.update(value.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _read_cache(path: Path, keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """The splits of ``path`` whose fingerprint matches ``keys`` (a missing or unreadable file holds none)."""
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            saved = f.metadata() or {}
            return {n: f.get_tensor(n) for n, key in keys.items() if saved.get(n) == key and n in f.keys()}
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file is only a cache miss
        log.warning("ignoring %s: unreadable (%s)", path, e)
        return {}


def _write_cache(path: Path, values: dict[str, torch.Tensor], keys: dict[str, str]) -> None:
    """Written beside and renamed in: a kill leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({n: v.contiguous() for n, v in values.items()}, str(tmp), metadata=keys)
        tmp.replace(path)
    except OSError as e:  # only a cache: training goes on and a resume recomputes
        log.warning("could not cache the reference log-probs in %s (%s)", path, e.strerror or e)
