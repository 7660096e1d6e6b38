"""``lora-ft``: thin commands. Parse, load the recipe, call one function. Only this module reads argv/env.

Each command imports the package it runs when it runs: torch, transformers and datasets take seconds to import,
and ``lora-ft validate`` or ``--help`` need none of them. Every ``LoraFtError`` becomes one ``lora-ft: error:``
line and its exit code (``errors.py``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

from . import arguments as arg
from .errors import LoraFtError, RecipeError, TrainingInterrupted, UsageError
from .interrupts import Interrupted, Signals
from .recipe import load_recipe

log = logging.getLogger("lora_ft")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    if not verbose:
        # Library chatter (load reports, bitsandbytes kernel notices) would bury our own messages.
        # absl: rouge-score says "Using default tokenizer" at every score; kernels (a dependency of transformers
        # 5.25): bitsandbytes asks it for a CPU kernel from the Hub at import, and offline it warns.
        for name in ("transformers", "datasets", "accelerate", "peft", "bitsandbytes", "httpx", "filelock", "gguf",
                     "absl", "kernels"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        import datasets  # heavy, as above: only once a command runs
        import transformers

        datasets.disable_progress_bars()
        # datasets logs parse failures at ERROR before raising; we re-raise them as one-line messages.
        datasets.utils.logging.set_verbosity(logging.CRITICAL)
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=arg.path, help="YAML recipe (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.lr=1e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = arg.Parser(prog="lora-ft", description="LoRA / QLoRA fine-tuning from a YAML recipe.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs too")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=arg.Parser)
    p = sub.add_parser("train", help="fine-tune as the recipe says")
    _recipe_args(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, type=arg.resume, metavar="PATH|latest",
                   help="continue from the latest (or the given) checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir (the old one is "
                   "deleted once the new one has saved a checkpoint or its adapter)")
    p.add_argument("--num-processes", type=arg.integer(1), default=1, metavar="N",
                   help="train on N processes, one per GPU (CPU processes without GPUs): the same command "
                        "under `accelerate launch --multi_gpu --num_processes N`")
    p = sub.add_parser("eval", help="judge a trained run (and its merged model or GGUF file) on held-out data")
    p.add_argument("run_dir", type=arg.path)
    p.add_argument("--data", default=None, type=arg.path, help="jsonl/json/csv/parquet file in the run's data format "
                   "(default: the run's validation file, else its test file)")
    p.add_argument("--merged", action="store_true", help="also the merged model (lora-ft merge), side by side")
    p.add_argument("--gguf", nargs="?", const="latest", default=None, type=arg.path, metavar="FILE",
                   help="also a GGUF file exported from the run (default: its latest passing export)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    p = sub.add_parser("validate", help="check a recipe, its files and data without loading weights")
    _recipe_args(p)
    p = sub.add_parser("sweep", help="train a grid of recipe variations and rank them on validation")
    _recipe_args(p)
    p.add_argument("--grid", action="append", required=True, type=arg.text, metavar="KEY=V1,V2",
                   help="values to try for one recipe key, e.g. --grid lora.r=8,16 (repeatable)")
    p.add_argument("--trials", type=arg.integer(1), default=None, help="run only this many random combinations")
    p.add_argument("--overwrite", action="store_true", help="retrain trials whose folders hold a run of another "
                   "recipe (without it the sweep refuses; unchanged finished trials are reused either way)")
    p = sub.add_parser("inspect", help="report on the recipe's data (lengths, labels, duplicates, leakage)")
    _recipe_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = sub.add_parser("plan", help="predict peak training memory from the config alone, and what fits")
    _recipe_args(p)
    p.add_argument("--memory", default=None, type=arg.size, metavar="SIZE",
                   help="the budget, e.g. 24GB (GB = GiB); default: this machine's GPU memory, or its RAM")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="plan for a GPU (bf16, gradient checkpointing by default) or the CPU; default: cuda if present")
    p.add_argument("--answer-fraction", type=arg.number(0, 1, low_open=True), default=1.0, metavar="F",
                   help="causal LM: the fraction of each sequence that carries loss (logits are computed for it "
                        "only); default 1 = the worst case (text data, train_on_prompt)")
    p.add_argument("--seq-len", type=arg.integer(2), default=None, help="sequence length (default: data.max_length)")
    p.add_argument("--micro-batch", type=arg.integer(1), default=None,
                   help="micro-batch for the breakdown (default: the recipe's, or the largest that fits)")
    p = sub.add_parser("compare", help="runs side by side: recipe differences, steps, every metric before/after, "
                       "samples, loss curves")
    p.add_argument("run_dirs", nargs="+", type=arg.path, metavar="RUN_DIR", help="two or more runs' output_dir")
    p.add_argument("--out", default=None, type=arg.path, metavar="DIR", help="where compare.md and curves.png go "
                   "(default ./compare-<RUN_A>-vs-<RUN_B>...)")
    p.add_argument("--samples", type=arg.integer(0), default=3, metavar="N",
                   help="generated samples (samples.jsonl) of the first N prompts to set side by side (default 3)")
    _export_parsers(sub)
    return parser


def _export_parsers(sub) -> None:
    """merge, push, chat, generate, predict: what a finished run is for."""
    p = sub.add_parser("merge", help="merge a run's adapter into a full-precision base and measure fidelity")
    p.add_argument("run_dir", type=arg.path)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="dtype of the merged weights (auto: the run's compute dtype)")
    p.add_argument("--base", default="dequantized", choices=["dequantized", "original"],
                   help="quantized runs: merge into the de-quantized weights the adapter was trained against "
                        "(default) or into the original weights")
    p.add_argument("--out", default=None, type=arg.path, metavar="DIR",
                   help="where to write the merged model (RUN_DIR/merged)")
    p.add_argument("--force", action="store_true", help="save the merged model even above the fidelity limit")
    p.add_argument("--examples", type=arg.integer(1), default=64, metavar="N", help="held-out examples to compare on")
    p.add_argument("--data", default=None, type=arg.path, metavar="FILE", help="compare on this file instead of the "
                   "run's validation data")
    p.add_argument("--max-shard-size", default="5GB", type=arg.size, help="safetensors shard size (default 5GB)")
    _gguf_parser(sub)
    p = sub.add_parser("push", help="upload a run's adapter (or merged model) with a model card to the Hub")
    p.add_argument("run_dir", type=arg.path)
    p.add_argument("--repo", required=True, type=arg.text, metavar="USER/NAME",
                   help="Hub repository to create or update")
    p.add_argument("--merged", action="store_true", help="push the merged model instead of the adapter: "
                   "RUN_DIR/merged, else the latest passing 'merge --out DIR' in merge_report.json")
    p.add_argument("--merged-dir", default=None, type=arg.path, metavar="DIR", help="push the merged model in DIR (a "
                   "folder written by 'lora-ft merge RUN_DIR --out DIR' for this run; implies --merged)")
    p.add_argument("--gguf", nargs="?", const="latest", default=None, type=arg.path, metavar="FILE",
                   help="push a GGUF export and its Modelfile instead: the latest passing one, or FILE")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--dry-run", action="store_true", help="write RUN_DIR/hub (what would be uploaded) only")
    p.add_argument("--base-model", default=None, type=arg.text, metavar="ID", help="the base's Hub id, when the "
                   "recipe named a local folder")
    for name, help_ in (("chat", "chat with a causal LM run (streaming, chat template)"),
                        ("generate", "generate replies to prompts with a causal LM run"),
                        ("predict", "classify a data file with a classifier run (embed; reward models: score)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("run_dir", type=arg.path, help="a run's output_dir, or a merged model folder")
        p.add_argument("--merged", action="store_true", help="use the merged model instead of the adapter: "
                       "RUN_DIR/merged, else the latest passing 'merge --out DIR'")
        if name == "predict":
            p.add_argument("--data", required=True, type=arg.path,
                           help="jsonl/json/csv/parquet file with the text column(s)")
            p.add_argument("--out", default=None, type=arg.path, metavar="FILE", help="predictions jsonl "
                           "(default RUN_DIR/predictions.jsonl)")
            p.add_argument("--batch-size", type=arg.integer(1), default=32)
            continue
        if name == "generate":
            p.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
            p.add_argument("--raw", action="store_true", help="continue the prompt as plain text, no chat template")
        p.add_argument("--system", default=None, help="system prompt")
        p.add_argument("--max-new-tokens", type=arg.integer(1), default=256)
        p.add_argument("--temperature", type=arg.number(0), default=0.0, help="0 = greedy (default)")
        p.add_argument("--top-p", type=arg.number(0, 1, low_open=True), default=1.0)


def _gguf_parser(sub) -> None:
    """``lora-ft export``: the run's merged model as one GGUF file (``shipping/export.py``)."""
    p = sub.add_parser("export", help="write the merged model as one GGUF file (llama.cpp, Ollama), proven faithful")
    p.add_argument("run_dir", type=arg.path)
    p.add_argument("--format", default="gguf", choices=["gguf"], help="file format (gguf)")
    p.add_argument("--quant", default="q8_0", help="f32, f16, bf16, q8_0 (default), q5_1, q5_0, q4_1 or q4_0")
    p.add_argument("--out", default=None, type=arg.path, metavar="FILE", help="the .gguf file "
                   "(RUN_DIR/gguf/<run>-<QUANT>.gguf); an Ollama Modelfile is written beside it")
    p.add_argument("--force", action="store_true", help="keep the file even above the fidelity limit")
    p.add_argument("--examples", type=arg.integer(1), default=64, metavar="N", help="held-out examples to compare on")
    p.add_argument("--data", default=None, type=arg.path, metavar="FILE", help="compare on this file instead of the "
                   "run's validation data")


# ------------------------------------------------------------------------------------------------ commands
# Each command: (parsed args, raw argv) -> exit status. They import what they run when they run (see above).
def _cmd_validate(args, argv) -> int:
    from .preflight import preflight

    recipe = load_recipe(args.recipe, args.overrides)
    problems, notes = preflight(recipe)
    for note in notes:
        log.warning(note)
    if problems:
        raise RecipeError(f"{args.recipe}: {len(problems)} problem(s): " + "; ".join(problems))
    print(f"ok: {args.recipe} ({recipe.model.task}, {recipe.model.name}, quant={recipe.model.quant}, "
          f"LoRA r={recipe.lora.r}) -> {recipe.output_dir}")
    return 0


def _cmd_sweep(args, argv) -> int:
    from .training.sweep import run_sweep

    rows = run_sweep(args.recipe, args.grid, args.overrides, args.trials, overwrite=args.overwrite)
    for n, row in enumerate(rows, 1):
        print(f"{n}. " + ", ".join(f"{k}={v}" for k, v in row.items() if k != "output_dir"))
    if rows and rows[0]["status"] == "ok":
        print(f"best: {rows[0]['output_dir']}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def _cmd_inspect(args, argv) -> int:
    from .inspection import format_report, inspect_recipe

    report = inspect_recipe(load_recipe(args.recipe, args.overrides))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _cmd_plan(args, argv) -> int:
    print(_plan(load_recipe(args.recipe, args.overrides), args))
    return 0


def _cmd_train(args, argv) -> int:
    recipe = load_recipe(args.recipe, args.overrides)  # fails here, once, before N processes start
    if args.num_processes > 1:
        return _launch(sys.argv[1:] if argv is None else argv, args.num_processes)
    from accelerate import PartialState

    from .training.trainer import train

    results = train(recipe, resume=args.resume, overwrite=args.overwrite)
    if PartialState().is_main_process:  # under `accelerate launch` every process gets here
        print(json.dumps(results, indent=2))
        print(f"adapter and reports written to {recipe.output_dir}")
    return 0


def _cmd_eval(args, argv) -> int:
    from .shipping.judge import judge_run, judge_table

    results = judge_run(args.run_dir, args.data, args.merged, args.gguf)
    print(json.dumps(results, indent=2) if args.json else judge_table(results))
    return 0


def _cmd_compare(args, argv) -> int:
    from .shipping.compare import compare_runs, default_out

    out = Path(args.out) if args.out else default_out([Path(p) for p in args.run_dirs])
    comparison = compare_runs([Path(p) for p in args.run_dirs], out, args.samples)
    print(comparison.text(), end="")
    print(f"report written to {comparison.report} (figure: {comparison.figure})")
    return 0


def _cmd_merge(args, argv) -> int:
    from .shipping.merge import merge_run

    entry = merge_run(args.run_dir, args.dtype, args.base, args.out, args.force, args.examples, args.data,
                      args.max_shard_size)
    print(json.dumps(entry, indent=2))
    print(f"merged model written to {entry['out']}")
    return 0


def _cmd_export(args, argv) -> int:
    from .shipping.export import export_run

    entry = export_run(args.run_dir, args.quant, args.out, args.force, args.examples, args.data)
    print(json.dumps(entry, indent=2))
    print(f"GGUF written to {entry['out']}")
    return 0


def _cmd_push(args, argv) -> int:
    from .shipping.hub import push

    result = push(args.run_dir, args.repo, args.merged, args.private, args.dry_run, args.base_model, args.merged_dir,
                  args.gguf)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_infer(args, argv) -> int:
    """chat, generate and predict: the run's model loaded once, then used."""
    from .shipping import infer

    if args.command == "predict":
        from .run import OUTPUTS

        run = Path(args.run_dir)
        out = Path(args.out or run / "predictions.jsonl")
        arg.check_output_file(out, "--out", {"--data": Path(args.data)}, [run / name for name in OUTPUTS])
    im = infer.load_for_inference(args.run_dir, args.merged)
    if args.command == "predict":
        print(json.dumps(infer.predict_file(im, args.data, out, args.batch_size), indent=2))
        return 0
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.command == "generate":
        for reply in infer.generate(im, args.prompt, args.system, raw=args.raw, **gen):
            print(reply)
        return 0
    infer.chat(im, sys.stdin, sys.stdout, args.system, interactive=sys.stdin.isatty(), **gen)
    return 0


COMMANDS = {"validate": _cmd_validate, "sweep": _cmd_sweep, "inspect": _cmd_inspect, "plan": _cmd_plan,
            "train": _cmd_train, "eval": _cmd_eval, "merge": _cmd_merge, "push": _cmd_push, "chat": _cmd_infer,
            "generate": _cmd_infer, "predict": _cmd_infer, "export": _cmd_export, "compare": _cmd_compare}


def _plan(recipe, args) -> str:
    """``lora-ft plan``: the flags checked, then the planner's report."""
    import torch  # heavy: only the commands that load models need it

    from .memory.report import plan_report
    from .memory.shape import parse_size

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    memory = parse_size(args.memory) if args.memory is not None else None
    return plan_report(recipe, device, memory, args.answer_fraction, args.seq_len, args.micro_batch)


def _dtype_for_processes() -> dict[str, str]:
    """On a CPU, ``compute_dtype: auto`` measured once here for every process to use (``INHERITED_CHOICE``)."""
    import torch  # heavy: only the commands that train need it

    from .modeling.precision import INHERITED_CHOICE, resolve_compute_dtype
    from .recipe import ModelConfig

    if torch.cuda.is_available():
        return {}
    choice = resolve_compute_dtype(ModelConfig(compute_dtype="auto"), cuda=False)
    return {INHERITED_CHOICE: f"{choice.dtype}:{choice.reason}"}


def _launch(argv: list[str], n: int) -> int:
    """``train ... --num-processes N``: run the same argv under ``accelerate launch`` as N processes.

    The argv goes through as a list (no shell), with ``--num-processes 1`` appended: argparse keeps the last
    value, so the launched processes train instead of launching again.
    """
    with socket.socket() as s:  # a free port, so that two runs on one machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "lora_ft", *argv, "--num-processes", "1"]
    log.info("launching %d processes: %s", n, " ".join(cmd))
    proc = subprocess.Popen(cmd, env={**os.environ, **_dtype_for_processes()})
    # SIGTERM (a job scheduler) goes on to the launcher, which passes it to the processes; Ctrl-C reaches them
    # from the terminal directly. Either way the processes save a checkpoint first, so wait for them: they
    # print what was kept and how to continue, and their exit status is this command's.
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: proc.terminate()),
                signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


KEPT_ON_SIGNAL = {
    "merge": "nothing of this merge was saved (an earlier merged model and merge_report.json are as they were)",
    "push": "nothing was uploaded (an upload commits all its files or none) and RUN_DIR/hub is as it was",
    "predict": "no predictions file was written (an earlier one is as it was)",
    "sweep": "every trial finished before is kept (re-running the sweep reuses it)",
    "compare": "compare.md and curves.png are each either as they were or complete (never half-written)",
}
"""What a signal leaves behind in each command that writes (the others write nothing); the trainer and the sweep
say it themselves for the signals they handle."""


def _command_line(args) -> str:
    """The command as typed, for 'continue with': recipe, --set values, and a sweep's grid."""
    words = ["lora-ft", args.command, args.recipe, *(x for o in args.overrides for x in ("--set", o))]
    if args.command == "sweep":
        words += [x for g in args.grid for x in ("--grid", g)] + (["--trials", str(args.trials)] if args.trials else [])
    return shlex.join(words)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Ctrl-C / SIGTERM anywhere in a command: one line saying what was kept (interrupts.py), never a traceback.
    with Signals() as signals:
        try:
            with signals.phase(f"lora-ft {args.command}"):
                return _run(args, argv)
        except Interrupted as e:
            kept = KEPT_ON_SIGNAL.get(args.command, "nothing was written").replace("RUN_DIR", getattr(args, "run_dir",
                                                                                                       "RUN_DIR"))
            print(f"lora-ft: interrupted ({e.name}) during {e.phase}; {kept}; run the command again to start over",
                  file=sys.stderr)
            return 128 + e.signum


def _run(args, argv: list[str] | None) -> int:
    _setup_logging(args.verbose)
    from .modeling import examples

    examples.set_home(os.environ.get("LORA_FT_HOME"))
    try:
        return COMMANDS[args.command](args, argv)
    except TrainingInterrupted as e:
        message = str(e)
        if getattr(args, "recipe", None):
            message = message.replace(f"lora-ft {args.command} RECIPE", _command_line(args))
        print(f"lora-ft: {message}", file=sys.stderr)
        return e.exit_code
    except LoraFtError as e:
        if args.verbose and not isinstance(e, RecipeError | UsageError):
            raise
        print(f"lora-ft: {e.prefix}{e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # writes outside storage.py's guarded saves: run_config.yaml, metrics.jsonl, reports
        if args.verbose:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"lora-ft: error: {e.strerror or e}{where} (check the path and its permissions; when the disk is full, "
              "free space or set another output_dir)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
