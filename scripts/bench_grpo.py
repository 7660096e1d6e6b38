"""GRPO throughput and memory of lora_ft against TRL's ``GRPOTrainer`` + peft, the same QLoRA job on the CPU (issue 25).

    LORA_FT_HOME=/tmp/lfhome HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_grpo.py --threads 1 [--steps 6]
        [--compute-dtype auto|fp32|bf16] [--trl fp32 bf16] [--lora-ft-set KEY=VALUE ...] [--profile]

Prints one JSON line on stdout (logs go to stderr), with the torch, transformers, peft, TRL, bitsandbytes and
accelerate versions, the CPU model, its relevant flags, the thread count and the load average before and after.
Both sides train SmolLM2-135M-Instruct, NF4 with double quantization, LoRA r=16 / alpha=32 / dropout 0 on the same
linear layers, GRPO with 8 completions per prompt of at most 16 new tokens sampled at temperature 1, the numeric
answer reward (the last number against ``answer``), β = 0 (no reference pass, TRL's default), ε = 0.2, loss
``dapo``, on the first ``steps × micro-batch`` prompts of ``data/arithmetic/train.jsonl``, AdamW at lr 3e-4,
constant schedule, gradient clipping at 1.0, seed 42, gradient checkpointing off, no evaluation. One optimizer step
per generation on both sides.

- **lora_ft**: ``lora_ft.training.trainer.train`` on ``recipes/quickstart/smollm2-qlora-grpo.yaml`` with overrides,
  its defaults otherwise: ``model.compute_dtype: auto`` (bf16 on this project's AMD EPYC, which has AVX512-BF16
  and a measured bf16 GEMM ~2× fp32), ``train.trim_cpu_memory: auto``.
- **TRL**: ``GRPOTrainer(model=path, quantization_config=BitsAndBytesConfig(...), peft_config=LoraConfig(...))``
  with transformers' ``generate`` (vLLM needs a GPU), its fused, chunked LM head for the log-probs,
  ``per_device_train_batch_size`` = the whole group × prompts of a step (it generates once per step in one batch,
  as lora_ft does), in two variants: ``trl_fp32`` (fp32 compute and weights) and ``trl_bf16`` (``bf16=True``,
  weights loaded and 4-bit layers computing in bf16: its settings for a CPU with native bf16). TRL's best is the
  faster of the two in this run (``trl_best``), and the ratios are against it. Measured here (1 thread): bf16 is
  TRL's faster variant on this CPU, so the earlier fp32-only comparison ("this CPU has no fast 16-bit matmul") was
  against a weaker TRL than its best.

Each side runs in its own fresh process, one after the other:

- **tokens/s**: prompt + completion tokens of the step's sequences (attention-mask sums; both sides count the same
  rollouts' tokens) ÷ the time of the whole steps, generation included. lora_ft's is the ``tokens_per_s`` of its
  last logged step (its meter covers rollout, forward, backward and optimizer step); TRL's is its own
  ``num_input_tokens_seen`` over the time from the start of the epoch to the end of the last step (its generation
  runs inside the step, in ``_prepare_inputs``).
- **tokens per CPU second** (``*_tokens_per_cpu_s``, ``cpu_speed_ratio``): the same tokens over the process's CPU
  time of the same span. With one thread it is the wall rate on an idle core, and far steadier on a shared
  machine: TRL's wall rate moved 3× between runs under a load average of 2.5 and 5 on 2 cores.
- **peak RSS**: the process's high-water mark over loading and training (``ru_maxrss``) and of the training phase
  alone (reset through ``/proc/self/clear_refs`` once the model is ready).
- **profile** (``--profile``): where lora_ft's step time goes, generation against the policy's forward and backward.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import yaml
from bench_dpo import cpu_facts
from bench_train import (
    model_shape,
    parse_or_serve,
    process_peak_mb,
    run_child,
    source,
    train_marked,
    trl_timer,
    versions,
    work_dir,
)

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes/quickstart/smollm2-qlora-grpo.yaml"
DATA = ROOT / "data/arithmetic"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LR, SEED, GROUP, MAX_NEW = 3e-4, 42, 8, 16

log = logging.getLogger("bench_grpo")


def numeric_reward(completions, answer, **_):
    """TRL's side of ``numeric_match``: 1.0 where the completion's last number equals ``answer``."""
    out = []
    for c, a in zip(completions, answer, strict=True):
        text = c if isinstance(c, str) else c[-1]["content"]  # conversational prompts: a message list
        found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
        out.append(float(bool(found) and abs(float(found[-1].replace(",", "")) - float(a)) < 1e-6))
    return out


# ------------------------------------------------------------------------------------------------ children
def child_lora_ft(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    source()
    from lora_ft.recipe import load_recipe

    out = Path(spec["out"])
    recipe = load_recipe(RECIPE, [
        "model.quant=nf4", "model.double_quant=true", f"model.compute_dtype={spec['compute_dtype']}",
        f"lora.r={LORA['r']}",
        f"lora.alpha={LORA['alpha']}", f"lora.dropout={LORA['dropout']}", "lora.target_modules=auto",
        f"objective.num_generations={GROUP}", f"objective.max_new_tokens={MAX_NEW}", "objective.loss_type=dapo",
        f"data.train={spec['train_file']}", "data.validation=null", "data.test=null", "eval.generate=false",
        f"train.max_steps={spec['steps']}", f"train.micro_batch_size={spec['prompts']}", "train.grad_accum=1",
        f"train.lr={LR}", "train.schedule=constant", "train.warmup=0", "train.eval_every=null",
        "train.gradient_checkpointing=false", "train.max_grad_norm=1.0", f"train.seed={SEED}", "train.log_every=1",
        f"output_dir={out}", *spec.get("lora_ft_set", []),
    ])
    profile = _timed_phases() if spec.get("profile") else {}
    cpu = _cpu_timed_steps()
    marks, train_peak = train_marked(recipe)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r]
    info = json.loads((out / "run_info.json").read_text())
    resolved = yaml.safe_load((out / "run_config.yaml").read_text())["model"]["compute_dtype"]
    tokens = steps[-1]["tokens_per_s"] * steps[-1]["train_s"]  # the meter's rate is over all steps so far
    return {"tokens_per_s": steps[-1]["tokens_per_s"], "tokens_per_cpu_s": tokens / cpu["s"],
            "steps": steps[-1]["step"], "targets": info["targets"],
            "train_losses": [round(r["loss"], 4) for r in steps], "profile_s": {k: round(v, 1) for k, v in
                                                                               profile.items()},
            "peak_rss_mb": max(marks.get("load_peak_mb", 0), train_peak), "compute_dtype": resolved,
            "train_peak_rss_mb": train_peak if marks.get("reset") else None}


def _cpu_timed_steps() -> dict:
    """Wraps lora_ft's optimizer step (rollout, forward, backward, optimizer) to sum its CPU time."""
    from lora_ft.training.trainer import Trainer

    spent, real_step = {"s": 0.0}, Trainer.train_step

    def train_step(self, *args, **kwargs):
        t = time.process_time()
        try:
            return real_step(self, *args, **kwargs)
        finally:
            spent["s"] += time.process_time() - t

    Trainer.train_step = train_step
    return spent


def _timed_phases() -> dict:
    """Wraps the GRPO objective's generation and loss to sum their wall time (``--profile``)."""
    from lora_ft.objectives import grpo

    spent = {"generation": 0.0, "scoring_and_rewards": 0.0, "loss_forward": 0.0}
    real_generate, real_rollout, real_loss = grpo.generate_batch, grpo.GRPO.rollout, grpo.GRPO.loss

    def generate(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real_generate(*args, **kwargs)
        finally:
            spent["generation"] += time.perf_counter() - t

    def rollout(self, *args, **kwargs):
        t, g = time.perf_counter(), spent["generation"]
        try:
            return real_rollout(self, *args, **kwargs)
        finally:
            spent["scoring_and_rewards"] += time.perf_counter() - t - (spent["generation"] - g)

    def loss(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return real_loss(self, *args, **kwargs)
        finally:
            spent["loss_forward"] += time.perf_counter() - t

    grpo.generate_batch, grpo.GRPO.rollout, grpo.GRPO.loss = generate, rollout, loss
    return spent


def child_trl(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    src = source()
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in Path(spec["train_file"]).read_text().splitlines()]
    # Conversational prompts: TRL renders them with the chat template, as lora_ft renders a text prompt.
    train_ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                  for r in rows])
    marks: dict = {"train_s": 0.0}
    Timer = trl_timer(marks, TrainerCallback)  # noqa: N806 - a class
    # bf16: the 4-bit layers compute in bf16, the rest loads in bf16 and runs under bf16 autocast (bf16=True).
    bf16 = spec["variant"] == "bf16"
    dtype = "bfloat16" if bf16 else "float32"

    args = GRPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=spec["prompts"] * GROUP, gradient_accumulation_steps=1,
        num_generations=GROUP, max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0, beta=0.0, epsilon=0.2,
        loss_type="dapo", max_steps=spec["steps"], num_train_epochs=1, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=False, bf16=bf16, fp16=False, use_cpu=True, seed=SEED, report_to="none",
        save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": dtype}, shuffle_dataset=False, log_completions=False,
    )
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=getattr(torch, dtype))
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=spec["targets"], task_type="CAUSAL_LM")
    tok = AutoTokenizer.from_pretrained(src)
    cpu = {"s": 0.0}

    class CpuTimer(TrainerCallback):
        """The CPU time of the same span as ``Timer``'s wall time."""

        def on_epoch_begin(self, args, state, control, **kwargs):
            cpu["t"] = time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.process_time()
            cpu["s"] += now - cpu["t"]
            cpu["t"] = now

    trainer = GRPOTrainer(model=src, reward_funcs=numeric_reward, args=args, train_dataset=train_ds,
                          processing_class=tok, peft_config=peft_config, quantization_config=bnb,
                          callbacks=[Timer(), CpuTimer()])
    trainer.train()
    train_peak = process_peak_mb()
    losses = [round(r["loss"], 4) for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
    return {"tokens_per_s": trainer.state.num_input_tokens_seen / marks["train_s"],
            "tokens_per_cpu_s": trainer.state.num_input_tokens_seen / cpu["s"],
            "steps": trainer.state.global_step, "train_losses": losses,
            "peak_rss_mb": max(marks.get("load_peak_mb", 0), train_peak),
            "train_peak_rss_mb": train_peak if marks.get("reset") else None}


CHILDREN = {"lora_ft": child_lora_ft, "trl": child_trl}


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps (one generation each)")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step (× 8 completions)")
    ap.add_argument("--profile", action="store_true", help="time lora_ft's generation and loss separately")
    ap.add_argument("--compute-dtype", default="auto", choices=("auto", "fp32", "bf16"),
                    help="lora_ft's model.compute_dtype (default: its own default, auto)")
    ap.add_argument("--lora-ft-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="further recipe overrides for lora_ft (e.g. train.trim_cpu_memory=true)")
    ap.add_argument("--trl", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"),
                    help="TRL variants to run; the ratios are against the fastest")
    a = parse_or_serve(ap, CHILDREN)
    if a is None:
        return

    import torch

    load_before = [round(x, 2) for x in os.getloadavg()]
    threads = a.threads or torch.get_num_threads()
    work = work_dir(a.keep, "bench_grpo-")
    try:
        rows = (DATA / "train.jsonl").read_text().splitlines()[:a.steps * a.prompts]
        (work / "train.jsonl").write_text("\n".join(rows) + "\n")
        targets = model_shape(source())["targets"]
        spec = {"threads": threads, "steps": a.steps, "prompts": a.prompts, "train_file": str(work / "train.jsonl"),
                "targets": targets, "profile": a.profile, "compute_dtype": a.compute_dtype,
                "lora_ft_set": a.lora_ft_set}
        res = {"lora_ft": run_child("lora_ft", {**spec, "out": str(work / "lora_ft")}, work, __file__)}
        for variant in a.trl:
            res[f"trl_{variant}"] = run_child("trl", {**spec, "variant": variant, "out": str(work / f"trl_{variant}")},
                                              work, __file__)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    out: dict = {**cpu_facts(), "threads": threads, **versions(), "load_before": load_before,
                 "load_after": [round(x, 2) for x in os.getloadavg()], "steps": a.steps,
                 "prompts_per_step": a.prompts, "group": GROUP,
                 "max_new_tokens": MAX_NEW}
    for side, r in res.items():
        out.update({f"{side}_tokens_per_s": round(r["tokens_per_s"], 1),
                    f"{side}_tokens_per_cpu_s": round(r["tokens_per_cpu_s"], 1),
                    f"{side}_peak_rss_mb": round(r["peak_rss_mb"]),
                    f"{side}_train_peak_rss_mb": r["train_peak_rss_mb"] and round(r["train_peak_rss_mb"]),
                    f"{side}_losses": r["train_losses"]})
    best = max((k for k in res if k.startswith("trl_")), key=lambda k: res[k]["tokens_per_s"])
    out.update(trl_best=best, speed_ratio=round(res["lora_ft"]["tokens_per_s"] / res[best]["tokens_per_s"], 3),
               cpu_speed_ratio=round(res["lora_ft"]["tokens_per_cpu_s"] / res[best]["tokens_per_cpu_s"], 3),
               peak_rss_ratio=round(res["lora_ft"]["peak_rss_mb"] / res[best]["peak_rss_mb"], 3),
               lora_ft_compute_dtype=res["lora_ft"]["compute_dtype"], lora_ft_profile_s=res["lora_ft"]["profile_s"])
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
