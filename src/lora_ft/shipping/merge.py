"""``lora-ft merge``: fold a run's adapter into a full-precision base, prove the merge faithful, save it.

A QLoRA adapter was trained against the *NF4-rounded* base weights, not the original ones. Merging it into the
original 16/32-bit weights (what most scripts do) or into the 4-bit weights followed by re-quantization (what
peft does on a quantized base) gives a model that differs from the one that was evaluated. By default we merge
into the de-quantized weights the adapter saw, and we measure the result: on held-out examples the merged
model's next-token (or class) distributions are compared with the adapter model's (KL divergence, top-1
agreement, max logit difference), recorded in ``RUN_DIR/merge_report.json``, and a merge above the documented
limit is refused.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.prepare import prepare_data
from ..errors import FidelityError, RunError, UsageError
from ..modeling.loading import DTYPES, load_model
from ..objectives import Objective, objective_for
from ..run import (
    MERGE_MARKER,
    MERGE_REPORT,
    MERGED,
    Run,
    default_device,
    is_merge_of,
    load_adapter_model,
    load_run_tokenizer,
    merge_owner,
    open_run,
)
from ..scoring.suite import GenerationSuite
from ..storage import write_folder
from ..training.session import make_loader
from .stops import check_stops, gate_suite, generated_stops

log = logging.getLogger(__name__)

# Mean KL(adapter model ‖ merged model), in nats per compared position, above which ``merge`` refuses to save
# the merged model (``--force`` saves it anyway). The limit depends on the lower of the two precisions involved
# (the reference's compute dtype and the merged dtype). Measured on the quickstart (SmolLM2-135M, NF4 QLoRA):
# merged into the de-quantized weights in fp32, KL 1e-11 (float rounding only); into the original weights
# instead, KL 0.23 with 79% top-1 agreement. 1e-3 separates the two by orders of magnitude. Casting the
# faithful merge to 16 bits adds rounding noise of its own (KL 1.3e-3 in bf16, 2e-5 in fp16), hence looser
# limits there; fp16's real risk, overflow, shows up as a huge or NaN KL either way.
KL_LIMITS: dict[str, float] = {"fp32": 1e-3, "fp16": 5e-3, "bf16": 2e-2}
# Embedding runs (``Objective.fidelity_measure``): 1 - mean cosine similarity of each text's embedding before and
# after. Measured on the tests' tiny embedding run (fp32 LoRA, 48 texts): 6e-15 merged in fp32 (float rounding),
# 1.4e-7 cast to fp16, 7.8e-6 to bf16; the limits leave an order of magnitude or more above those.
COSINE_LIMITS: dict[str, float] = {"fp32": 1e-4, "fp16": 1e-3, "bf16": 1e-2}
# The reference distributions are kept in memory (fp32, one vocabulary-sized row per position): at most this
# many positions are compared, ≈1 GB for a 128k-token vocabulary.
MAX_POSITIONS = 2048
PRECISION_ORDER = ("fp32", "fp16", "bf16")  # increasing rounding error


def _check_out(run: Run, out: Path) -> None:
    """``--out`` may replace only an earlier merge of this run (``run.is_merge_of``): never the base model's
    folder, the run itself, the current directory, nor anything else."""
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise UsageError(f"--out {out} is the current directory or one above it; give the merged model a folder of "
                         "its own, e.g. --out merged-model")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    fix = "choose another --out or remove it"
    if not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a merged model folder; {fix}")
    if is_merge_of(run, out):
        return
    owner = merge_owner(out)
    if owner:
        raise UsageError(f"--out {out} holds the merged model of another run ({owner}); {fix}")
    raise UsageError(f"--out {out} exists and is not a merged model folder of this run; {fix}")


# ------------------------------------------------------------------------------------------- fidelity
def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def collect_outputs(model: torch.nn.Module, loader, objective: Objective, device: torch.device,
                    max_positions: int = MAX_POSITIONS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The objective's label-position logits of every batch (on the CPU, fp32), stopping once ``max_positions``
    are in."""
    out, n = [], 0
    model.eval()
    for batch in loader:
        logits, target = objective.label_logits(model, _to(batch, device))
        out.append((logits.float().cpu(), target.cpu()))
        n += len(target)
        if n >= max_positions:
            break
    return out


def compare_outputs(ref: list[tuple[torch.Tensor, torch.Tensor]],
                    new: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """KL(ref ‖ new) per position (mean and max), top-1 agreement, max |logit difference|, and both losses."""
    kls, agree, max_diff, loss_ref, loss_new, n = [], 0, 0.0, 0.0, 0.0, 0
    for (r, t), (m, t2) in zip(ref, new, strict=True):
        if not torch.equal(t, t2):
            raise RuntimeError("fidelity batches differ between the two passes")  # a bug, not a user error
        lr, lm = F.log_softmax(r.double(), -1), F.log_softmax(m.double(), -1)
        # Clamped at 0: KL is non-negative, but near-identical distributions give ±1e-12 rounding noise.
        kls.append(F.kl_div(lm, lr, log_target=True, reduction="none").sum(-1).clamp(min=0))
        agree += (r.argmax(-1) == m.argmax(-1)).sum().item()
        max_diff = max(max_diff, (r - m).abs().max().item())
        loss_ref += F.nll_loss(lr, t, reduction="sum").item()
        loss_new += F.nll_loss(lm, t, reduction="sum").item()
        n += len(t)
    kl = torch.cat(kls)
    return {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(), "top1_agreement": agree / n,
            "max_abs_logit_diff": max_diff, "loss_adapter": loss_ref / n, "loss_merged": loss_new / n,
            "positions": n}


@dataclass
class HeldOut:
    """The held-out examples an export is compared on."""

    loader: DataLoader
    split: str
    examples: int
    suite: GenerationSuite | None
    """The generation evaluation on the same split, for the stop-rate check (None: data without prompts)."""


def fidelity_loader(run: Run, objective: Objective, examples: int, data_file: str | None,
                    tokenizer: PreTrainedTokenizerBase) -> HeldOut:
    """Held-out examples for the comparison: ``--data``, else the run's validation data, else its test data."""
    cfg = run.recipe.data.model_copy(update={"max_eval_examples": examples})
    extra, need_train = None, False
    if data_file:
        cfg, extra, split = cfg.model_copy(update={"validation": None, "validation_split": 0.0, "test": None}), \
            {"fidelity": data_file}, "fidelity"
    elif cfg.validation or cfg.validation_split:
        # validation_split is carved from train with the run's seed, so the same examples are held out.
        cfg, split, need_train = cfg.model_copy(update={"test": None}), "validation", not cfg.validation
    elif cfg.test:
        split = "test"
        log.info("the run has no validation data: measuring merge fidelity on its test data")
    else:
        raise RunError(f"{run.dir}: the recipe names no validation or test data to measure the merge on; "
                       "pass --data FILE (held-out examples in the run's data format)")
    data = prepare_data(cfg, objective, run.recipe.train.seed, need_train, extra, run.id2label)
    ds = data.splits[split]
    loader = make_loader(ds, run.recipe.train.eval_batch_size, objective.collate, False, 0)
    return HeldOut(loader, split, len(ds), gate_suite(run, objective, tokenizer, data, split, examples))


# ---------------------------------------------------------------------------------------------- merge
def _dequantized_base(adapter_model: PeftModel) -> PreTrainedModel:
    """The adapter model's own base, de-quantized: exactly the rounded weights the adapter was trained on."""
    base = adapter_model.unload()  # back to the quantized base (Linear4bit / Linear8bitLt), adapter removed
    base = base.dequantize(dtype=torch.float32)  # transformers: bnb layers → nn.Linear, quantization config gone
    # transformers leaves these flags set after de-quantizing; peft and our is_quantized() read them.
    base.is_loaded_in_4bit = base.is_loaded_in_8bit = False
    return base


def build_merged(run: Run, adapter_model: PeftModel | None, base: str, device: torch.device,
                 tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Merge the adapter into an fp32 base: de-quantized (default for quantized runs) or original weights.
    Consumes ``adapter_model`` (the reference), which the original-weights path does not need."""
    if not run.quantized and adapter_model is not None:
        # The reference was loaded unquantized in fp32: merging it in place is the same as a fresh load.
        return adapter_model.merge_and_unload(safe_merge=True)
    if base == "dequantized" and adapter_model is not None:
        model = _dequantized_base(adapter_model)
    else:
        cfg = run.recipe.model.model_copy(update={"name": run.source(), "quant": "none"})
        model = load_model(cfg, "fp32", device, run.id2label, tokenizer).model
    model = model.to(torch.float32)
    # Re-attach the saved adapter to the plain (nn.Linear) base, so peft merges W + BA exactly, instead of
    # merging through its bnb layers (de-quantize, add, re-quantize: the rounding this command avoids).
    peft_model = PeftModel.from_pretrained(model, str(run.adapter_dir))
    return peft_model.merge_and_unload(safe_merge=True)


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path,
                max_shard_size: str | int, marker: dict[str, Any], objective: Objective | None = None) -> None:
    """A folder ``AutoModelFor*.from_pretrained`` opens alone: sharded safetensors, config (with ``id2label``),
    tokenizer with its chat template, generation config, the objective's own files (an embedding model's
    sentence-transformers pipeline); plus ``MERGE_MARKER`` (``marker``: which run wrote it).
    Written through ``checkpoint.write_folder`` (a temporary folder, then renamed in)."""
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # de-quantized weights: a leftover config would make loaders re-quantize
    config.use_cache = True  # training may have switched the KV cache off; inference wants it
    if model.can_generate() and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        if objective is not None:
            objective.write_model_files(model, tmp)
        (tmp / MERGE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")

    write_folder(out, write, retry="free disk space (or choose another --out) and run lora-ft merge again")


def _limit_key(*dtypes: str) -> str:
    return max(dtypes, key=PRECISION_ORDER.index)


def _checked_args(run: Run, dtype: str, base: str, examples: int) -> str:
    """The merged dtype (``auto``: the run's compute dtype); every flag checked before anything is loaded."""
    dtype = run.compute_dtype if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)} (or auto)")
    if base not in ("dequantized", "original"):
        raise UsageError(f"--base {base}: choose dequantized or original")
    if examples < 1:
        raise UsageError(f"--examples {examples}: compare on at least 1 example")
    return dtype


def _record(run: Run, key: str, entry: dict[str, Any]) -> Path:
    """Add (or replace) one entry of ``RUN_DIR/merge_report.json``; returns its path."""
    return run.folder.record(MERGE_REPORT, key, entry)


def merge_run(run_dir: str | Path, dtype: str = "auto", base: Literal["dequantized", "original"] = "dequantized",
              out: str | Path | None = None, force: bool = False, examples: int = 64, data_file: str | None = None,
              max_shard_size: str | int = "5GB", device: torch.device | str | None = None) -> dict[str, Any]:
    """``lora-ft merge``: merge, measure against the adapter model, record, save (or refuse).

    Returns the report entry (also stored under ``"<base>-<dtype>"`` in ``RUN_DIR/merge_report.json``).
    Raises ``FidelityError`` after writing the report when the mean KL exceeds ``KL_LIMITS``, unless ``force``.
    """
    run = open_run(run_dir)
    dtype = _checked_args(run, dtype, base, examples)
    out = Path(out) if out else run.dir / MERGED
    _check_out(run, out)  # before any loading: a refused --out costs nothing
    with run.folder.lock():  # no training (or other merge) writes into the run meanwhile
        return _merge(run, dtype, base, out, force, examples, data_file, max_shard_size, device)


def _merge(run: Run, dtype: str, base: str, out: Path, force: bool, examples: int, data_file: str | None,
           max_shard_size: str | int, device: torch.device | str | None) -> dict[str, Any]:
    """``merge_run`` once its flags are checked and the run is locked (see there)."""
    device = torch.device(device) if device else default_device()
    effective_base = base if run.quantized else "original"
    t0 = time.perf_counter()

    tokenizer = load_run_tokenizer(run)
    objective = objective_for(run.recipe, tokenizer)
    objective.restore(run.info.get("objective") or {})
    held = fidelity_loader(run, objective, examples, data_file, tokenizer)
    loader, split, n_examples = held.loader, held.split, held.examples
    adapter_model = load_adapter_model(run, device, tokenizer)
    log.info("reference: the adapter model (%s base, compute %s) on %d %s examples",
             run.recipe.model.quant, run.compute_dtype, n_examples, split)
    reference = collect_outputs(adapter_model, loader, objective, device)
    stops_before = generated_stops(held.suite, adapter_model)  # before the merge consumes the adapter model
    if run.quantized and base == "original":
        adapter_model = None  # not needed any more: free it before the full-precision base is loaded
        gc.collect()

    merged = build_merged(run, adapter_model, base, device, tokenizer).to(DTYPES[dtype]).eval()
    outputs = collect_outputs(merged, loader, objective, device)
    metrics = objective.compare_outputs(reference, outputs) or compare_outputs(reference, outputs)
    stops = check_stops(held.suite, stops_before, merged, tokenizer, "merged")
    limit_key = _limit_key(dtype, run.compute_dtype)
    measure = objective.fidelity_measure
    limit = (KL_LIMITS if measure == "kl_mean" else COSINE_LIMITS)[limit_key]
    passed = metrics[measure] <= limit and stops.get("stops_ok", True)
    entry = {
        "base": effective_base, "dtype": dtype, "quant": run.recipe.model.quant,
        "reference_compute_dtype": run.compute_dtype, "data": split, "examples": n_examples,
        "compared": objective.compared, **metrics, **stops, "fidelity_measure": measure, "kl_limit": limit,
        "kl_limit_dtype": limit_key,
        "passed": passed, "saved": passed or force, "out": str(out.resolve()),
        "seconds": round(time.perf_counter() - t0, 1),
        "written": datetime.now(timezone.utc).isoformat(timespec="microseconds"),  # the latest merge: see export
    }
    log.info("merge fidelity (%s base, %s): %s %.3g (limit %.0e); %s", effective_base, dtype, measure,
             metrics[measure], limit, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != measure))
    if not passed and not force:
        report_path = _record(run, f"{effective_base}-{dtype}", entry)
        hint = ", or merge with the default --base dequantized" if run.quantized and base == "original" else ""
        label = "mean KL" if measure == "kl_mean" else measure
        why = (f"{label} {metrics[measure]:.3g} > {limit:g} ({limit_key}) on {metrics['positions']} positions"
               if metrics[measure] > limit else stops["stops_problem"])
        raise FidelityError(f"the merged model does not reproduce the adapter model: {why}; nothing saved (report "
                            f"in {report_path}). Pass --force to save it anyway{hint}")
    if not passed:
        log.warning("saving a merge above the fidelity limit because --force was given")
    objective.configure(merged.config)  # problem type, thresholds: what a plain load needs to predict alike
    save_merged(merged, tokenizer, out, max_shard_size, {"run_dir": str(run.dir.resolve()), "base": effective_base,
                                                          "dtype": dtype, "written": entry["written"]}, objective)
    _record(run, f"{effective_base}-{dtype}", entry)  # after the save: the report never names a merge not saved
    log.info("merged model written to %s", out)
    return entry
