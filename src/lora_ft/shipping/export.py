"""``lora-ft export --format gguf``: the run's merged model as one GGUF file, proven faithful, plus a Modelfile.

The GGUF carries the merge ``lora-ft merge`` makes (the adapter folded into the de-quantized weights it was
trained on), written by ``gguf_file.write_gguf``. Before the file is kept it is read back by an independent
reader, transformers' GGUF loader (``from_pretrained(..., gguf_file=...)``: its own metadata parsing, Q/K
un-permutation, de-quantization and tokenizer rebuilding), and compared with the adapter model on the run's
held-out answers, exactly as merges are: next-token KL, top-1 agreement, loss; and the tokenizer rebuilt from
the file must give the same token ids as the run's on every compared example. Results go to
``RUN_DIR/export_report.json``; an export above its quantization type's KL limit is refused unless ``--force``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..errors import FidelityError, RunError, UsageError
from ..modeling.gguf_rope import read_rope_factors
from ..modeling.loading import load_config
from ..objectives import objective_for
from ..run import EXPORT_REPORT, GGUF_DIR, Run, default_device, load_adapter_model, load_run_tokenizer, open_run
from .gguf_file import QUANT_TYPES, add_bos_eos, check_exportable, write_gguf
from .merge import build_merged, collect_outputs, compare_outputs, fidelity_loader
from .modelfile import modelfile
from .stops import check_stops, generated_stops

log = logging.getLogger(__name__)

# Mean KL(adapter model ‖ GGUF model), nats per answer token, above which ``export`` refuses to keep the file.
# Measured on the quickstart run (SmolLM2-135M, NF4 QLoRA, 478 answer tokens of 48 validation examples; README
# "Export to GGUF / Ollama"): f32 1.1e-11, f16 3.2e-6, bf16 9.9e-5, q8_0 2.3e-3, q5_1 0.058, q5_0 0.22,
# q4_1 0.39, q4_0 0.39. The 16-bit and 8-bit limits sit ~10x above their rounding; the 4/5-bit limit is set by
# what the file is for: 0.1 is well under the fine-tune's own effect (KL 0.26 between the adapter model and the
# original weights, the merge's measurement), so a file that loses most of the adaptation is refused. On this
# 135M model q5_0 and the 4-bit types do (top-1 agreement 68-77%), and need --force; larger models round better.
KL_LIMITS: dict[str, float] = {"f32": 1e-3, "f16": 5e-3, "bf16": 2e-2, "q8_0": 2e-2,
                               "q5_1": 0.1, "q5_0": 0.1, "q4_1": 0.1, "q4_0": 0.1}
MODELFILE = "Modelfile"
MODELFILE_MARK = "# Ollama Modelfile written by lora_ft"


def default_out(run: Run, quant: str) -> Path:
    """``RUN_DIR/gguf/<run>-<QUANT>.gguf``: llama.cpp's naming, which tools read the quantization type from."""
    return run.dir / GGUF_DIR / f"{run.dir.resolve().name}-{quant.upper()}.gguf"


def _check_out(run: Run, out: Path) -> None:
    """``--out`` may replace only a GGUF this run exported, and the Modelfile beside it only one lora_ft wrote."""
    if out.suffix != ".gguf":
        raise UsageError(f"--out {out}: give a file name ending in .gguf")
    if out.exists():
        ours = {str(Path(e["out"]).resolve()) for e in run.folder.read_json(EXPORT_REPORT).values()
                if isinstance(e, dict) and e.get("out")}
        if out.is_dir() or str(out.resolve()) not in ours:
            raise UsageError(f"--out {out} exists and is not a GGUF file exported from this run; choose another "
                             "--out or remove it")
    mf = out.parent / MODELFILE
    if mf.is_file() and not mf.read_text(encoding="utf-8", errors="replace").startswith(MODELFILE_MARK):
        raise UsageError(f"{mf} exists and was not written by lora_ft; export to another folder (--out) or "
                         "remove it")


def _checked(run: Run, quant: str, examples: int) -> None:
    """Every flag and the run's architecture checked before any weights are loaded."""
    if quant not in QUANT_TYPES:
        raise UsageError(f"--quant {quant}: choose one of {', '.join(QUANT_TYPES)} (what the gguf package can "
                         "write; k-quants need llama.cpp's llama-quantize)")
    if examples < 1:
        raise UsageError(f"--examples {examples}: compare on at least 1 example")
    if not run.causal:
        raise UsageError(f"GGUF export is for causal LM runs; {run.dir} is a {run.recipe.model.task} run")
    config = load_config(run.source(), run.recipe.model)  # a damaged base config is one line, as in training
    check_exportable(config, load_run_tokenizer(run))


def compare_tokenizers(ours: PreTrainedTokenizerBase, theirs: PreTrainedTokenizerBase,
                       texts: list[str]) -> dict[str, Any]:
    """Token ids of ``texts`` under both tokenizers (special tokens parsed, none added), the BOS/EOS flags, the
    special token ids and the chat template. ``identical``: how many texts got the same ids."""
    same = [ours(t, add_special_tokens=False)["input_ids"] == theirs(t, add_special_tokens=False)["input_ids"]
            for t in texts]
    first = next((texts[i][:120] for i, ok in enumerate(same) if not ok), None)
    specials = {k: (getattr(ours, k), getattr(theirs, k)) for k in ("bos_token_id", "eos_token_id")}
    return {"texts": len(texts), "identical": sum(same), "first_mismatch": first,
            "add_bos_eos": add_bos_eos(ours) == add_bos_eos(theirs),
            "special_ids": all(a == b for a, b in specials.values()),
            "chat_template": (ours.chat_template or "") == (theirs.chat_template or "")}


def _tokenizer_ok(t: dict[str, Any]) -> bool:
    return t["identical"] == t["texts"] and t["add_bos_eos"] and t["special_ids"] and t["chat_template"]


def load_gguf(path: Path, device: torch.device) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A GGUF file through transformers' reader (fp32), with the tokenizer and generation config it rebuilds from
    the file's metadata: what llama.cpp and Ollama read."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    factors = read_rope_factors(path)
    if factors is not None:
        # transformers' reader ignores rope_freqs (Llama 3.1+'s scaled RoPE) and builds unscaled RoPE; llama.cpp
        # divides each frequency by the file's factor, and so does this, from the file alone.
        rotary = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
        if not rotary or any(m.inv_freq.shape != factors.shape for m in rotary):
            raise RunError(f"{path}: its rope_freqs ({tuple(factors.shape)}) fit no rotary embedding of the model "
                           "transformers reads from it")
        for m in rotary:
            m.inv_freq = m.original_inv_freq = m.inv_freq / factors
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _read_back(path: Path, loader, objective, device: torch.device, tokenizer: PreTrainedTokenizerBase,
               texts: list[str], stops: Callable[..., dict[str, Any]]):
    """The file through transformers' GGUF reader: its outputs on ``loader``, its tokenizer's agreement, and its
    stop check (``stops``: ``stops.check_stops`` bound to the adapter model's answers)."""
    model, their_tokenizer = load_gguf(path, device)
    outputs = collect_outputs(model, loader, objective, device)
    stopped = stops(model, their_tokenizer, "gguf")
    del model
    gc.collect()
    return outputs, compare_tokenizers(tokenizer, their_tokenizer, texts), stopped


def write_modelfile(run: Run, gguf_name: str, folder: Path, tokenizer: PreTrainedTokenizerBase | None = None) -> bool:
    """``folder/Modelfile`` for the GGUF file ``gguf_name`` in ``folder``; returns whether the chat template was
    translated. BOS: llama.cpp adds it when the tokenizer does, so the template must not write it again."""
    tokenizer = tokenizer or load_run_tokenizer(run)
    lead = tokenizer.bos_token if add_bos_eos(tokenizer)[0] else ""
    text, translated = modelfile(gguf_name, tokenizer, run.recipe.data.system_prompt, lead=lead or "")
    (folder / MODELFILE).write_text(text, encoding="utf-8")
    return translated


REFERENCE_DTYPE = "fp32"
"""The compute dtype of the adapter model an export is compared with (``_export``)."""


def export_run(run_dir: str | Path, quant: str = "q8_0", out: str | Path | None = None, force: bool = False,
               examples: int = 64, data_file: str | None = None,
               device: torch.device | str | None = None) -> dict[str, Any]:
    """``lora-ft export --format gguf``: merge, write, read back, compare, keep (or refuse).

    Returns the report entry (also stored under ``"gguf-<quant>"`` in ``RUN_DIR/export_report.json``). Raises
    ``FidelityError`` after writing the report when the KL limit or the tokenizer check fails, unless ``force``.
    The GGUF is written to a temporary name beside ``out`` and renamed into place only once it is kept.
    """
    run = open_run(run_dir)
    _checked(run, quant, examples)
    out = Path(out) if out else default_out(run, quant)
    _check_out(run, out)  # before any loading: a refused --out costs nothing
    with run.folder.lock():  # no training, merge or push rewrites the run (or its report) meanwhile
        return _export(run, quant, out, force, examples, data_file, device)


def _export(run: Run, quant: str, out: Path, force: bool, examples: int, data_file: str | None,
            device: torch.device | str | None) -> dict[str, Any]:
    """``export_run`` once its flags are checked and the run is locked (see there)."""
    device = torch.device(device) if device else default_device()
    t0 = time.perf_counter()
    tokenizer = load_run_tokenizer(run)
    objective = objective_for(run.recipe, tokenizer)
    held = fidelity_loader(run, objective, examples, data_file, tokenizer)
    loader, split, n_examples = held.loader, held.split, held.examples
    texts = [tokenizer.decode(ids, clean_up_tokenization_spaces=False) for ids in loader.dataset["input_ids"]]
    # The reference is the adapter model computed in fp32, whatever dtype training computed in: a GGUF file is read
    # back (and by llama.cpp) de-quantized to fp32, and a bf16-computed reference put bf16 rounding (KL 0.05 on the
    # chat quickstart trained under compute_dtype auto = bf16) into what q8_0's limit of 0.02 measures.
    adapter_model = load_adapter_model(run, device, tokenizer, compute_dtype=REFERENCE_DTYPE)
    reference = collect_outputs(adapter_model, loader, objective, device)
    stops_before = generated_stops(held.suite, adapter_model)
    merged = build_merged(run, adapter_model, "dequantized", device, tokenizer).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial{os.getpid()}.gguf")
    try:
        counts = write_gguf(merged, tokenizer, tmp, quant, run.dir.resolve().name)
        del merged, adapter_model  # the reader's copy is loaded next: never three models in memory at once
        gc.collect()
        outputs, tokens, stops = _read_back(tmp, loader, objective, device, tokenizer, texts,
                                            partial(check_stops, held.suite, stops_before))
        size = tmp.stat().st_size
        metrics = compare_outputs(reference, outputs)
        passed = metrics["kl_mean"] <= KL_LIMITS[quant] and _tokenizer_ok(tokens) and stops.get("stops_ok", True)
        if passed or force:
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    metrics["loss_gguf"] = metrics.pop("loss_merged")
    entry = {"format": "gguf", "quant": quant, "tensor_types": counts, "size_bytes": size,
             "run_quant": run.recipe.model.quant, "reference_compute_dtype": REFERENCE_DTYPE, "data": split,
             "examples": n_examples, "compared": objective.compared, **metrics, **stops, "tokenizer": tokens,
             "kl_limit": KL_LIMITS[quant], "passed": passed, "saved": passed or force, "out": str(out.resolve()),
             "seconds": round(time.perf_counter() - t0, 1),
             # Microseconds: "the latest export" is the max of these, and two exports can fall in one second.
             "written": datetime.now(timezone.utc).isoformat(timespec="microseconds")}
    return _conclude(run, entry, tokenizer)


def _conclude(run: Run, entry: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The Modelfile beside a kept file, the report entry recorded, and the refusal of a file that failed its
    check (after the report is written: the measurements of a refused export are kept too)."""
    if entry["saved"]:
        entry["modelfile_template"] = write_modelfile(run, Path(entry["out"]).name, Path(entry["out"]).parent,
                                                      tokenizer)
    report_path = run.folder.record(EXPORT_REPORT, f"gguf-{entry['quant']}", entry)
    quant, limit, tokens = entry["quant"], entry["kl_limit"], entry["tokenizer"]
    log.info("GGUF fidelity (%s, %.1f MB): mean KL %.3g (limit %g), top-1 agreement %.4f, loss %.4f vs %.4f, "
             "tokenizer %d/%d texts identical", quant, entry["size_bytes"] / 1e6, entry["kl_mean"], limit,
             entry["top1_agreement"], entry["loss_adapter"], entry["loss_gguf"], tokens["identical"], tokens["texts"])
    if not entry["saved"]:
        why = (f"mean KL {entry['kl_mean']:.3g} > {limit:g} ({quant}) on {entry['positions']} positions"
               if entry["kl_mean"] > limit else entry["stops_problem"] if not entry.get("stops_ok", True)
               else f"the tokenizer read back from the file differs ({json.dumps(tokens)})")
        raise FidelityError(f"the GGUF file does not reproduce the adapter model: {why}; nothing saved (report in "
                            f"{report_path}). Pass --force to keep it anyway")
    if not entry["passed"]:
        log.warning("keeping a GGUF file that failed its fidelity check because --force was given")
    log.info("GGUF written to %s (Modelfile beside it)", entry["out"])
    return entry


def latest_export(run: Run, gguf_file: str | Path | None = None) -> dict[str, Any]:
    """The report entry of ``gguf_file`` (default: the latest passing export whose file still exists)."""
    entries = [e for e in run.folder.read_json(EXPORT_REPORT).values()
               if isinstance(e, dict) and e.get("saved") and Path(e.get("out", "")).is_file()]
    if gguf_file is not None:
        entries = [e for e in entries if Path(e["out"]).resolve() == Path(gguf_file).resolve()]
    else:
        entries = [e for e in entries if e.get("passed")]
    if not entries:
        what = f"no export of {gguf_file} is recorded" if gguf_file else "no passing GGUF export is recorded"
        raise RunError(f"{run.dir}: {what} in {EXPORT_REPORT}; run 'lora-ft export {run.dir} --format gguf' first")
    return max(entries, key=lambda e: e.get("written", ""))
