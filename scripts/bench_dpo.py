"""DPO throughput and memory of lora_ft against TRL's ``DPOTrainer`` + peft, the same QLoRA job on the CPU (issue 14),
and the memory a reference model would cost as a second copy.

    LORA_FT_HOME=/tmp/lfhome HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_dpo.py [--steps 12] [--micro-batch 4]

Prints one JSON line on stdout (logs go to stderr), with the TRL, torch and peft versions, the CPU model, its
relevant flags and the thread count. Both sides train SmolLM2-135M-Instruct, NF4 with double quantization and fp32
compute, LoRA r=16 / alpha=32 / dropout 0 (TRL's DPOTrainer switches dropout off) on the same linear layers, DPO
(sigmoid) with beta 0.1, on the first ``steps × micro-batch`` pairs of ``data/docstring_prefs/train.jsonl``,
max length 256, AdamW at lr 5e-4 with a cosine schedule and 2 warmup steps, gradient clipping at 1.0, seed 42,
gradient checkpointing off, no evaluation. The reference is, on both sides, the same weights with the adapter
switched off, computed once per batch (``precompute_ref_log_probs`` off).

- **lora_ft**: ``lora_ft.training.trainer.train`` on ``recipes/quickstart/smollm2-qlora-dpo.yaml`` with overrides.
- **TRL**: its documented QLoRA DPO recipe, ``DPOTrainer(model=path, quantization_config=BitsAndBytesConfig(...),
  peft_config=LoraConfig(...))``, with TRL's defaults otherwise (its fused, chunked LM head; the LoRA weights of
  a quantized model cast to bf16, as TRL does).

Each side runs in its own fresh process, one after the other:

- **tokens/s**: real (non-padding) tokens of chosen and rejected sequences trained ÷ the training loop's time. lora_ft's
  is the ``tokens_per_s`` of its last logged step; TRL's is its own token count (attention-mask sum of its batches)
  over the time from the start of the epoch to the end of the last step. Each side counts its own tokenization
  (TRL's conversational completions also hold the template's newline after ``<|im_end|>``).
- **peak RSS**: the process's high-water mark over loading and training (``ru_maxrss``) and of the training phase
  alone (reset through ``/proc/self/clear_refs`` once the model is ready).
- **second copy**: in a third process, the model is loaded as lora_ft loads it (``load_model``), twice, each copy
  scoring one short sequence (as a reference pass reads every weight; an fp32 copy is memory-mapped from its
  safetensors file until then): the tensor bytes one copy holds (parameters, buffers and quantization state) and
  the RSS the second copy adds.
  That is what a reference model kept as a second copy would cost; the disabled-adapter reference costs none.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
from pathlib import Path

from bench_train import (
    model_shape,
    parse_or_serve,
    process_peak_mb,
    rss_mb,
    run_child,
    source,
    train_marked,
    trl_timer,
    work_dir,
)

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes/quickstart/smollm2-qlora-dpo.yaml"
DATA = ROOT / "data/docstring_prefs"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LR, WARMUP, SEED, BETA = 5e-4, 2, 42, 0.1

log = logging.getLogger("bench_dpo")


def cpu_facts() -> dict:
    """The CPU model and the flags that decide the kernels used here (AVX-512, its BF16 extension, AMX)."""
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("?", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return {"cpu": model, "cpu_flags": [f for f in wanted if f in flags], "cpus": os.cpu_count()}


# ------------------------------------------------------------------------------------------------ children
def child_lora_ft(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    source()
    from lora_ft.recipe import load_recipe

    out = Path(spec["out"])
    recipe = load_recipe(RECIPE, [
        "model.quant=nf4", "model.double_quant=true", "model.compute_dtype=fp32", "objective.type=dpo",
        f"objective.beta={BETA}", f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}",
        f"lora.dropout={LORA['dropout']}", "lora.target_modules=auto", f"data.train={spec['train_file']}",
        "data.validation=null", "data.test=null", f"data.max_length={spec['max_length']}",
        f"train.max_steps={spec['steps']}", f"train.micro_batch_size={spec['micro_batch']}", "train.grad_accum=1",
        f"train.lr={LR}", "train.schedule=cosine", f"train.warmup={WARMUP}", "train.eval_every=null",
        "train.gradient_checkpointing=false", "train.max_grad_norm=1.0", f"train.seed={SEED}", "train.log_every=1",
        f"output_dir={out}",
    ])
    marks, train_peak = train_marked(recipe)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r]
    info = json.loads((out / "run_info.json").read_text())
    return {"tokens_per_s": steps[-1]["tokens_per_s"], "steps": steps[-1]["step"], "targets": info["targets"],
            "train_losses": [round(r["loss"], 4) for r in steps],
            "peak_rss_mb": max(marks.get("load_peak_mb", 0), train_peak),
            "train_peak_rss_mb": train_peak if marks.get("reset") else None}


def child_trl(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    src = source()
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(spec["train_file"]).read_text().splitlines()]
    train_ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    marks: dict = {"train_s": 0.0}
    Timer = trl_timer(marks, TrainerCallback)  # noqa: N806 - a class

    args = DPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=spec["micro_batch"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], num_train_epochs=1, learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=WARMUP, weight_decay=0.0, max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"],
        max_length=spec["max_length"], precompute_ref_log_probs=False, gradient_checkpointing=False, bf16=False,
        fp16=False, use_cpu=True, seed=SEED, report_to="none", save_strategy="no", eval_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, model_init_kwargs={"dtype": "float32"},
    )
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=spec["targets"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=src, args=args, train_dataset=train_ds, processing_class=AutoTokenizer.from_pretrained(
        src), peft_config=peft_config, quantization_config=bnb, callbacks=[Timer()])
    trainer.train()
    train_peak = process_peak_mb()
    losses = [round(r["loss"], 4) for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
    return {"tokens_per_s": trainer._total_train_tokens / marks["train_s"], "steps": trainer.state.global_step,
            "train_losses": losses, "lora_dtype": str(next(p.dtype for p in trainer.model.parameters()
                                                           if p.requires_grad)),
            "peak_rss_mb": max(marks.get("load_peak_mb", 0), train_peak),
            "train_peak_rss_mb": train_peak if marks.get("reset") else None}


def child_copy(spec: dict) -> dict:
    """What a second model copy (a reference model) costs, loaded as lora_ft loads the base."""
    import gc

    import torch

    torch.set_num_threads(spec["threads"])
    src = source()
    from lora_ft.modeling.loading import load_model, load_tokenizer
    from lora_ft.recipe import ModelConfig
    from lora_ft.training.measure import _held_bytes

    def scored(model):  # as a reference pass would: every weight read once (fp32 weights are mmapped until then)
        with torch.no_grad():
            model(input_ids=torch.ones(1, 16, dtype=torch.long))
        return model

    out = {}
    for quant in ("nf4", "none"):
        cfg = ModelConfig(name=src, quant=quant)
        tok = load_tokenizer(src, cfg)
        first = scored(load_model(cfg, "fp32", "cpu", tokenizer=tok).model)
        gc.collect()
        before = rss_mb("VmRSS")
        second = scored(load_model(cfg, "fp32", "cpu", tokenizer=tok).model)
        gc.collect()
        out[quant] = {"tensor_mb": _held_bytes(second, None) / 2**20, "rss_added_mb": rss_mb("VmRSS") - before}
        del first, second
        gc.collect()
    return out


CHILDREN = {"lora_ft": child_lora_ft, "trl": child_trl, "copy": child_copy}


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps (one pass over steps × micro-batch pairs)")
    ap.add_argument("--micro-batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--max-length", type=int, default=256)
    a = parse_or_serve(ap, CHILDREN)
    if a is None:
        return

    import peft
    import torch
    import trl

    threads = a.threads or torch.get_num_threads()
    work = work_dir(a.keep, "bench_dpo-")
    try:
        n = a.steps * a.micro_batch
        rows = (DATA / "train.jsonl").read_text().splitlines()[:n]
        (work / "train.jsonl").write_text("\n".join(rows) + "\n")
        targets = model_shape(source())["targets"]
        spec = {"threads": threads, "steps": a.steps, "micro_batch": a.micro_batch, "max_length": a.max_length,
                "train_file": str(work / "train.jsonl"), "targets": targets}
        res = {"lora_ft": run_child("lora_ft", {**spec, "out": str(work / "lora_ft")}, work, __file__),
               "trl": run_child("trl", {**spec, "out": str(work / "trl")}, work, __file__)}
        copy = run_child("copy", spec, work, __file__)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    if res["lora_ft"]["targets"] != targets:
        raise SystemExit(f"bench_dpo: LoRA targets differ: {res['lora_ft']['targets']} vs {targets}")
    out: dict = {**cpu_facts(), "threads": threads, "trl": trl.__version__, "torch": torch.__version__,
                 "peft": peft.__version__, "pairs": n, "steps": a.steps, "micro_batch_pairs": a.micro_batch,
                 "max_length": a.max_length}
    for side, r in res.items():
        out.update({f"{side}_tokens_per_s": round(r["tokens_per_s"], 1), f"{side}_peak_rss_mb": round(r["peak_rss_mb"]),
                    f"{side}_train_peak_rss_mb": r["train_peak_rss_mb"] and round(r["train_peak_rss_mb"]),
                    f"{side}_losses": r["train_losses"]})
    out.update({
        "speed_ratio": round(res["lora_ft"]["tokens_per_s"] / res["trl"]["tokens_per_s"], 3),
        "peak_rss_ratio": round(res["lora_ft"]["peak_rss_mb"] / res["trl"]["peak_rss_mb"], 3),
        "trl_lora_dtype": res["trl"]["lora_dtype"],
        "second_copy_nf4_tensor_mb": round(copy["nf4"]["tensor_mb"], 1),
        "second_copy_nf4_rss_added_mb": round(copy["nf4"]["rss_added_mb"], 1),
        "second_copy_fp32_tensor_mb": round(copy["none"]["tensor_mb"], 1),
        "second_copy_fp32_rss_added_mb": round(copy["none"]["rss_added_mb"], 1),
    })
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
