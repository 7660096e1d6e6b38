"""Training throughput of lora_ft against TRL's ``SFTTrainer`` + peft, the same QLoRA job on the CPU (issues 6, 13).

    LORA_FT_HOME=/tmp/lfhome HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_train.py [--steps 16] [--keep DIR]
        [--threads 1 | --thread-counts 1 2] [--compute-dtype auto|fp32|bf16] [--trl default packing packing-bf16]

On a machine where anything else runs, use ``--threads 1`` (and ``nice``): with two OpenMP threads per process
on two busy cores, a step waits on the slower thread at every parallel region (measured: 92 s a step instead of
~18 s at one thread), which says nothing about either side.

Prints one JSON line on stdout (logs go to stderr). Every side trains SmolLM2-135M-Instruct, NF4 with double
quantization, LoRA r=16 / alpha=32 / dropout 0.05 on the same linear layers (the ones lora_ft's
``target_modules: auto`` resolves), one epoch over the first ``steps × 8`` examples of the quickstart chat data
(``data/docstrings``), max length 256, micro-batch 8 (examples, or packed rows of 256 tokens where packing is
on), AdamW at lr 3e-4 with a cosine schedule and 2 warmup steps, gradient clipping at 1.0, seed 42, loss on the
answers only, gradient checkpointing off (lora_ft's CPU default; TRL's default is on, which only slows it down
here), no evaluation during training.

- **lora_ft**: ``lora_ft.training.trainer.train`` on ``recipes/quickstart/smollm2-qlora-chat.yaml`` with
  overrides, its defaults otherwise: packing (``data.packing: auto``), ``model.compute_dtype: auto`` (bf16
  autocast on CPUs with AVX512-BF16/AMX whose bf16 GEMM is measured ≥ 1.3× fp32, else fp32), LoRA dropout fused
  into ``lora_A`` and freed memory returned to the OS every few blocks (``train.trim_cpu_memory: auto``, on for
  this job; ``--no-trim`` turns it off).
- **TRL**, the documented QLoRA recipe: ``SFTTrainer(model=path, quantization_config=BitsAndBytesConfig(...),
  peft_config=LoraConfig(...))``, at its defaults (``trl-default``: no packing) and at the settings that are its
  best for this hardware: ``trl-packing`` (``packing=True``, its default ``bfd`` strategy, which is padding-free:
  one row per batch with position ids, which transformers turns into a per-example attention mask) and
  ``trl-packing-bf16`` (the same under bf16 autocast, fast on CPUs with AVX512-BF16 or AMX). TRL's own fused,
  chunked LM-head loss is on in every variant (its default since 1.x). The ratios are against TRL's defaults and
  against the fastest TRL variant. SmolLM2's chat template has no ``{% generation %}`` markers, so
  ``assistant_only_loss`` cannot be used: the conversations are given as conversational prompt/completion pairs
  with ``completion_only_loss=True``. TRL casts the LoRA weights of a quantized model to bf16 (its QLoRA
  convention); that is left as TRL does it.

Each side runs in its own fresh process, one after the other, so that its peak RSS is its own:

- **tokens/s**: real (non-padding) tokens of the examples trained ÷ the training loop's time (per optimizer step,
  batch fetching included; model loading, saving and evaluation excluded). lora_ft's is the ``tokens_per_s`` of
  the last step row of its ``metrics.jsonl``; TRL's is timed by a callback from the start of the epoch to the end
  of the last step.
- **peak RSS**: the process's high-water mark over loading and training (``ru_maxrss``); ``*_train_peak_rss_mb`` is
  the high-water mark of the training phase alone (reset through ``/proc/self/clear_refs`` once the model is ready).
- **held-out loss**: both final adapters are scored by the same code,
  ``lora_ft.training.evaluation.evaluate_run``, on the first
  ``--eval-examples`` examples of ``data/docstrings/validation.jsonl`` (token-weighted loss on the answer tokens,
  lora_ft's masks), in a third process.
- **MFU**: model FLOPs per second ÷ the GEMM peak of this machine in the side's compute dtype (fp32 or bf16),
  measured in this run (best of several ``torch.mm`` of 2048×2048 at the side's thread count, before and after
  the training runs), with
  lora_ft's own count (``lora_ft.training.throughput``): 4 FLOPs per frozen linear weight and 6 per LoRA weight
  per token, the output projection only on the positions that carry a label (both sides compute logits only
  there); attention scores (a few % at these lengths) are not counted.

``--thread-counts 1 2`` runs the whole comparison at each thread count (one JSON line, a block per count) and
prints the machine's load average before and after (the ratios are only as good as the machine is quiet).
Targets (issue 26, against TRL at its best): ≥ 1.5× its tokens/s, ≤ 0.7× its peak RSS, held-out loss ≤ +0.02.

(A little over 450 lines: this docstring, the two sides' children and the process plumbing that
``bench_defaults.py``, ``bench_classify.py`` and ``bench_dpo.py`` import from here.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes/quickstart/smollm2-qlora-chat.yaml"
DATA = ROOT / "data/docstrings"
MODEL = "example:smollm2-135m-instruct"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LR, WARMUP, SEED = 3e-4, 2, 42
IGNORE = -100

log = logging.getLogger("bench_train")


# ------------------------------------------------------------------------------------------------ helpers
def rss_mb(field: str = "VmHWM") -> float:
    """A field of /proc/self/status (VmHWM: peak RSS, VmRSS: current), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def process_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def cpu_flags() -> list[str]:
    """The flags that decide matmul speed: AVX2/AVX-512 (and their bf16/VNNI parts) and AMX."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma")))
    return []


def versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")}


def reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux ≥ 4.0), so the next peak is the training phase's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def source() -> str:
    from lora_ft.modeling import examples
    from lora_ft.modeling.loading import resolve_source

    examples.set_home(os.environ.get("LORA_FT_HOME"))
    return resolve_source(MODEL)


def gemm_peak_gflops(n: int = 2048, reps: int = 8, dtype: str = "fp32") -> float:
    """Best ``torch.mm`` rate of n×n×n in ``dtype`` (fp32 or bf16) over ``reps`` runs (after a warm-up), in
    GFLOP/s."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b, c = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt), torch.empty(n, n, dtype=dt)
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def model_shape(src: str) -> dict:
    """The LoRA targets and lora_ft's FLOP weight counts of the model as lora_ft trains it (fp32 is enough: the
    counts are by logical shape, the same under NF4)."""
    from lora_ft.modeling.adapters import attach_adapters
    from lora_ft.modeling.loading import load_model
    from lora_ft.recipe import LoraConfigSection, ModelConfig
    from lora_ft.training.throughput import count_flop_weights

    loaded = load_model(ModelConfig(name=src), "fp32")
    model = attach_adapters(loaded.model, LoraConfigSection(r=LORA["r"], alpha=LORA["alpha"]), "causal_lm", [], False)
    counts = count_flop_weights(model)
    return {"targets": sorted(model.peft_config["default"].target_modules), "frozen": counts.frozen,
            "trainable": counts.trainable, "head": counts.head}


def flops(shape: dict, tokens: int, label_tokens: int) -> float:
    from lora_ft.training.throughput import FlopCounts

    return FlopCounts(shape["frozen"], shape["trainable"], shape["head"]).step(tokens, label_tokens)


# ------------------------------------------------------------------------------------------------ children
def train_marked(recipe) -> tuple[dict, float]:
    """lora_ft's ``train`` on the recipe: (the memory marks taken once the model is ready, the final peak RSS)."""
    from lora_ft.training.trainer import train

    marks: dict = {}

    class TrainStart(logging.Handler):
        """train() logs "global batch ..." once the model, adapters and optimizer are ready, before the loop."""

        def emit(self, record: logging.LogRecord) -> None:
            if "load_peak_mb" not in marks and record.getMessage().startswith("global batch"):
                marks.update(load_peak_mb=process_peak_mb(), rss_before_train_mb=rss_mb("VmRSS"),
                             reset=reset_peak())

    handler = TrainStart(logging.INFO)
    logging.getLogger("lora_ft.training.trainer").addHandler(handler)
    try:
        train(recipe, overwrite=True)
    finally:
        logging.getLogger("lora_ft.training.trainer").removeHandler(handler)
    return marks, process_peak_mb()


def child_lora_ft(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    source()  # sets LORA_FT_HOME
    from lora_ft.data.prepare import prepare_data
    from lora_ft.modeling.loading import load_tokenizer
    from lora_ft.objectives import objective_for
    from lora_ft.recipe import load_recipe

    out = Path(spec["out"])
    recipe = load_recipe(RECIPE, [
        f"model.name={MODEL}", "model.quant=nf4", "model.double_quant=true",
        f"model.compute_dtype={spec['compute_dtype']}",
        f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}", f"lora.dropout={LORA['dropout']}",
        "lora.target_modules=auto",
        f"data.train={spec['train_file']}", "data.validation=null", "data.test=null",
        f"data.max_length={spec['max_length']}", "data.format=messages",
        "train.epochs=1", "train.max_steps=null", f"train.micro_batch_size={spec['micro_batch']}",
        f"data.packing={spec.get('packing', 'auto')}",
        f"train.grad_accum={spec['grad_accum']}", f"train.lr={LR}", "train.schedule=cosine", f"train.warmup={WARMUP}",
        "train.eval_every=null", "train.gradient_checkpointing=false", "train.max_grad_norm=1.0",
        f"train.seed={SEED}", "train.log_every=1", "train.checkpoint_every=null",
        "forgetting.enabled=false", f"train.trim_cpu_memory={spec['trim']}", f"output_dir={out}",
    ])
    marks, train_peak = train_marked(recipe)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r]
    info = json.loads((out / "run_info.json").read_text())
    tok = load_tokenizer(source(), recipe.model)
    ds = prepare_data(recipe.data, objective_for(recipe, tok), SEED).splits["train"]
    tokens = sum(len(x) for x in ds["input_ids"])
    assert tokens == info["data"]["train"]["tokens"], (tokens, info["data"]["train"])
    tps = steps[-1]["tokens_per_s"]
    return {"tokens": tokens, "label_tokens": sum(sum(t != IGNORE for t in x[1:]) for x in ds["labels"]),
            "examples": len(ds), "steps": steps[-1]["step"], "tokens_per_s": tps, "train_s": tokens / tps,
            "packing": info["packing"], "compute_dtype": info["compute_dtype"],
            "compute_dtype_source": info.get("resolved", {}).get("model.compute_dtype", {}).get("source", "recipe"),
            "trim": yaml.safe_load((out / "run_config.yaml").read_text())["train"]
            ["trim_cpu_memory"],
            "train_losses": [round(r["loss"], 4) for r in steps], "targets": info["targets"],
            "global_batch": info["global_batch"], "peak_rss_mb": max(marks.get("load_peak_mb", 0), train_peak),
            "train_peak_rss_mb": train_peak if marks.get("reset") else None,
            "rss_before_train_mb": marks.get("rss_before_train_mb")}


def child_trl(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    src = source()
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(spec["train_file"]).read_text().splitlines()]
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    # Conversational prompt/completion: the only answer-only loss TRL offers for a template without
    # {% generation %} markers.
    train_ds = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    marks: dict = {"train_s": 0.0}
    Timer = trl_timer(marks, TrainerCallback)  # noqa: N806 - a class

    packing, bf16 = spec["variant"] in ("packing", "packing-bf16"), spec["variant"] == "packing-bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    args = SFTConfig(
        output_dir=spec["out"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["grad_accum"], max_steps=-1, num_train_epochs=1,
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=WARMUP, weight_decay=0.0, max_grad_norm=1.0,
        max_length=spec["max_length"], packing=packing, completion_only_loss=True,
        gradient_checkpointing=False, bf16=bf16, fp16=False, use_cpu=True, seed=SEED, report_to="none",
        save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": "bfloat16" if bf16 else "float32"},
    )
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=spec["targets"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=src, args=args, train_dataset=train_ds,
                         processing_class=AutoTokenizer.from_pretrained(src), peft_config=peft_config,
                         quantization_config=bnb, callbacks=[Timer()])
    ds = trainer.train_dataset
    if not packing and len(ds) != spec["steps"] * spec["micro_batch"] * spec["grad_accum"]:
        raise RuntimeError(f"TRL kept {len(ds)} of {len(rows)} examples: the sides would not train the same data")
    trainer.train()
    train_peak = process_peak_mb()
    trainer.save_model(str(Path(spec["out"]) / "adapter"))
    # Packed, TRL's rows hold the examples end to end (its bfd strategy splits none): the same real tokens.
    tokens = sum(len(x) for x in ds["input_ids"])
    losses = [round(r["loss"], 4) for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
    return {"tokens": tokens, "label_tokens": sum(sum(t != IGNORE for t in x[1:]) for x in ds["labels"]),
            "examples": len(rows), "steps": trainer.state.global_step, "tokens_per_s": tokens / marks["train_s"],
            "train_s": marks["train_s"], "train_losses": losses,
            "lora_dtype": str(next(p.dtype for p in trainer.model.parameters() if p.requires_grad)),
            "peak_rss_mb": max(marks.get("load_peak_mb", 0), train_peak),
            "train_peak_rss_mb": train_peak if marks.get("reset") else None,
            "rss_before_train_mb": marks.get("rss_before_train_mb")}


def trl_timer(marks: dict, callback: type) -> type:
    """A transformers ``TrainerCallback`` (passed in: imported by the child) that records the memory peak of
    loading in ``marks``, resets it, and sums the training loop's time (epoch start to each step's end)."""

    class Timer(callback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.update(load_peak_mb=process_peak_mb(), rss_before_train_mb=rss_mb("VmRSS"), reset=reset_peak())

        def on_epoch_begin(self, args, state, control, **kwargs):
            marks["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            marks["train_s"] += now - marks["t"]
            marks["t"] = now

    return Timer


def child_eval(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    source()
    from lora_ft.training.evaluation import evaluate_run

    return {side: evaluate_run(run_dir, spec["eval_file"], split="heldout") for side, run_dir in spec["runs"].items()}


CHILDREN = {"lora_ft": child_lora_ft, "trl": child_trl, "eval": child_eval}


def run_child(kind: str, spec: dict, work: Path, script: str = __file__) -> dict:
    """Run ``script --child kind`` (this script's, or another bench script's) in a fresh process."""
    spec_file, result_file = work / f"{kind}.spec.json", work / f"{kind}.result.json"
    spec_file.write_text(json.dumps(spec))
    log.info("---- %s (fresh process)", kind)
    t0 = time.perf_counter()
    # The child's stdout goes to our stderr: stdout carries only the final JSON line.
    proc = subprocess.run([sys.executable, script, "--child", kind, str(spec_file), str(result_file)],
                          stdout=sys.stderr, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise SystemExit(f"{Path(script).stem}: the {kind} process failed (exit status {proc.returncode})")
    log.info("---- %s done in %.0f s", kind, time.perf_counter() - t0)
    return json.loads(result_file.read_text())


def parse_or_serve(ap: argparse.ArgumentParser, children: dict) -> argparse.Namespace | None:
    """The options every bench script has (``--threads``, ``--keep``, the hidden ``--child``), logging to stderr;
    in a child process, run the child and return None."""
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--keep", metavar="DIR", help="keep the runs (adapters, metrics) in DIR instead of a temp dir")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("lora_ft").setLevel(logging.INFO)
    if a.child:
        serve_child(children, a.child)
        return None
    return a


def serve_child(children: dict, child: list[str]) -> None:
    """In a child process: run ``children[kind]`` on the spec file, write its result file."""
    import datasets
    import transformers

    datasets.disable_progress_bars()  # the per-file "Loading weights" and "Map" bars would flood the log
    transformers.utils.logging.disable_progress_bar()
    kind, spec_file, result_file = child
    Path(result_file).write_text(json.dumps(children[kind](json.loads(Path(spec_file).read_text()))))


def work_dir(keep: str | None, prefix: str) -> Path:
    """``--keep DIR`` (emptied first), else a fresh temporary folder."""
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=prefix))
    if keep and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return work


# ------------------------------------------------------------------------------------------------ main
SPEED_TARGET, RSS_TARGET, LOSS_TARGET = 1.5, 0.7, 0.02
"""Issue 26's targets against TRL at its best: ≥ 1.5× its tokens/s, ≤ 0.7× its peak RSS, held-out loss ≤ +0.02."""


def compare(a: argparse.Namespace, threads: int, shape: dict, work: Path) -> dict:
    """lora_ft and the TRL variants at ``threads`` threads, then the held-out scoring: the JSON result for them."""
    import torch

    torch.set_num_threads(threads)
    global_batch = a.micro_batch * a.grad_accum
    n_train = a.steps * global_batch
    data = Path(a.data).expanduser()
    train_rows = (data / "train.jsonl").read_text().splitlines()[:n_train]
    if len(train_rows) < n_train:
        raise SystemExit(f"bench_train: {n_train} training examples needed, {data / 'train.jsonl'} has fewer")
    (work / "train.jsonl").write_text("\n".join(train_rows) + "\n")
    (work / "validation.jsonl").write_text(
        "\n".join((data / "validation.jsonl").read_text().splitlines()[: a.eval_examples]) + "\n")
    peaks = {dt: [gemm_peak_gflops(dtype=dt)] for dt in ("fp32", "bf16")}
    log.info("threads %d; GEMM peak fp32 %.1f, bf16 %.1f GFLOP/s; %d training examples, %d steps of %d; "
             "LoRA on %s", threads, peaks["fp32"][0], peaks["bf16"][0], n_train, a.steps, global_batch,
             shape["targets"])
    spec = {"threads": threads, "trim": "false" if a.no_trim else "auto", "compute_dtype": a.compute_dtype,
            "steps": a.steps, "micro_batch": a.micro_batch, "grad_accum": a.grad_accum,
            "max_length": a.max_length, "train_file": str(work / "train.jsonl"), "targets": shape["targets"]}
    res = {"lora_ft": run_child("lora_ft", {**spec, "out": str(work / "lora_ft")}, work)}
    for variant in a.trl:
        res[f"trl-{variant}"] = run_child("trl", {**spec, "variant": variant, "out": str(work / f"trl-{variant}")},
                                          work)
    for dt in peaks:
        peaks[dt].append(gemm_peak_gflops(dtype=dt))
    if res["lora_ft"]["targets"] != shape["targets"]:
        raise SystemExit(f"bench_train: LoRA targets differ: {res['lora_ft']['targets']} vs {shape['targets']}")
    # TRL's adapters are scored through evaluate_run too: they need a lora_ft run folder around the adapter.
    for side in res:
        for name in ("run_config.yaml", "run_info.json"):
            if side != "lora_ft":
                shutil.copy(work / "lora_ft" / name, work / side / name)
    held = run_child("eval", {"threads": threads, "eval_file": str(work / "validation.jsonl"),
                              "runs": {s: str(work / s) for s in res}}, work)
    for side, r in res.items():
        log.info("train losses %s (%d threads): %s", side, threads, r["train_losses"])
    return summarize(res, held, shape, {dt: max(p) for dt, p in peaks.items()}, peaks) | {
        "threads": threads, "examples": n_train, "micro_batch": a.micro_batch, "max_length": a.max_length,
        "data": a.data}


def summarize(res: dict, held: dict, shape: dict, peak: dict[str, float], peaks: dict[str, list[float]]) -> dict:
    """Per side: tokens/s, RSS, held-out loss, MFU against the GEMM peak of the side's compute dtype; the ratios
    against TRL's defaults and its best variant, and issue 26's targets."""
    out: dict = {}
    for side, r in res.items():
        dtype = r.get("compute_dtype") or ("bf16" if side.endswith("bf16") else "fp32")
        mfu = flops(shape, r["tokens"], r["label_tokens"]) / r["train_s"] / (peak[dtype] * 1e9)
        out[side] = {"tokens_per_s": round(r["tokens_per_s"], 1), "peak_rss_mb": round(r["peak_rss_mb"]),
                     "train_peak_rss_mb": r["train_peak_rss_mb"] and round(r["train_peak_rss_mb"]),
                     "heldout_loss": round(held[side]["loss"], 4), "compute_dtype": dtype,
                     f"mfu_vs_{dtype}_peak": round(mfu, 4), "steps": r["steps"],
                     "train_s": round(r["train_s"], 1), "tokens": r["tokens"], "label_tokens": r["label_tokens"],
                     "last_train_loss": r["train_losses"][-1]}
    trl = [side for side in res if side != "lora_ft"]
    best = max(trl, key=lambda side: res[side]["tokens_per_s"])
    for name, side in (("trl_default", "trl-default"), ("trl_best", best)):
        if side not in res:
            continue
        out[f"vs_{name}"] = {"peer": side,
                             "speed_ratio": round(res["lora_ft"]["tokens_per_s"] / res[side]["tokens_per_s"], 3),
                             "rss_ratio": round(res["lora_ft"]["peak_rss_mb"] / res[side]["peak_rss_mb"], 3),
                             "heldout_loss_diff": round(held["lora_ft"]["loss"] - held[side]["loss"], 4)}
    b = out["vs_trl_best"]
    out.update({
        "targets_met (vs TRL at its best)": {f"speed_ge_{SPEED_TARGET}x": b["speed_ratio"] >= SPEED_TARGET,
                                             f"rss_le_{RSS_TARGET}x": b["rss_ratio"] <= RSS_TARGET,
                                             "loss_le_trl_plus_0.02": b["heldout_loss_diff"] <= LOSS_TARGET},
        "lora_ft_packing": res["lora_ft"]["packing"], "lora_ft_trim_cpu_memory": res["lora_ft"]["trim"],
        "lora_ft_compute_dtype": res["lora_ft"]["compute_dtype"],
        "lora_ft_compute_dtype_source": res["lora_ft"]["compute_dtype_source"],
        "gemm_peak_gflops": {dt: round(p, 1) for dt, p in peak.items()},
        "gemm_runs_gflops": {dt: [round(x, 1) for x in p] for dt, p in peaks.items()},
        "heldout_examples": held["lora_ft"]["examples"], "heldout_tokens": held["lora_ft"]["tokens"],
    })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps (one epoch over steps × global batch)")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--eval-examples", type=int, default=48, help="held-out examples (validation split)")
    ap.add_argument("--data", default=str(DATA),
                    help="a folder of chat data ({messages: [..., assistant]} rows in train.jsonl and "
                         "validation.jsonl; default: the quickstart's), e.g. a held-out task of "
                         "build_heldout_tasks.py (~/.cache/lora_ft/heldout/man-options)")
    ap.add_argument("--no-trim", action="store_true",
                    help="lora_ft with train.trim_cpu_memory off (default: its auto)")
    ap.add_argument("--compute-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="lora_ft's model.compute_dtype (auto: its default, bf16 on CPUs with bf16 units where a "
                         "bf16 GEMM is measured faster, else fp32)")
    ap.add_argument("--thread-counts", type=int, nargs="+", default=None,
                    help="run the whole comparison once per thread count, e.g. 1 2 (default: --threads)")
    ap.add_argument("--trl", nargs="+", default=["default", "packing", "packing-bf16"],
                    choices=["default", "packing", "packing-bf16"], help="TRL variants to run")
    a = parse_or_serve(ap, CHILDREN)
    if a is None:
        return

    import torch

    counts = a.thread_counts or [a.threads or torch.get_num_threads()]
    work = work_dir(a.keep, "bench_train-")
    out: dict = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "versions": versions(),
                 "load_average": os.getloadavg()}
    try:
        shape = model_shape(source())
        out["flop_weights"] = {k: shape[k] for k in ("frozen", "trainable", "head")}
        for threads in counts:
            (work / f"t{threads}").mkdir()
            out[f"threads_{threads}"] = compare(a, threads, shape, work / f"t{threads}")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    out["load_average_after"] = os.getloadavg()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
