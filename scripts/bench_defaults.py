"""lora_ft's minimal recipe (model, task, data: nothing else) against the plain Hugging Face stack at its documented
settings and against the best of a small ``lora-ft sweep``, on held-out tasks.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python scripts/bench_defaults.py [--tasks NAME...]
        [--sides lora_ft hf sweep] [--data-dir DIR] [--set KEY=VALUE]... [--label NAME] [--threads 1] [--keep DIR]

The tasks are built by ``scripts/build_heldout_tasks.py`` into ``<data-dir>/<task>/{train,validation,test}.jsonl``
(default ``~/.cache/lora_ft/heldout``); none of them is shipped or used by the tests, so lora_ft's defaults are
not tuned on them:

- classification, ``example:minilm-l6`` with a new head: ``man-section`` and ``license-clause`` ({"text", "label"}),
  ``man-pair`` ({"text", "text_pair", "label"}: a text-pair task, so the minimal recipe names
  ``data.text_pair_column: text_pair``, a fact of the data, not a hyper-parameter);
- generation, ``example:smollm2-135m-instruct``: ``whatis`` ({"prompt", "completion"}) and ``man-options``
  ({"messages": [user, assistant]}).

Per task, the sides, each training in its own fresh process, one after the other (``--sides`` chooses them):

- **lora_ft**: ``lora_ft.training.trainer.train`` on the minimal recipe, a YAML holding only
  ``model: {name, task, quant: nf4}``, ``data: {train, validation, test}`` (and ``text_pair_column`` for
  man-pair) and ``output_dir``; every training value is lora_ft's default, resolved by lora_ft when the run starts.
  The resolved values are read back from the run's ``run_config.yaml`` and ``run_info.json`` and printed (lr,
  micro-batch × grad_accum, epochs, warmup, schedule, evaluation cadence, early stopping, and, where lora_ft
  records them, the rules that chose them), so a reader sees what the defaults chose. ``--set KEY=VALUE`` is
  passed to every lora_ft run (this one and the sweep's trials), e.g. to measure a craft switch on top of the
  defaults (``--set freeze.strategy=head_first``); ``--label`` names that lora_ft side in the table.
- **hf**, the plain stack as its documentation does QLoRA, at its defaults except where said; the same
  quantization as lora_ft (``BitsAndBytesConfig``: NF4, double quantization, fp32 compute) and the same LoRA shape
  as lora_ft's defaults (r, alpha and dropout read from what lora_ft resolves for this task's minimal recipe:
  16 / 32 / 0.05 today):

  - classification: ``AutoModelForSequenceClassification`` + ``prepare_model_for_kbit_training`` (gradient
    checkpointing off, as for lora_ft here: it changes no result, and off is the peer's fastest) +
    ``get_peft_model`` (task_type SEQ_CLS, LoRA on the backbone linear layers that lora_ft's
    ``target_modules: auto`` resolves, the new head in ``modules_to_save``, the same label ids) and
    ``Trainer`` with learning_rate 5e-4, per_device_train_batch_size 16, num_train_epochs 3, lr_scheduler_type
    linear, warmup 6% of the steps (``warmup_steps=0.06``: transformers 5 has no ``warmup_ratio``; a value below 1
    is the fraction), weight_decay 0, seed 42 (also set before the model is built, as transformers' examples do:
    the ``Trainer`` seeds only after the new head is initialised), ``DataCollatorWithPadding``, inputs tokenized with
    ``truncation=True`` (the tokenizer's own maximum length), no evaluation during training, the final model kept.
  - generation: TRL's ``SFTTrainer(model=path, quantization_config=..., peft_config=LoraConfig(...,
    target_modules="all-linear"))`` with ``SFTConfig`` at its defaults except learning_rate 2e-4 (TRL's
    documentation: ~10x the full fine-tuning rate for LoRA), num_train_epochs 3, max_length 512, and ``bf16=False``
    (TRL's default is bf16 autocast; fp32 compute is the comparison's setting). Its other defaults stay: packing
    off, per_device_train_batch_size 8, linear schedule without warmup, gradient checkpointing off (its default is
    on; off changes no result and is faster),
    ``completion_only_loss`` unset (= loss on the completions of prompt/completion data), model weights fp32
    (TRL's default dtype), the LoRA weights of the quantized model in bf16 (TRL's QLoRA convention, left as is).
    Both tasks are given to TRL as conversational prompt/completion (the conversation up to the answer, and the
    answer; ``whatis``'s prompt as one user turn), as ``bench_train.py`` does, so that TRL renders them with the
    chat template as lora_ft does.

  Both sides save only at the end (``save_strategy="no"``, then ``save_pretrained``/``save_model``); checkpoints on
  the way are not a hyper-parameter.
- **sweep**: ``lora-ft sweep`` on the minimal recipe (and ``--set``) with ``--grid train.lr=LR/2,2*LR``, where LR is
  the learning rate the lora_ft run resolved (from its ``run_config.yaml``; the lora_ft run is trained for this
  side even when ``--sides`` leaves it out). The best of {the lora_ft run, the two trials} is chosen on the
  VALIDATION split (accuracy, ties by loss, for classification; loss for generation), read from each run's
  ``eval_results.json``, and only then scored on test. Its wall time is the whole search: the lora_ft run plus the
  ``lora-ft sweep`` process (its start-up included). The sweep runs with ``OMP_NUM_THREADS`` = ``--threads``.

What is measured:

- **test metric**: every side's saved adapter is scored by lora_ft's own evaluation code
  (``lora_ft.training.evaluation.evaluate_run(run_dir, test.jsonl, split="test")``) in one more process per task:
  accuracy and macro-F1 for classification, loss per answer token for generation. The HF sides' adapters are put
  in a lora_ft run folder for that: a probe process runs lora_ft's ``Trainer.setup`` on the minimal recipe (no
  ``--set``) without training, which writes the ``run_config.yaml`` and ``run_info.json`` a run of that recipe
  would have (model, quantization, data settings, label ids) and names the target and head modules the HF
  classifier uses.
- **wall_s**: the whole training call, model and data loading included, imports excluded: lora_ft's ``train()``
  (with the evaluations its defaults do before, during and after training, and the final save), the HF side from
  loading the tokenizer to the saved adapter (no evaluation).
- **loop s**: the training loop alone (both sides: the steps, without loading, evaluation or saving): lora_ft's
  ``train_s`` (last step row of ``metrics.jsonl``), the HF sides' ``bench_train.trl_timer`` time.
- **tokens/s**: real (non-padding) training tokens ÷ the training loop's time. lora_ft's is its own
  ``tokens_per_s`` (last step row of ``metrics.jsonl``); the HF sides' count the tokens their collator receives
  and time the loop with ``bench_train.trl_timer`` (epoch start to each step's end).
- **epochs, steps, hyper-parameters** as each side ran them.

Output: logs on stderr, a Markdown table on stderr at the end, one JSON line on stdout with per task and side the
metrics, ``wall_s``, ``tokens_per_s``, epochs, steps and resolved hyper-parameters, plus the machine (CPU model,
flags, threads) and the package versions. On a machine where anything else runs, use ``--threads 1`` and ``nice``
(see ``bench_train.py``). ``--max-steps N`` (hidden, smoke tests only) caps the HF sides' steps; cap lora_ft's
with ``--set train.max_steps=N``.

(A little over 450 lines: the three sides' children, the probe that makes the HF adapters scorable by lora_ft's
own evaluation, and the table belong to one measurement; the shared process plumbing is ``bench_train.py``'s.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from bench_train import cpu_flags, cpu_model, parse_or_serve, run_child, trl_timer, versions, work_dir

DATA_DIR = Path("~/.cache/lora_ft/heldout")
SPLITS = ("train", "validation", "test")
SIDES = ("lora_ft", "hf", "sweep")
MODELS = {"classification": ("example:minilm-l6", "sequence_classification"),
          "generation": ("example:smollm2-135m-instruct", "causal_lm")}
TASKS = {"man-section": ("classification", None), "license-clause": ("classification", None),
         "man-pair": ("classification", "text_pair"), "whatis": ("generation", None),
         "man-options": ("generation", None)}
"""task → (kind, its second-text column)."""
SEED = 42
HF_CLASSIFY = {"learning_rate": 5e-4, "per_device_train_batch_size": 16, "num_train_epochs": 3,
               "lr_scheduler_type": "linear", "warmup_steps": 0.06, "weight_decay": 0.0, "seed": SEED}
HF_SFT = {"learning_rate": 2e-4, "num_train_epochs": 3, "max_length": 512, "bf16": False,
          "gradient_checkpointing": False}  # off: no result changes, the peer's best wall time on this hardware
TRAIN_KEYS = ("lr", "micro_batch_size", "grad_accum", "global_batch_size", "epochs", "max_steps", "warmup",
              "schedule", "weight_decay", "head_lr", "eval_every", "early_stopping_patience")
INFO_KEYS = ("global_batch", "total_steps", "packing", "steps_done", "best_step", "stopped")

log = logging.getLogger("bench_defaults")


# ------------------------------------------------------------------------------------------------ pure helpers
def minimal_recipe(task: str, data: Path, out: Path) -> dict:
    """The minimal recipe of ``task`` with its splits in ``data``: model, task, quantization, data, output_dir."""
    kind, pair = TASKS[task]
    name, model_task = MODELS[kind]
    splits = {s: str(data / f"{s}.jsonl") for s in SPLITS}
    return {"model": {"name": name, "task": model_task, "quant": "nf4"},
            "data": {**splits, **({"text_pair_column": pair} if pair else {})}, "output_dir": str(out)}


def sweep_lrs(lr: float) -> list[float]:
    """The sweep's two trials: half and double the learning rate the minimal run resolved."""
    return [float(f"{lr / 2:.6g}"), float(f"{lr * 2:.6g}")]


def pick_best(after: dict[str, dict], kind: str) -> str:
    """The candidate with the best VALIDATION metrics; ``after``: name → ``eval_results.json``'s ``after`` (its test
    metrics are there too, and are not looked at)."""
    def key(name: str) -> tuple[float, float]:
        val = after[name]["validation"]
        return (-val["accuracy"], val["loss"]) if kind == "classification" else (val["loss"], 0.0)

    return min(after, key=key)


def run_facts(run_dir: Path) -> dict:
    """What a finished lora_ft run chose and did: its resolved hyper-parameters, throughput, steps, epochs and
    validation metrics, from its own files."""
    cfg = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    info = json.loads((run_dir / "run_info.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in rows if "tokens_per_s" in r][-1]
    train = cfg.get("train", {})
    hparams = {k: train[k] for k in TRAIN_KEYS if k in train}
    hparams.update({k: info[k] for k in INFO_KEYS if k in info})
    rules = info.get("resolved")  # where lora_ft records it: key → {value, source (recipe, default, auto rule)}
    if isinstance(rules, dict):
        hparams["sources"] = {k: v.get("source") if isinstance(v, dict) else v for k, v in rules.items()}
    hparams.update(max_length=cfg["data"].get("max_length"), lora={k: cfg["lora"].get(k) for k in ("r", "alpha",
                                                                                                     "dropout")})
    after = json.loads((run_dir / "eval_results.json").read_text())["after"]
    loop = last.get("train_s")  # lora_ft's training-step seconds (evaluations and saving excluded)
    return {"tokens_per_s": round(last["tokens_per_s"], 1), "steps": last["step"], "epochs": round(last["epoch"], 3),
            "train_loop_s": round(loop, 1) if loop is not None else None, "hparams": hparams,
            "validation": after.get("validation")}


def metric_text(m: dict | None, kind: str) -> str:
    if not m:
        return "-"
    return f"acc {m['accuracy']:.4f} / F1 {m['f1_macro']:.4f}" if kind == "classification" else f"loss {m['loss']:.4f}"


def table(tasks: dict, label: str) -> str:
    """The Markdown table of every task and side."""
    head = ["task", "side", "test", "validation", "wall s", "loop s", "tok/s", "epochs", "steps", "lr", "batch",
            "warmup", "schedule"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, t in tasks.items():
        for side, r in t["sides"].items():
            hp = r["hparams"]
            batch = (f"{hp.get('micro_batch_size')}×{hp.get('grad_accum')}" if "grad_accum" in hp
                     else str(hp.get("per_device_train_batch_size")))
            name = label if side == "lora_ft" else f"sweep ({r['best']})" if side == "sweep" else side
            lines.append("| " + " | ".join(str(x) for x in [
                task, name, metric_text(r.get("test"), t["kind"]), metric_text(r.get("validation"), t["kind"]),
                round(r["wall_s"]), round(r.get("train_loop_s") or 0), round(r["tokens_per_s"] or 0), r["epochs"],
                r["steps"],
                f"{hp.get('lr', hp.get('learning_rate'))}", batch,
                hp.get("warmup", hp.get("warmup_steps")), hp.get("schedule", hp.get("lr_scheduler_type"))]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ children
def child_init(spec: dict) -> None:
    import torch

    from lora_ft.modeling import examples

    torch.set_num_threads(spec["threads"])
    examples.set_home(os.environ.get("LORA_FT_HOME"))


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def child_lora_ft(spec: dict) -> dict:
    child_init(spec)
    from lora_ft.recipe import load_recipe
    from lora_ft.training.trainer import train

    recipe = load_recipe(spec["recipe"], spec["overrides"])
    t0 = time.perf_counter()
    train(recipe, overwrite=True)
    return {"wall_s": time.perf_counter() - t0}


def child_probe(spec: dict) -> dict:
    """lora_ft's ``Trainer.setup`` on the minimal recipe, without training: it writes the run folder's
    ``run_config.yaml``/``run_info.json`` (the HF side's adapter goes next to them, to be scored by lora_ft) and
    resolves the LoRA shape, target modules, head modules and label ids the HF side uses."""
    child_init(spec)
    from lora_ft.recipe import load_recipe
    from lora_ft.training.trainer import Trainer

    out = Path(spec["out"])
    trainer = Trainer(load_recipe(spec["recipe"], [f"output_dir={out}"]), overwrite=True)
    try:
        trainer.setup()
    finally:
        trainer._close()  # the run lock
    info = json.loads((out / "run_info.json").read_text())
    lora = yaml.safe_load((out / "run_config.yaml").read_text())["lora"]
    return {"targets": info["targets"], "head_modules": info["head_modules"], "id2label": info["id2label"],
            "source": info["source"], "lora": {k: lora[k] for k in ("r", "alpha", "dropout")}}


def count_tokens(collate, marks: dict):
    """``collate``, counting the real tokens of the examples it batches into ``marks["tokens"]``."""
    def call(features):
        marks["tokens"] += sum(len(f["input_ids"]) for f in features)
        return collate(features)

    return call


def hf_result(trainer, marks: dict, wall: float, hparams: dict) -> dict:
    state = trainer.state
    return {"wall_s": wall, "tokens_per_s": marks["tokens"] / marks["train_s"], "train_loop_s": marks["train_s"],
            "tokens": marks["tokens"], "steps": state.global_step, "epochs": round(state.epoch, 3),
            "hparams": {**hparams, "global_batch": trainer.args.per_device_train_batch_size
                        * trainer.args.gradient_accumulation_steps,
                        "warmup_steps_resolved": trainer.args.get_warmup_steps(state.max_steps),
                        "gradient_checkpointing": checkpointing(trainer.model)}}


def checkpointing(model) -> bool:
    """Whether activation (gradient) checkpointing is on: transformers 5 renamed the flag."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def bnb_config(**extra):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32, **extra)


def child_hf_classification(spec: dict) -> dict:
    child_init(spec)
    import datasets
    import torch
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    probe, pair, src = spec["probe"], spec["text_pair"], spec["probe"]["source"]
    heads = probe["head_modules"]
    id2label = {int(k): v for k, v in probe["id2label"].items()}
    label2id = {v: k for k, v in id2label.items()}
    rows = read_jsonl(spec["train_file"])
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(src)
    ds = datasets.Dataset.from_list([{**tok(str(r["text"]), *([str(r[pair])] if pair else []), truncation=True),
                                      "labels": label2id[str(r["label"])]} for r in rows])
    set_seed(SEED)  # before the new head and the adapters are initialised, as transformers' examples do
    model = AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=len(id2label), id2label=id2label, label2id=label2id, dtype=torch.float32,
        quantization_config=bnb_config(llm_int8_skip_modules=list(heads)))
    # Gradient checkpointing off (peft's default turns it on): it changes no result, only the wall time, and the
    # peer is compared at its best setting for the hardware (this job fits in memory without it).
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = probe["lora"]
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=probe["targets"], modules_to_save=list(heads),
                                             task_type=TaskType.SEQ_CLS))
    marks: dict = {"train_s": 0.0, "tokens": 0}
    args = TrainingArguments(output_dir=str(Path(spec["out"]) / "hf_trainer"), **HF_CLASSIFY,
                             max_steps=spec["max_steps"] or -1, eval_strategy="no", save_strategy="no",
                             report_to="none", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[trl_timer(marks, TrainerCallback)()],
                      data_collator=count_tokens(DataCollatorWithPadding(tok), marks))
    trainer.train()
    model.save_pretrained(Path(spec["out"]) / "adapter")
    tok.save_pretrained(Path(spec["out"]) / "adapter")
    wall = time.perf_counter() - t0
    return hf_result(trainer, marks, wall, {**HF_CLASSIFY, "lora": lora, "targets": probe["targets"],
                                             "modules_to_save": heads})


def sft_row(row: dict) -> dict:
    """TRL's conversational prompt/completion form: a conversation split before its last (assistant) turn, and a
    prompt/completion pair as one user and one assistant turn. lora_ft renders prompt_completion data with the
    model's chat template too; given plain strings, TRL would train without the template and then be scored with
    it (whatis: test loss 4.87 that way)."""
    if "messages" in row:
        return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}
    return {"prompt": [{"role": "user", "content": row["prompt"]}],
            "completion": [{"role": "assistant", "content": row["completion"]}]}


def child_hf_generation(spec: dict) -> dict:
    child_init(spec)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    lora, src = spec["probe"]["lora"], spec["probe"]["source"]
    train_ds = Dataset.from_list([sft_row(r) for r in read_jsonl(spec["train_file"])])
    marks: dict = {"train_s": 0.0, "tokens": 0}
    args = SFTConfig(output_dir=str(Path(spec["out"]) / "hf_trainer"), **HF_SFT, max_steps=spec["max_steps"] or -1,
                     save_strategy="no", report_to="none", disable_tqdm=True)
    t0 = time.perf_counter()
    set_seed(SEED)  # SFTTrainer initialises the adapters before Trainer seeds
    trainer = SFTTrainer(model=src, args=args, train_dataset=train_ds, quantization_config=bnb_config(),
                         peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                target_modules="all-linear", task_type="CAUSAL_LM"),
                         callbacks=[trl_timer(marks, TrainerCallback)()])
    trainer.data_collator = count_tokens(trainer.data_collator, marks)
    trainer.train()
    trainer.save_model(str(Path(spec["out"]) / "adapter"))
    wall = time.perf_counter() - t0
    sft = {k: getattr(args, k) for k in ("per_device_train_batch_size", "lr_scheduler_type", "warmup_steps",
                                          "weight_decay", "packing", "completion_only_loss", "seed")}
    return hf_result(trainer, marks, wall, {**HF_SFT, **sft, "lora": lora, "target_modules": "all-linear",
                                            "lora_dtype": str(next(p.dtype for p in trainer.model.parameters()
                                                                   if p.requires_grad))})


def child_eval(spec: dict) -> dict:
    child_init(spec)
    from lora_ft.training.evaluation import evaluate_run

    return {run: evaluate_run(run, spec["test_file"], split="test") for run in spec["runs"]}


CHILDREN = {"lora_ft": child_lora_ft, "probe": child_probe, "hf_classification": child_hf_classification,
            "hf_generation": child_hf_generation, "eval": child_eval}


# ------------------------------------------------------------------------------------------------ main
def run_sweep(recipe: Path, lrs: list[float], overrides: list[str], out: Path, threads: int) -> float:
    """``lora-ft sweep`` over the learning rates, its trials under ``out/sweep/``; returns its wall time."""
    cmd = [sys.executable, "-m", "lora_ft", "sweep", str(recipe), "--grid",
           "train.lr=" + ",".join(f"{x:g}" for x in lrs)]
    for item in [*overrides, f"output_dir={out}"]:
        cmd += ["--set", item]
    log.info("---- %s", " ".join(cmd[1:]))
    t0 = time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, stdout=sys.stderr, env=env)  # stdout carries only the final JSON line
    if proc.returncode != 0:
        raise SystemExit(f"bench_defaults: lora-ft sweep failed (exit status {proc.returncode})")
    return time.perf_counter() - t0


def bench_task(task: str, data: Path, tdir: Path, a: argparse.Namespace, threads: int) -> dict:
    """Every chosen side of one task, trained and scored on test."""
    kind, pair = TASKS[task]
    missing = [s for s in SPLITS if not (data / f"{s}.jsonl").is_file()]
    if missing:
        raise SystemExit(f"bench_defaults: {data} has no {', '.join(missing)}.jsonl; build the held-out tasks first "
                         "(scripts/build_heldout_tasks.py) or point --data-dir at them")
    tdir.mkdir(parents=True)
    recipe = tdir / "minimal.yaml"
    recipe.write_text(yaml.safe_dump(minimal_recipe(task, data, tdir / "lora_ft"), sort_keys=False))
    base = {"threads": threads}
    sides: dict[str, dict] = {}
    runs: dict[str, Path] = {}
    if {"lora_ft", "sweep"} & set(a.sides):
        wall = run_child("lora_ft", {**base, "recipe": str(recipe), "overrides": a.set}, tdir, __file__)["wall_s"]
        minimal = {**run_facts(tdir / "lora_ft"), "wall_s": round(wall, 1)}
        log.info("%s: lora_ft resolved %s", task, minimal["hparams"])
        if "lora_ft" in a.sides:
            sides["lora_ft"], runs["lora_ft"] = minimal, tdir / "lora_ft"
    if "hf" in a.sides:
        hf = tdir / "hf"
        probe = run_child("probe", {**base, "recipe": str(recipe), "out": str(hf)}, tdir, __file__)
        r = run_child(f"hf_{kind}", {**base, "probe": probe, "text_pair": pair, "out": str(hf),
                                     "max_steps": a.max_steps, "train_file": str(data / "train.jsonl")}, tdir, __file__)
        sides["hf"], runs["hf"] = {**r, "wall_s": round(r["wall_s"], 1), "tokens_per_s": round(r["tokens_per_s"], 1),
                                   "train_loop_s": round(r["train_loop_s"], 1)}, hf
    if "sweep" in a.sides:
        lr = minimal["hparams"].get("lr")
        if not isinstance(lr, int | float):
            raise SystemExit(f"bench_defaults: {task}: run_config.yaml of the lora_ft run has train.lr {lr!r}, not a "
                             "number: the sweep needs the resolved learning rate")
        wall = run_sweep(recipe, sweep_lrs(lr), a.set, tdir / "sweep", threads)
        trials = sorted((tdir / "sweep" / "sweep").glob("trial-*"))
        for d in trials:
            if not (d / "eval_results.json").is_file():
                log.warning("%s: sweep trial %s failed (see sweep.csv there); it is left out", task, d.name)
        candidates = {"minimal": tdir / "lora_ft",
                      **{f"lr={yaml.safe_load((d / 'run_config.yaml').read_text())['train']['lr']:g}": d
                         for d in trials if (d / "eval_results.json").is_file()}}
        after = {n: json.loads((d / "eval_results.json").read_text())["after"] for n, d in candidates.items()}
        best = pick_best(after, kind)
        sides["sweep"] = {**run_facts(candidates[best]), "best": best, "wall_s": round(minimal["wall_s"] + wall, 1),
                          "sweep_process_s": round(wall, 1),
                          "trials": {n: {"validation": v.get("validation")} for n, v in after.items()}}
        runs["sweep"] = candidates[best]
        log.info("%s: sweep best on validation: %s (%s)", task, best, candidates[best])
    unique = sorted({str(d) for d in runs.values()})
    scores = run_child("eval", {**base, "runs": unique, "test_file": str(data / "test.jsonl")}, tdir, __file__)
    for side, d in runs.items():
        sides[side]["test"] = scores[str(d)]
    examples = {s: sum(1 for line in (data / f"{s}.jsonl").read_text().splitlines() if line.strip()) for s in SPLITS}
    return {"kind": kind, "examples": examples, "sides": sides}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    ap.add_argument("--data-dir", default=str(DATA_DIR), help=f"the held-out tasks (default {DATA_DIR})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for every lora_ft run, e.g. freeze.strategy=head_first (repeatable)")
    ap.add_argument("--label", default=None, help="the lora_ft side's name in the table (default: lora_ft, "
                                                  "lora_ft+set with --set)")
    ap.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)  # the HF sides, smoke tests only
    a = parse_or_serve(ap, CHILDREN)
    if a is None:
        return
    import torch

    threads = a.threads or torch.get_num_threads()
    label = a.label or ("lora_ft+set" if a.set else "lora_ft")
    data_dir = Path(a.data_dir).expanduser()
    work = work_dir(a.keep, "bench_defaults-")
    log.info("tasks %s, sides %s, threads %d, data %s, work %s, lora_ft --set %s", a.tasks, a.sides, threads,
             data_dir, work, a.set)
    try:
        tasks = {task: bench_task(task, data_dir / task, work / task, a, threads) for task in a.tasks}
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    import importlib.metadata as md

    out = {"machine": {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "threads": threads},
           "versions": {**versions(), "lora_ft": md.version("lora_ft")}, "lora_ft_label": label,
           "lora_ft_set": a.set, "hf_max_steps": a.max_steps, "data_dir": str(data_dir), "tasks": tasks}
    log.info("results (%s; threads %d)\n%s", out["machine"]["cpu_model"], threads, table(tasks, label))
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
