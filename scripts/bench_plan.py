"""Predicted (``lora_ft.memory``, config only) vs measured peak training memory, one table row per configuration.

    LORA_FT_HOME=/tmp/lfhome HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_plan.py [--quick] [--only SUBSTR]

Each configuration is measured in a fresh subprocess by ``lora_ft.training.measure.measure_peak``: on a GPU
``torch.cuda.max_memory_allocated`` over one training step; on the CPU the bytes held before the step
(parameters, buffers, quantization state, AdamW state) plus the peak of the net allocations during the step,
from the profiler's allocator events. The step is the real one (``load_model``, ``attach_adapters``,
accelerate, ``train_loss``, backward, clipping, AdamW) on a synthetic batch with padding; causal LM batches put
the loss on the last half of each example.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SMOL, MINI = "example:smollm2-135m-instruct", "example:minilm-l6"
# (model, task, quant, micro_batch, seq_len, answer_fraction, recipe overrides)
CONFIGS = [
    *[(SMOL, "causal_lm", q, 2, s, 0.5, {}) for q in ("none", "int8", "nf4") for s in (64, 192)],
    *[(MINI, "sequence_classification", q, 8, s, 1.0, {}) for q in ("none", "int8", "nf4") for s in (64, 256)],
    # the GPU defaults, on the CPU: bf16 autocast and gradient checkpointing
    (SMOL, "causal_lm", "nf4", 2, 192, 0.5, {"model": {"compute_dtype": "bf16"},
                                              "train": {"gradient_checkpointing": True}}),
    (SMOL, "causal_lm", "none", 2, 192, 0.5, {"model": {"compute_dtype": "bf16"}}),
    (SMOL, "causal_lm", "none", 2, 192, 0.5, {"train": {"gradient_checkpointing": True}}),
]
QUICK = [c for c in CONFIGS if c[4] == 64]


def recipe_for(model: str, task: str, quant: str, extra: dict):
    from lora_ft.recipe import Recipe

    tree = {"model": {"name": model, "task": task, "quant": quant}, "lora": {"r": 16}}
    for section, values in extra.items():
        tree.setdefault(section, {}).update(values)
    return Recipe.model_validate(tree)


def one(spec: list) -> dict:
    """Measure and predict one configuration (run in its own process)."""
    import torch

    from lora_ft.memory.estimate import estimate
    from lora_ft.memory.shape import model_shape, setting_for
    from lora_ft.modeling import examples
    from lora_ft.training.measure import measure_peak, synthetic_pairs

    examples.set_home(os.environ.get("LORA_FT_HOME"))
    model, task, quant, b, s, frac, extra = spec
    recipe = recipe_for(model, task, quant, extra)
    t0 = time.perf_counter()
    measured = measure_peak(recipe, b, s, frac)
    seconds = time.perf_counter() - t0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # measure_peak packs a causal LM's rows of several examples: what their attention keeps, as data would say
    e = estimate(model_shape(recipe), setting_for(recipe, device), b, s, frac, attended=synthetic_pairs(b, s))
    # The training step's prediction: what measure_peak measures (evaluation is a separate, smaller step here).
    return {"spec": spec, "device": device, "seconds": round(seconds, 1), "measured": measured,
            "predicted": e.step_peak, "rows": {r.label: r.bytes for r in e.rows}}


def label(spec: list) -> str:
    model, task, quant, b, s, frac, extra = spec
    flags = []
    if extra.get("model", {}).get("compute_dtype"):
        flags.append(extra["model"]["compute_dtype"])
    if extra.get("train", {}).get("gradient_checkpointing"):
        flags.append("GC")
    return f"{model.removeprefix('example:')} | {quant}{' ' + '+'.join(flags) if flags else ''} | {b}×{s}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the shorter sequence length only")
    ap.add_argument("--only", default=None, help="configurations whose row contains this text")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON lines")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return 0
    configs = QUICK if args.quick else CONFIGS
    if args.only:
        configs = [c for c in configs if args.only in label(list(c))]
    mib = 1024**2
    print("| model | quant | micro-batch × seq | predicted | measured (held + step) | error |")
    print("|---|---|---|---:|---:|---:|")
    errors = []
    for spec in configs:
        # One thread: memory does not depend on it, and on a shared CPU a second spinning thread makes the
        # step many times slower.
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(list(spec))], capture_output=True,
                              text=True, env=env)
        if proc.returncode:
            print(f"| {label(list(spec))} | failed: {proc.stderr.strip().splitlines()[-1][:120]} |||")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        m = r["measured"]
        err = r["predicted"] / m["peak"] - 1
        errors.append(err)
        print(f"| {label(list(spec))} | {r['predicted'] / mib:,.0f} MiB | {m['peak'] / mib:,.0f} MiB "
              f"({m['held'] / mib:,.0f} + {m['step'] / mib:,.0f}) | {err:+.1%} |", flush=True)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as f:
                f.write(json.dumps(r) + "\n")
    if errors:
        print(f"\n{len(errors)} configurations on {r['device']}: error {min(errors):+.1%} … {max(errors):+.1%} "
              f"(predicted / measured − 1)")
    return 0 if errors and all(abs(e) <= 0.15 for e in errors) else 1


if __name__ == "__main__":
    sys.exit(main())
