"""The classifier engine A/B of issue 24: lora_ft's minimal recipe against ``Trainer`` + peft at the settings lora_ft
resolves, over seeds, and lora_ft with one factor changed at a time.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python scripts/ab_classify.py --data DIR --seeds 1 2 3 \
        [--variant NAME=KEY=VALUE[,KEY=VALUE]]... [--sides lora_ft hf] [--threads 1] --out results.jsonl

``DIR`` holds ``{train,validation,test}.jsonl`` ({"text", "label"}; ``scripts/build_docstring_task.py`` builds a
12-class one). Every run trains in its own fresh process (``bench_defaults``' children: the minimal recipe for
lora_ft, its ``probe`` and ``hf_classification`` for the ``Trainer``, with the seed replaced) and is scored on test
by lora_ft's evaluation code; each result is appended to ``--out`` as one JSON line as soon as it is known, so a run
cut short keeps what it measured. ``--variant linear=train.schedule=linear`` adds a lora_ft side with that
override; the sides run seed by seed (all sides of seed 1, then of seed 2, …) so that an interrupted A/B still has
matched seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import bench_defaults as bd
import yaml
from bench_train import parse_or_serve, run_child, work_dir

log = logging.getLogger("ab_classify")


def child_hf(spec: dict) -> dict:
    """``bench_defaults``' Trainer side with ``spec["seed"]`` in place of its fixed seed."""
    bd.SEED = spec["seed"]
    bd.HF_CLASSIFY = {**bd.HF_CLASSIFY, "seed": spec["seed"]}
    return bd.child_hf_classification(spec)


CHILDREN = {"lora_ft": bd.child_lora_ft, "probe": bd.child_probe, "hf": child_hf, "eval": bd.child_eval}


def minimal(data: Path, out: Path) -> dict:
    return {"model": {"name": "example:minilm-l6", "task": "sequence_classification", "quant": "nf4"},
            "data": {s: str(data / f"{s}.jsonl") for s in bd.SPLITS}, "output_dir": str(out)}


def one_run(side: str, sets: list[str], seed: int, data: Path, work: Path, threads: int) -> dict:
    """Train one side at one seed and score it on test."""
    run = work / f"{side}-s{seed}"
    run.mkdir(parents=True)
    recipe = run / "minimal.yaml"
    recipe.write_text(yaml.safe_dump(minimal(data, run / "lora_ft"), sort_keys=False))
    base = {"threads": threads}
    if side == "hf":
        probe = run_child("probe", {**base, "recipe": str(recipe), "out": str(run / "hf")}, run, __file__)
        r = run_child("hf", {**base, "probe": probe, "text_pair": None, "out": str(run / "hf"), "max_steps": None,
                             "train_file": str(data / "train.jsonl"), "seed": seed}, run, __file__)
        folder, facts = run / "hf", {k: r[k] for k in ("wall_s", "tokens_per_s", "steps", "epochs")}
    else:
        r = run_child("lora_ft", {**base, "recipe": str(recipe), "overrides": [f"train.seed={seed}", *sets]}, run,
                      __file__)
        folder = run / "lora_ft"
        f = bd.run_facts(folder)
        facts = {"wall_s": r["wall_s"], **{k: f[k] for k in ("tokens_per_s", "steps", "epochs")},
                 "best_step": f["hparams"].get("best_step"), "validation_accuracy": (f["validation"] or {}).get(
                     "accuracy")}
    test = run_child("eval", {**base, "runs": [str(folder)], "test_file": str(data / "test.jsonl")}, run,
                     __file__)[str(folder)]
    return {"side": side, "sets": sets, "seed": seed, **facts, "test_accuracy": test["accuracy"],
            "test_loss": test["loss"], "test_f1_macro": test["f1_macro"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--sides", nargs="+", default=["lora_ft", "hf"])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]")
    ap.add_argument("--out", help="JSON lines file the results are appended to")
    a = parse_or_serve(ap, CHILDREN)
    if a is None:
        return
    if not a.data or not a.out:
        ap.error("--data and --out are required")
    variants = {"lora_ft": [], "hf": []}
    for v in a.variant:
        name, sets = v.split("=", 1)
        variants[name] = sets.split(",")
    sides = [s for s in [*a.sides, *(n for n in variants if n not in ("lora_ft", "hf"))] if s in variants]
    work = work_dir(a.keep, "ab_classify-")
    data = Path(a.data).expanduser()
    try:
        for seed in a.seeds:
            for side in sides:
                t0 = time.perf_counter()
                kind = "hf" if side == "hf" else side
                res = one_run(kind, variants[side], seed, data, work / side, a.threads or 1)
                res["side"] = side
                with open(a.out, "a") as f:
                    f.write(json.dumps(res) + "\n")
                log.info("%s seed %d: test accuracy %.4f (%.0f s)", side, seed, res["test_accuracy"],
                         time.perf_counter() - t0)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
