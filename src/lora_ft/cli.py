"""``lora-ft``: thin commands. Parse, load the recipe, call one function. Only this module reads argv/env."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from .config import RecipeError, load_recipe

log = logging.getLogger("lora_ft")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        # Library chatter (load reports, bitsandbytes kernel notices) would bury our own messages.
        for name in ("transformers", "datasets", "accelerate", "peft", "bitsandbytes", "httpx", "filelock"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.lr=1e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-ft", description="LoRA / QLoRA fine-tuning from a YAML recipe.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs too")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune as the recipe says")
    _recipe_args(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH|latest",
                   help="continue from the latest (or the given) checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    p = sub.add_parser("eval", help="evaluate a trained run on a data file")
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="jsonl/json/csv/parquet file in the run's data format")
    p = sub.add_parser("validate", help="check a recipe (and that its files exist) without loading weights")
    _recipe_args(p)
    return parser


def _validate(recipe) -> list[str]:
    """Checks beyond the schema that need no weights: files the recipe names exist."""
    problems = []
    for key in ("train", "validation", "test"):
        value = getattr(recipe.data, key)
        if value and Path(value).suffix and not Path(value).is_file():
            problems.append(f"data.{key}: file not found: {value}")
    name = recipe.model.name
    if (name.endswith(".gguf") or name.startswith((".", "/", "~"))) and not Path(name).expanduser().exists():
        problems.append(f"model.name: {name} does not exist")
    if not recipe.data.train:
        problems.append("data.train: no training data given")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from . import examples

    examples.set_home(os.environ.get("LORA_FT_HOME"))
    try:
        if args.command == "validate":
            recipe = load_recipe(args.recipe, args.overrides)
            problems = _validate(recipe)
            if problems:
                raise RecipeError(f"{args.recipe}: {len(problems)} problem(s): " + "; ".join(problems))
            print(f"ok: {args.recipe} ({recipe.model.task}, {recipe.model.name}, quant={recipe.model.quant}, "
                  f"LoRA r={recipe.lora.r}) -> {recipe.output_dir}")
            return 0
        if args.command == "train":
            from .train import train

            recipe = load_recipe(args.recipe, args.overrides)
            results = train(recipe, resume=args.resume, overwrite=args.overwrite)
            print(json.dumps(results, indent=2))
            print(f"adapter and reports written to {recipe.output_dir}")
            return 0
        if args.command == "eval":
            from .train import evaluate_run

            print(json.dumps(evaluate_run(args.run_dir, args.data), indent=2))
            return 0
    except RecipeError as e:
        print(f"lora-ft: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, FloatingPointError) as e:
        if args.verbose:
            raise
        print(f"lora-ft: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
