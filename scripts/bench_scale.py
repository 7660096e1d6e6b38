"""Cost as the job grows: random-init models of real shapes, loaded and trained through lora_ft as a user would.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_scale.py make [--models ...] [--dir /tmp/lfscale]
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_scale.py run [--models ...] [--seqs 512 2048] [--threads 1]
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_scale.py ladder [--model smollm2-135m] [--seqs 256 ... 8192]
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_scale.py plan   # the 7-8B shapes, on paper

``make`` writes each model as a user downloads it: ``config.json`` with the published sizes (no download), the
SmolLM2 example's tokenizer (its 49,152 ids fit every vocabulary here), and bf16 weights in safetensors shards of
at most ``--shard-gb`` (2 GiB by default) with an index, written one shard at a time (the script never holds a
whole model). Weights are N(0, 0.02), norms 1, biases 0: the values do not matter for time and memory.

Every measurement runs in a fresh process (``--one``), so that its resident memory is its own:

- **load**: ``modeling.loading.load_model`` with ``model.quant: nf4`` (double quantization, the CPU's compute
  dtype): seconds, the process's peak RSS over the load (``VmHWM``) and the RSS before it, the quantized model's
  bytes (distinct storages of parameters, buffers and quantization state) and the largest shard on disk. The
  target: peak ≤ quantized + largest shard + 1.5 GiB.
- **train**: the model built as ``lora-ft train`` builds it (``session.build_model``, accelerate, AdamW, the
  CPU heap trimming when ``trim_cpu_memory: auto`` turns it on), micro-batch 1 packed row of ``seq`` tokens
  (four examples, loss on every position), gradient checkpointing as ``auto`` decides it on this machine (or
  forced with ``--gc on|off``). A 16-token step creates the AdamW state, the high-water mark is reset
  (``/proc/self/clear_refs``), then ``--steps`` full steps run. Reported: tokens/s and MFU of the last step
  (``training.throughput``: model FLOPs ÷ this machine's matmul peak in the compute dtype, bf16 where
  ``compute_dtype: auto`` picks it, with the same threads), the peak RSS of the steps against the planner's
  training step + its CPU runtime overhead, and the largest tensor with the vocabulary as its last dimension that
  any operator produced during the last step (a ``TorchDispatchMode`` sees every operator output; views are
  skipped): with the chunked loss it is one chunk of positions, never all of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("bench_scale")
GiB = 1024**3

# Published sizes (the models' config.json on the Hub); rope scaling and token ids do not change time or memory.
SHAPES: dict[str, tuple[str, dict]] = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                   max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True)),
    "llama-3.2-3b": ("llama", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                   num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                   max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True)),
    # on paper only (plan): 16 GB of bf16 each
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False)),
    "mistral-7b-v0.3": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                                        max_position_embeddings=32768, rope_theta=1000000.0,
                                        tie_word_embeddings=False)),
}
MEASURED = ["smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b", "llama-3.2-3b"]
PAPER = ["llama-3.1-8b", "qwen2.5-7b", "mistral-7b-v0.3"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


# ------------------------------------------------------------------------------------------------ the models
def write_config(name: str, folder: Path) -> None:
    from transformers import AutoConfig

    model_type, sizes = SHAPES[name]
    folder.mkdir(parents=True, exist_ok=True)
    AutoConfig.for_model(model_type, **sizes).save_pretrained(folder)


def _init_tensor(key: str, shape: tuple[int, ...], generator):
    import torch

    if len(shape) == 1:  # norms start at 1, biases at 0
        return (torch.ones if "norm" in key else torch.zeros)(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def make_model(name: str, folder: Path, shard_bytes: int) -> None:
    """``folder``: config, tokenizer and bf16 shards of at most ``shard_bytes``, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_ft.modeling.loading import resolve_source

    if (folder / "model.safetensors.index.json").is_file():
        log.info("%s: already there", folder)
        return
    write_config(name, folder)
    tokenizer = Path(resolve_source("example:smollm2-135m-instruct"))
    for f in TOKENIZER_FILES:
        shutil.copy(tokenizer / f, folder / f)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    shapes = [(k, tuple(v.shape)) for k, v in meta.state_dict().items() if k not in tied]
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in shapes:
        n = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((key, shape))
        size += n
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: _init_tensor(k, s, g) for k, s in group}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in tensors})
        del tensors
        log.info("%s: %s written", name, file)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


# ------------------------------------------------------------------------------------------------ measurements
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    """Reset the process's RSS high-water mark (VmHWM) to its current RSS (Linux ≥ 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def recipe_for(folder: Path, seq: int, gc: str):
    from lora_ft.recipe import Recipe

    return Recipe.model_validate({
        "model": {"name": str(folder), "quant": "nf4"}, "lora": {"r": 16},
        "data": {"max_length": seq}, "train": {"micro_batch_size": 1, "gradient_checkpointing": gc}})


def measure_load(folder: Path) -> dict:
    """Load time and peak RSS of an NF4 load through ``load_model``, against the quantized size + largest shard."""
    from lora_ft.modeling.loading import load_model
    from lora_ft.training.measure import _held_bytes
    from lora_ft.training.session import make_accelerator

    recipe = recipe_for(folder, 512, "auto")
    _, compute = make_accelerator(recipe)
    rss0 = _status_kib("VmRSS") * 1024
    _reset_peak()
    t0 = time.perf_counter()
    loaded = load_model(recipe.model, compute, "cpu")
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") * 1024
    shards = sorted(folder.glob("*.safetensors"))
    return {"seconds": seconds, "rss_before": rss0, "peak_rss": peak, "rss_after": _status_kib("VmRSS") * 1024,
            "quantized": _held_bytes(loaded.model, None), "largest_shard": max(p.stat().st_size for p in shards),
            "checkpoint": sum(p.stat().st_size for p in shards), "compute": compute}


class _LogitWatch:
    """Largest number of positions of any operator output whose last dimension is the vocabulary."""

    def __init__(self, vocab: int, model):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        watch = self
        self.rows, self.op = 0, None
        # Views are not new tensors: the head's transpose in F.linear (hidden × vocab) is a view of its weight, or,
        # under autocast, of the weight's 16-bit copy made for the matmul (an input of the ``t``, not a parameter).
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = weights | {a.untyped_storage().data_ptr() for a in (*args, *(kwargs or {}).values())
                                    if isinstance(a, torch.Tensor)}
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if (hasattr(t, "shape") and t.dim() >= 2 and t.shape[-1] == vocab
                            and t.untyped_storage().data_ptr() not in inputs and t.numel() // vocab > watch.rows):
                        watch.rows, watch.op = t.numel() // vocab, f"{func} {tuple(t.shape)} {t.dtype}"
                return out

        self.mode = Mode()


def measure_train(folder: Path, seq: int, gc: str, steps: int, memory: float | None, trim: str = "auto",
                  watch_logits: bool = True) -> dict:
    """Tokens/s, MFU and peak RSS of ``steps`` training steps on one packed row of ``seq`` tokens."""
    import torch

    from lora_ft.memory.estimate import estimate
    from lora_ft.memory.launch import device_memory, resolve_auto_checkpointing, resolve_auto_trim
    from lora_ft.memory.shape import model_shape, setting_for
    from lora_ft.modeling.loading import load_tokenizer, resolve_source
    from lora_ft.objectives import objective_for
    from lora_ft.objectives.chunked_loss import chunk_rows
    from lora_ft.training.cpu_memory import release_freed_memory
    from lora_ft.training.measure import synthetic_batch, synthetic_pairs
    from lora_ft.training.session import build_model, make_accelerator
    from lora_ft.training.throughput import count_flop_weights, matmul_peak

    recipe = recipe_for(folder, seq, gc)
    budget = memory or device_memory("cpu")
    recipe = resolve_auto_checkpointing(recipe, 1, "cpu", budget)
    if trim != "auto":
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"trim_cpu_memory": trim == "on"})})
    recipe = resolve_auto_trim(recipe, "cpu", attended=synthetic_pairs(1, seq))
    shape = model_shape(recipe)
    plan = estimate(shape, setting_for(recipe, "cpu"), 1, seq, attended=synthetic_pairs(1, seq))
    accelerator, compute = make_accelerator(recipe)
    source = resolve_source(recipe.model.name)
    tok = load_tokenizer(source, recipe.model)
    objective = objective_for(recipe, tok)
    _, model = build_model(recipe, accelerator, compute, source, tok)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    if recipe.train.trim_cpu_memory:
        release_freed_memory(accelerator.unwrap_model(model))
    packed = objective.use_packing(recipe.data.packing, model)

    def step(batch: dict) -> None:
        accelerator.backward((objective.loss(model, batch) / objective.items(batch).clamp(min=1)).sum())
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(synthetic_batch(objective, 1, 16, 1.0))  # creates the AdamW state
    batch = synthetic_batch(objective, 1, seq, 1.0, packed=packed)
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else seq
    labelled = int((batch["labels"] != -100).sum())
    _reset_peak()
    watch = _LogitWatch(shape.vocab, model)
    times = []
    for k in range(steps):
        t0 = time.perf_counter()
        if k == steps - 1 and watch_logits:
            with watch.mode:
                step(batch)
        else:
            step(batch)
        times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM") * 1024
    dt = times[-1]
    flops = count_flop_weights(accelerator.unwrap_model(model)).step(tokens, labelled)
    return {"seq": seq, "gc": bool(recipe.train.gradient_checkpointing), "trim": bool(recipe.train.trim_cpu_memory),
            "packed": packed, "step_seconds": times, "tokens_per_s": tokens / dt,
            "mfu": flops / dt / matmul_peak("cpu", torch.bfloat16 if compute == "bf16" else torch.float32),
            "compute": compute, "peak_rss": peak,
            "predicted_step": plan.step_peak, "predicted_total": plan.step_peak + plan.overhead,
            "acts_planned": next(r.bytes for r in plan.rows if r.label == "activations"),
            "logit_rows": watch.rows, "logit_op": watch.op, "chunk_rows": chunk_rows(shape.vocab),
            "positions": labelled,
            "full_logits_bytes": 4 * seq * shape.vocab}


def one(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    folder = Path(spec["folder"])
    if spec["what"] == "load":
        return measure_load(folder)
    return measure_train(folder, spec["seq"], spec["gc"], spec["steps"], spec.get("memory"), spec.get("trim", "auto"),
                         spec.get("watch", True))


def run_one(spec: dict, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"spec": spec, "error": f"over {timeout:.0f} s"}
    if proc.returncode:
        return {"spec": spec, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"spec": spec, "wall": time.perf_counter() - t0, **out}


# ------------------------------------------------------------------------------------------------ reports
def machine() -> str:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return (f"{cpu}, {os.cpu_count()} cores, bf16 flags: {', '.join(bf16) or 'none'}, torch {torch.__version__}, "
            f"load average {os.getloadavg()[0]:.2f}")


def fmt_gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def load_row(name: str, r: dict) -> str:
    if "error" in r:
        return f"| {name} | load failed: {r['error']} |"
    bound = r["quantized"] + r["largest_shard"] + 1.5 * GiB
    return (f"| {name} | {fmt_gib(r['checkpoint'])} | {fmt_gib(r['largest_shard'])} | {fmt_gib(r['quantized'])} | "
            f"{r['seconds']:.0f} s | {fmt_gib(r['peak_rss'])} (before {fmt_gib(r['rss_before'])}) | "
            f"{fmt_gib(bound)} | {'yes' if r['peak_rss'] <= bound else 'NO'} |")


def train_row(name: str, r: dict) -> str:
    if "error" in r:
        return f"| {name} | {r['spec']['seq']} | failed: {r['error']} |"
    err = r["predicted_total"] / r["peak_rss"] - 1
    logits = f"{r['logit_rows']} of {r['positions']}"
    return (f"| {name} | {r['seq']} | {'on' if r['gc'] else 'off'} | {r['tokens_per_s']:.1f} | {r['mfu']:.1%} | "
            f"{fmt_gib(r['predicted_total'])} | {fmt_gib(r['peak_rss'])} | {err:+.0%} | {logits} |")


LOAD_HEAD = ("| model | bf16 checkpoint GiB | largest shard | NF4 model GiB | load time | load peak RSS GiB | "
             "target ≤ | met |\n|---|---:|---:|---:|---:|---:|---:|---|")
TRAIN_HEAD = ("| model | tokens | checkpointing (auto) | tokens/s | MFU | planned GiB | peak RSS GiB | error | "
              "vocab-wide rows held (positions) |\n|---|---:|---|---:|---:|---:|---:|---:|---|")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", choices=("make", "run", "ladder", "plan"), default="run")
    ap.add_argument("--models", nargs="+", default=MEASURED)
    ap.add_argument("--model", default="smollm2-135m", help="the ladder's model")
    ap.add_argument("--seqs", nargs="+", type=int, default=None)
    ap.add_argument("--dir", default="/tmp/lfscale")
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--gc", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--memory", default=None, help="the budget checkpointing auto plans against (e.g. 12GiB; "
                    "default: this machine's RAM)")
    ap.add_argument("--trim", default="auto", choices=("auto", "on", "off"), help="train.trim_cpu_memory")
    ap.add_argument("--no-watch", action="store_true", help="do not look for vocabulary-wide tensors")
    ap.add_argument("--no-load", action="store_true", help="skip the load measurement")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", default=None, metavar="FILE", help="append every result as a JSON line")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return 0
    from lora_ft.memory.shape import parse_size

    root = Path(args.dir)
    gc = {"auto": "auto", "on": True, "off": False}[args.gc]
    if args.what == "make":
        for name in args.models:
            make_model(name, root / name, int(args.shard_gb * GiB))
        return 0
    if args.what == "plan":
        return plan_paper(root, args.seqs or [512, 2048])
    print(f"machine: {machine()}; {args.threads} thread(s)", flush=True)
    names = [args.model] if args.what == "ladder" else args.models
    seqs = args.seqs or ([256, 512, 1024, 2048, 4096, 8192] if args.what == "ladder" else [512, 2048])
    results = []
    for name in names:
        folder = root / name
        if not args.no_load:
            r = run_one({"what": "load", "folder": str(folder), "threads": args.threads}, args.timeout)
            results.append((name, r))
            print(LOAD_HEAD + "\n" + load_row(name, r), flush=True)
        for seq in seqs:
            spec = {"what": "train", "folder": str(folder), "threads": args.threads, "seq": seq, "gc": gc,
                    "steps": args.steps, "trim": args.trim, "watch": not args.no_watch,
                    "memory": parse_size(args.memory) if args.memory else None}
            r = run_one(spec, args.timeout)
            results.append((name, r))
            print(TRAIN_HEAD + "\n" + train_row(name, r), flush=True)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            for name, r in results:
                f.write(json.dumps({"model": name, **r}) + "\n")
    return 0


def plan_paper(root: Path, seqs: list[int]) -> int:
    """``lora-ft plan`` for the 7-8B shapes (config only), NF4, on a 24 GB GPU and on this CPU."""
    from lora_ft.memory.report import plan_report
    from lora_ft.memory.shape import GiB as G

    for name in PAPER:
        write_config(name, root / name)
        for seq in seqs:
            for device, memory in (("cuda", 24 * G), ("cpu", None)):
                recipe = recipe_for(root / name, seq, "auto")
                print(f"## {name}, {seq} tokens, {device}\n{plan_report(recipe, device, memory, micro_batch=1)}\n",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
