"""Plain ``transformers.Trainer`` + peft on the encoder tasks' example data: the reference lora_ft is compared with.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/reference_encoder_tasks.py TASK --seed 0 --out DIR

``TASK``: ``ner`` (``data/docstring_ner``), ``tags`` (``data/debian_tags``, multi-label) or ``overlap``
(``data/docstring_overlap``, regression on text pairs). Writes ``DIR/results.json``: the test metrics, computed by the
same functions lora_ft reports (seqeval; scikit-learn; scipy).

Settings (documented, the same for every task): all-MiniLM-L6-v2 (lora_ft's ``example:minilm-l6``) in fp32 with
``AutoModelForTokenClassification`` / ``AutoModelForSequenceClassification`` (``problem_type``
``multi_label_classification`` or ``regression``); peft LoRA r=16, alpha=32, dropout 0.05 (lora_ft's defaults) on
the modules named query, key, value and dense (the suffixes lora_ft's ``target_modules: auto`` picks for this model),
the new head trained in full (peft's ``modules_to_save`` for the task type); ``TrainingArguments``:
batch 16, 3 epochs, lr 5e-4, warmup over 0.06 of the steps (``warmup_steps=0.06``: transformers 5 reads a
fraction below 1 as a ratio), its defaults otherwise (AdamW, linear decay, weight decay 0, clipping at 1.0),
evaluation on the validation split at every epoch and the best epoch's model kept (``load_best_model_at_end``,
by the task's headline metric: entity F1, micro-F1, Spearman); max length 128;
dynamic padding (``DataCollatorForTokenClassification`` / ``DataCollatorWithPadding``). Token labels: the first
sub-word of a word (the rest -100), as transformers' token-classification example. Multi-label decisions at 0.5, as a
plain script makes them (``micro_f1_tuned``: with per-label thresholds chosen on validation, as lora_ft does).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from datasets import load_dataset
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from lora_ft.modeling import examples
from lora_ft.modeling.loading import resolve_source
from lora_ft.objectives.multilabel import best_thresholds, multilabel_metrics
from lora_ft.objectives.regression import regression_metrics

ROOT = Path(__file__).resolve().parent.parent
DATA = {"ner": "docstring_ner", "tags": "debian_tags", "overlap": "docstring_overlap"}
TARGETS = ["query", "key", "value", "dense"]
BATCH, EPOCHS, LR, WARMUP, MAX_LENGTH = 16, 3, 5e-4, 0.06, 128
log = logging.getLogger("reference_encoder_tasks")


def seqeval_metrics(predictions: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, float]:
    from seqeval.metrics import f1_score, precision_score, recall_score

    truth, predicted = [], []
    for p, t in zip(predictions, labels, strict=True):
        keep = t != -100
        truth.append([names[i] for i in t[keep]])
        predicted.append([names[i] for i in p[keep]])
    right = sum(a == b for t, p in zip(truth, predicted, strict=True) for a, b in zip(t, p, strict=True))
    return {"precision": precision_score(truth, predicted, zero_division=0),
            "recall": recall_score(truth, predicted, zero_division=0),
            "f1": f1_score(truth, predicted, zero_division=0), "token_accuracy": right / sum(map(len, truth))}


def prepare(task: str, tok):
    """The splits tokenized, the label names, the model class and kwargs, the collator, the metric function."""
    files = {s: str(ROOT / "data" / DATA[task] / f"{s}.jsonl") for s in ("train", "validation", "test")}
    ds = load_dataset("json", data_files=files)
    if task == "ner":
        names = ["O", *sorted({t for r in ds["train"]["tags"] for t in r} - {"O"}, key=lambda t: (t[2:], t))]
        ids = {n: i for i, n in enumerate(names)}

        def encode(row):
            enc = tok(row["tokens"], is_split_into_words=True, truncation=True, max_length=MAX_LENGTH)
            labels, previous = [], None
            for w in enc.word_ids():
                labels.append(-100 if w is None or w == previous else ids[row["tags"][w]])
                previous = w
            return {**enc, "labels": labels}

        ds = ds.map(encode, remove_columns=["tokens", "tags"])
        return (ds, names, AutoModelForTokenClassification, {}, DataCollatorForTokenClassification(tok),
                lambda p: seqeval_metrics(p.predictions.argmax(-1), p.label_ids, names), "f1")
    if task == "tags":
        names = sorted({x for r in ds["train"]["label"] for x in r})

        def encode(row):
            return {**tok(row["text"], truncation=True, max_length=MAX_LENGTH),
                    "labels": [float(n in row["label"]) for n in names]}

        ds = ds.map(encode, remove_columns=["text", "label"])

        def metrics(p):
            probs = 1 / (1 + np.exp(-p.predictions))
            return multilabel_metrics((probs >= 0.5).astype(int), p.label_ids.astype(int))

        return (ds, names, AutoModelForSequenceClassification, {"problem_type": "multi_label_classification"},
                DataCollatorWithPadding(tok), metrics, "micro_f1")

    def encode(row):
        return {**tok(row["text"], row["text_pair"], truncation=True, max_length=MAX_LENGTH),
                "labels": float(row["label"])}

    ds = ds.map(encode, remove_columns=["text", "text_pair", "label"])
    return (ds, ["score"], AutoModelForSequenceClassification, {"problem_type": "regression"},
            DataCollatorWithPadding(tok),
            lambda p: regression_metrics(p.predictions.reshape(-1).tolist(), p.label_ids.reshape(-1).tolist()),
            "spearman")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("task", choices=sorted(DATA))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    examples.set_home(os.environ.get("LORA_FT_HOME"))
    source = resolve_source("example:minilm-l6")
    set_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(source)
    ds, names, cls, extra, collator, metrics, best = prepare(args.task, tok)
    model = cls.from_pretrained(source, num_labels=len(names), id2label=dict(enumerate(names)),
                                label2id={n: i for i, n in enumerate(names)}, **extra)
    task_type = TaskType.TOKEN_CLS if args.task == "ner" else TaskType.SEQ_CLS
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                             task_type=task_type))
    targs = TrainingArguments(output_dir=str(args.out / "trainer"), per_device_train_batch_size=BATCH,
                              per_device_eval_batch_size=64, num_train_epochs=EPOCHS, learning_rate=LR,
                              warmup_steps=WARMUP, eval_strategy="epoch", save_strategy="epoch", save_total_limit=1,
                              load_best_model_at_end=True, metric_for_best_model=best, greater_is_better=True,
                              seed=args.seed, report_to=[], logging_steps=25, use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=targs, train_dataset=ds["train"], eval_dataset=ds["validation"],
                      data_collator=collator, compute_metrics=metrics)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    test = trainer.evaluate(ds["test"], metric_key_prefix="test")
    result = {"task": args.task, "seed": args.seed, "train_seconds": round(seconds, 1), "load": os.getloadavg(),
              **{k.removeprefix("test_"): v for k, v in test.items()}}
    if args.task == "tags":  # with thresholds chosen on validation, as lora_ft decides
        val, tst = trainer.predict(ds["validation"]), trainer.predict(ds["test"])
        sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
        cut = best_thresholds(sig(val.predictions), val.label_ids.astype(int))
        result["micro_f1_tuned"] = multilabel_metrics((sig(tst.predictions) >= cut).astype(int),
                                                      tst.label_ids.astype(int))["micro_f1"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log.info("%s", result)


if __name__ == "__main__":
    main()
