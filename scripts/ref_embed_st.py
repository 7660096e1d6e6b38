"""Reference for the embedding quickstart: sentence-transformers' own trainer + peft on the same pairs.

Trains a LoRA adapter on all-MiniLM-L6-v2 with ``SentenceTransformerTrainer`` at the settings sentence-transformers
documents for adapters (``examples/sentence_transformer/training/peft/training_gooaq_lora.py``: LoRA r 64, alpha
128, dropout 0.1 on peft's default targets for BERT (query, value), ``MultipleNegativesRankingLoss`` (its cached
variant there, the same loss), 1 epoch, lr 2e-5, warmup ratio 0.1, the no-duplicates batch sampler), with the
trainer's own defaults elsewhere (linear schedule, no weight decay) and batch 32, lora_ft's ``auto`` batch (the
example's 1024 is for its 1M pairs; here it would be the whole training split in one step). Every such setting is
a flag, so the same script also runs at lora_ft's settings. The test split is scored exactly as lora_ft scores it
(``objectives.embedding.Embedding.summarize``: queries = anchors, corpus = the split's positives), before and after.

    python scripts/ref_embed_st.py --seeds 0 1 2 --out ref_embed.json [--lr 2e-4 --r 16 --alpha 32 --targets all]

Prints one JSON line per seed and writes all of them (with the settings and versions) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import datasets
import peft
import sentence_transformers
import torch
from peft import LoraConfig, TaskType, get_peft_model
from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.losses import MultipleNegativesRankingLoss
from sentence_transformers.training_args import BatchSamplers

from lora_ft.modeling.examples import example_path
from lora_ft.objectives.embedding import Embedding
from lora_ft.recipe import DataConfig

log = logging.getLogger("ref_embed_st")
ROOT = Path(__file__).resolve().parent.parent


def score(model: SentenceTransformer, split: datasets.Dataset) -> dict[str, float]:
    """lora_ft's retrieval metrics of ``split`` (recall@k, MRR, ranking loss) for ``model``."""
    anchors = model.encode(split["anchor"], convert_to_tensor=True, batch_size=64)
    positives = model.encode(split["positive"], convert_to_tensor=True, batch_size=64)
    return Embedding(DataConfig(), None).summarize({"anchor": anchors.cpu(), "positive": positives.cpu()})


def run_seed(args: argparse.Namespace, seed: int, data: datasets.DatasetDict) -> dict:
    """One training run of the reference at ``seed``: test metrics before and after, and its training time."""
    model = SentenceTransformer(str(args.model), device=args.device)
    before = score(model, data["test"])
    targets = None if args.targets == "peft" else "all-linear"
    config = LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, inference_mode=False, r=args.r, lora_alpha=args.alpha,
                        lora_dropout=args.dropout, target_modules=targets)
    # What model.add_adapter(config) does, through peft directly: transformers 5's add_adapter demands peft >= 0.22
    # and lora_ft pins 0.21. The trainer then trains what requires a gradient: the LoRA factors only.
    model[0].model = get_peft_model(model[0].model, config)
    train_args = SentenceTransformerTrainingArguments(
        output_dir=str(args.work / f"seed{seed}"), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=64, learning_rate=args.lr, warmup_ratio=args.warmup, seed=seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no", eval_strategy="no", logging_steps=10,
        report_to="none", use_cpu=args.device == "cpu", dataloader_num_workers=0)
    trainer = SentenceTransformerTrainer(model=model, args=train_args, train_dataset=data["train"],
                                         loss=MultipleNegativesRankingLoss(model))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return {"seed": seed, "before": before, "after": score(model, data["test"]), "train_seconds": round(seconds, 1),
            "steps": trainer.state.global_step}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "docstring_pairs")
    parser.add_argument("--model", type=Path, default=None, help="default: lora_ft's example:minilm-l6")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--alpha", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--targets", choices=("peft", "all"), default="peft",
                        help="peft: peft's default for the architecture (BERT: query, value); all: every linear layer")
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ref_embed_st"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = args.model or example_path("minilm-l6")
    data = datasets.load_dataset("json", data_files={s: str(args.data_dir / f"{s}.jsonl") for s in ("train", "test")})
    data = data.select_columns(["anchor", "positive"])  # the trainer feeds every column to the loss
    results = []
    for seed in args.seeds:
        results.append(run_seed(args, seed, data))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        versions = {"sentence_transformers": sentence_transformers.__version__, "peft": peft.__version__,
                    "torch": torch.__version__, "python": platform.python_version()}
        args.out.write_text(json.dumps({"settings": settings, "versions": versions, "runs": results}, indent=2) + "\n",
                            encoding="utf-8")


if __name__ == "__main__":
    main()
