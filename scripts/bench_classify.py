"""Classification throughput of lora_ft against transformers' ``Trainer`` + peft, the same QLoRA job on the CPU.

    LORA_FT_HOME=/tmp/lfhome HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_classify.py [--epochs 2] [--keep DIR]
        [--seeds 42 43 44] [--peers default grouped grouped-bf16] [--compute-dtype auto|fp32|bf16]
        [--lora-ft-set KEY=VALUE]...

Prints one JSON line on stdout (logs go to stderr). Every side trains all-MiniLM-L6-v2 with a new 4-way classifier
on the fortunes data (``data/fortunes``), NF4 with double quantization, LoRA r=16 / alpha=32 /
dropout 0.1 on the same linear layers (lora_ft's ``target_modules: auto``: every backbone linear layer, not the
new head), the new head and pooler trained in full (peft ``modules_to_save``), micro-batch 16, max length 128,
AdamW at lr 1e-3 with a cosine schedule and 10% warmup, clipping at 1.0, seed 42, no evaluation during training.

- **lora_ft**: ``lora_ft.training.trainer.train`` with its defaults otherwise (``model.compute_dtype: auto``: bf16
  autocast where the CPU has bf16 matrix units and its bf16 GEMM measures >= 1.3x fp32, else fp32;
  ``--compute-dtype`` pins one; ``data.packing: auto``: each
  micro-batch's 16 examples laid end to end in unpadded rows, shuffled; fused LoRA dropout,
  ``train.trim_cpu_memory: auto``, off for this job; ``--no-trim`` forces it off; ``--lora-ft-set KEY=VALUE``
  adds a recipe override, e.g. ``data.packing=false`` for the padded, length-grouped path).
- **Trainer** + peft, as their documentation does QLoRA classification: ``AutoModelForSequenceClassification``
  with a ``BitsAndBytesConfig``, ``prepare_model_for_kbit_training``, ``get_peft_model``, dynamic padding
  (``DataCollatorWithPadding``): ``trainer-default``, and ``trainer-grouped``
  (``train_sampling_strategy="group_by_length"``: batches of similar length, its best setting for padding on the CPU)
  and ``trainer-grouped-bf16`` (the same with ``bf16=True``, autocast, and bf16 4-bit compute: its fast path on
  CPUs with AVX512-BF16/AMX). The other sides compute in fp32.

Each side runs in its own fresh process, one after the other. **tokens/s**: real (non-padding) tokens of the
training examples seen ÷ the training loop's time (lora_ft's own ``tokens_per_s``; the Trainer's timed by a
callback from the first to the last step). **accuracy**: on ``data/fortunes/test.jsonl``, every side scored by
lora_ft's evaluation code on its saved adapter. With several ``--seeds`` every side runs once per seed (the seed
of the new head, the adapters and the batch order) and the ratios compare the means; the target (issue 26): lora_ft
≥ 1.3× the tokens/s of the ``Trainer`` at its best, at an accuracy at most 0.5 pt below (mean over the seeds).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import time
from pathlib import Path

import yaml
from bench_train import cpu_flags, cpu_model, parse_or_serve, process_peak_mb, run_child, versions, work_dir

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes/quickstart/minilm-lora-classify.yaml"
DATA = ROOT / "data/fortunes"
MODEL = "example:minilm-l6"
LORA = {"r": 16, "alpha": 32, "dropout": 0.1}
LR, WARMUP, SEED, BATCH, MAX_LENGTH = 1e-3, 0.1, 42, 16, 128

log = logging.getLogger("bench_classify")


def cpu_time() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def source() -> str:
    from lora_ft.modeling import examples
    from lora_ft.modeling.loading import resolve_source

    examples.set_home(os.environ.get("LORA_FT_HOME"))
    return resolve_source(MODEL)


def recipe(out: str, epochs: float, trim: str, seed: int = SEED, extra: tuple[str, ...] = (),
           compute_dtype: str = "auto"):
    from lora_ft.recipe import load_recipe

    return load_recipe(RECIPE, [
        "model.quant=nf4", "model.double_quant=true", f"model.compute_dtype={compute_dtype}", f"lora.r={LORA['r']}",
        f"lora.alpha={LORA['alpha']}", f"lora.dropout={LORA['dropout']}", "data.validation=null", "data.test=null",
        f"data.max_length={MAX_LENGTH}", f"train.epochs={epochs}", f"train.micro_batch_size={BATCH}",
        f"train.lr={LR}", "train.schedule=cosine", f"train.warmup={WARMUP}", "train.eval_every=null",
        "train.early_stopping_patience=null", "train.max_grad_norm=1.0", f"train.seed={seed}",
        f"train.trim_cpu_memory={trim}", f"output_dir={out}", *extra])


# ------------------------------------------------------------------------------------------------ children
def child_lora_ft(spec: dict) -> dict:
    import torch

    from lora_ft.training.trainer import train

    torch.set_num_threads(spec["threads"])
    source()
    out = Path(spec["out"])
    u0 = cpu_time()
    train(recipe(spec["out"], spec["epochs"], spec["trim"], spec["seed"], tuple(spec["set"]), spec["dtype"]),
          overwrite=True)
    u1 = cpu_time()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r]
    info = json.loads((out / "run_info.json").read_text())
    config = yaml.safe_load((out / "run_config.yaml").read_text())
    return {"tokens_per_s": steps[-1]["tokens_per_s"], "steps": steps[-1]["step"], "peak_rss_mb": process_peak_mb(),
            "user_s": u1[0] - u0[0], "sys_s": u1[1] - u0[1], "head_modules": info["head_modules"],
            "targets": info["targets"], "id2label": info["id2label"], "compute_dtype": config["model"]["compute_dtype"],
            "trim": config["train"]["trim_cpu_memory"]}


def child_trainer(spec: dict) -> dict:
    import datasets
    import torch
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.set_num_threads(spec["threads"])
    src = source()
    id2label = {int(k): v for k, v in spec["id2label"].items()}
    label2id = {v: k for k, v in id2label.items()}
    tok = AutoTokenizer.from_pretrained(src)
    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list([{**tok(r["text"], truncation=True, max_length=MAX_LENGTH),
                                      "labels": label2id[r["label"]]} for r in rows])
    # "-bf16": bf16 autocast (TrainingArguments.bf16) and bf16 4-bit compute, the Trainer's fast path on CPUs with
    # AVX512-BF16/AMX; the weights stay fp32 as the Trainer keeps them under autocast.
    bf16 = spec["variant"].endswith("-bf16")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
                             llm_int8_skip_modules=spec["head_modules"])
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=len(id2label), id2label=id2label,
                                                               label2id=label2id, quantization_config=bnb,
                                                               dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=spec["targets"], modules_to_save=spec["head_modules"],
                                             task_type=TaskType.SEQ_CLS))
    marks = {"train_s": 0.0, "tokens": 0}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            marks["train_s"] += time.perf_counter() - marks["t"]

    class CountTokens(DataCollatorWithPadding):
        def __call__(self, features):
            marks["tokens"] += sum(len(f["input_ids"]) for f in features)
            return super().__call__(features)

    args = TrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=BATCH, num_train_epochs=spec["epochs"], learning_rate=LR,
        lr_scheduler_type="cosine", warmup_steps=WARMUP, weight_decay=0.0, max_grad_norm=1.0, seed=spec["seed"],
        train_sampling_strategy="group_by_length" if spec["variant"].startswith("grouped") else "random",
        use_cpu=True, bf16=bf16,
        report_to="none", save_strategy="no",
        eval_strategy="no", logging_steps=10, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=CountTokens(tok), callbacks=[Timer()])
    u0 = cpu_time()
    trainer.train()
    u1 = cpu_time()
    model.save_pretrained(Path(spec["out"]) / "adapter")
    tok.save_pretrained(Path(spec["out"]) / "adapter")
    return {"tokens_per_s": marks["tokens"] / marks["train_s"], "steps": trainer.state.global_step,
            "peak_rss_mb": process_peak_mb(), "user_s": u1[0] - u0[0], "sys_s": u1[1] - u0[1]}


def child_eval(spec: dict) -> dict:
    from lora_ft.training.evaluation import evaluate_run

    source()
    test = str(DATA / "test.jsonl")
    return {side: evaluate_run(run_dir, test, split="test") for side, run_dir in spec["runs"].items()}


CHILDREN = {"lora_ft": child_lora_ft, "trainer": child_trainer, "eval": child_eval}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--no-trim", action="store_true",
                    help="lora_ft with train.trim_cpu_memory off (default: its auto)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[SEED])
    ap.add_argument("--peers", nargs="+", choices=["default", "grouped", "grouped-bf16"],
                    default=["default", "grouped", "grouped-bf16"])
    ap.add_argument("--compute-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="lora_ft's model.compute_dtype (default: its own auto rule)")
    ap.add_argument("--lora-ft-set", action="append", default=[], metavar="KEY=VALUE")
    a = parse_or_serve(ap, CHILDREN)
    if a is None:
        return
    import torch

    threads = a.threads or torch.get_num_threads()
    work = work_dir(a.keep, "bench_classify-")
    res: dict[str, list[dict]] = {}
    try:
        for seed in a.seeds:
            spec = {"epochs": a.epochs, "trim": "false" if a.no_trim else "auto", "threads": threads, "seed": seed,
                    "dtype": a.compute_dtype}
            sdir = work / f"seed{seed}"
            sdir.mkdir()
            runs = {"lora_ft": run_child("lora_ft", {**spec, "set": a.lora_ft_set, "out": str(sdir / "lora_ft")},
                                         sdir, __file__)}
            shared = {k: runs["lora_ft"][k] for k in ("head_modules", "targets", "id2label")}
            for variant in a.peers:
                runs[f"trainer-{variant}"] = run_child("trainer", {**spec, **shared, "variant": variant,
                                                                   "out": str(sdir / f"trainer-{variant}")}, sdir,
                                                       __file__)
                for name in ("run_config.yaml", "run_info.json"):
                    shutil.copy(sdir / "lora_ft" / name, sdir / f"trainer-{variant}" / name)
            held = run_child("eval", {"runs": {side: str(sdir / side) for side in runs}}, sdir, __file__)
            for side, r in runs.items():
                res.setdefault(side, []).append({**r, "test_accuracy": held[side]["accuracy"],
                                                 "test_loss": held[side]["loss"]})
            log.info("seed %d: %s", seed, {s: (round(r[-1]["tokens_per_s"]), round(r[-1]["test_accuracy"], 4))
                                           for s, r in res.items()})
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary(res, a, threads)), flush=True)


def summary(res: dict[str, list[dict]], a: argparse.Namespace, threads: int) -> dict:
    """Every side's means over the seeds (and each seed's value), the ratios and the targets."""
    out: dict = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "threads": threads, "load_average": os.getloadavg(),
                 "versions": versions(), "epochs": a.epochs, "batch": BATCH, "seeds": a.seeds,
                 "lora_ft_set": a.lora_ft_set, "lora_ft_trim_cpu_memory": res["lora_ft"][0]["trim"],
                 "lora_ft_compute_dtype": res["lora_ft"][0]["compute_dtype"]}
    for side, rs in res.items():
        out[side] = {"tokens_per_s": round(mean([r["tokens_per_s"] for r in rs]), 1),
                     "tokens_per_s_each": [round(r["tokens_per_s"], 1) for r in rs], "steps": rs[0]["steps"],
                     "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs)),
                     "user_s": round(mean([r["user_s"] for r in rs]), 1),
                     "sys_s": round(mean([r["sys_s"] for r in rs]), 1),
                     "test_accuracy": round(mean([r["test_accuracy"] for r in rs]), 4),
                     "test_accuracy_each": [round(r["test_accuracy"], 4) for r in rs],
                     "test_loss": round(mean([r["test_loss"] for r in rs]), 4)}
    best = max((s for s in res if s != "lora_ft"), key=lambda s: out[s]["tokens_per_s"])
    for name, side in (("trainer_default", "trainer-default"), ("trainer_best", best)):
        if side in out:
            out[f"vs_{name}"] = {"peer": side, "speed_ratio": round(out["lora_ft"]["tokens_per_s"]
                                                                     / out[side]["tokens_per_s"], 3),
                                 "accuracy_diff_pt": round(100 * (out["lora_ft"]["test_accuracy"]
                                                                  - out[side]["test_accuracy"]), 2)}
    out["targets_met (vs the Trainer at its best, issue 26)"] = {
        "speed_ge_1.3x": out["vs_trainer_best"]["speed_ratio"] >= 1.3,
        # The speed must not come out of the accuracy: lora_ft at most 0.5 pt below (above is no failure).
        "accuracy_not_below_by_0.5pt": out["vs_trainer_best"]["accuracy_diff_pt"] >= -0.5}
    return out


if __name__ == "__main__":
    main()
