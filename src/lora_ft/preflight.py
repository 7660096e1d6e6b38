"""``lora-ft validate``: everything about a recipe that can be checked without loading weights, reported at once.

The same checks ``train`` runs, in the same code (so the two never disagree), minus what needs the model: the
schema (already done by ``load_recipe``), settings that cannot act (``Recipe.inert_settings``), where the run
would write (``RunFolder.check_location``), the data files (formats, columns, every cell the objective reads,
the label set), and ``data.max_length`` against the model's position limit when its ``config.json`` is on this
machine. Hub datasets and Hub models are not downloaded: they are reported as not checked, never as missing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .data.cells import Where
from .data.prepare import Origin, check_split
from .data.reading import is_local, local_problem, read_split
from .data.streaming import read_prefix
from .errors import RecipeError
from .modeling.examples import home
from .modeling.loading import load_config, max_length_problem
from .objectives import objective_for
from .recipe import Recipe, looks_local
from .run import RunFolder

log = logging.getLogger(__name__)


def preflight(recipe: Recipe) -> tuple[list[str], list[str]]:
    """(problems, notes): each problem one clause of the error line; notes are warnings and what was not checked."""
    problems, notes = recipe.inert_settings()
    try:
        RunFolder(recipe.output_dir).check_location(recipe)
    except RecipeError as e:
        problems.append(str(e))
    problems += _data(recipe, notes)
    problems += _model(recipe, notes)
    return problems, notes


def _data(recipe: Recipe, notes: list[str]) -> list[str]:
    d, problems = recipe.data, []
    # The recipe's own objective (preference pairs, KTO rows): formats, columns and cells need no tokenizer.
    objective = objective_for(recipe, None)
    if not d.train:
        problems.append("data.train: no training data given")
    splits = {}
    specs = {"train": d.train, "validation": d.validation, "test": d.test}
    for name, spec in specs.items():
        if not spec:
            continue
        if not is_local(spec):
            notes.append(f"data.{name}: '{spec}' is a Hub dataset id, not checked (validate downloads nothing)")
            continue
        problem = local_problem(spec)
        if problem:
            problems.append(f"data.{name}: {problem}")
            continue
        try:
            if name == "train" and d.streaming:  # a bounded prefix: the rest is checked as training reads it
                ds = read_prefix(spec, "data.train")
                objective.check_rows(ds, objective.detect_format(ds.column_names, name), Where("data.train", spec))
                notes.append(f"data.train: data.streaming: checked the first {len(ds)} rows only (training checks "
                             "the rest as it reads them)")
                continue
            ds = read_split(spec, name)
            # Once per file content: a file checked before (by validate, inspect or train) is not checked again.
            check_split(objective, ds, objective.detect_format(ds.column_names, name), Where(f"data.{name}", spec),
                        Origin(spec, f"data.{name}"))
            splits[name] = ds
        except RecipeError as e:
            problems.append(str(e))
    if splits and not problems:
        try:
            objective.fit_labels(splits, None)
        except RecipeError as e:
            problems.append(str(e))
    reference = recipe.forgetting.reference
    if recipe.forgetting.enabled and reference and is_local(reference) and local_problem(reference):
        problems.append(f"forgetting.reference: {local_problem(reference)}")
    return problems


def _model(recipe: Recipe, notes: list[str]) -> list[str]:
    """The model's name, and ``max_length`` against its config when the config is here already."""
    name = recipe.model.name
    if name.startswith("example:"):
        folder = home() / "examples" / name.removeprefix("example:")
        source = str(folder) if (folder / "config.json").is_file() else None
    elif looks_local(name) or Path(name).expanduser().exists():
        path = Path(name).expanduser()
        if not path.exists():
            return [f"model.name: {name} does not exist"]
        if path.is_dir() and not (path / "config.json").is_file():
            return [f"model.name: {name} has no config.json; point it at a model folder or .gguf file"]
        source = str(path) if path.is_dir() else None  # a .gguf file is converted on first use: not read here
    else:
        source = None
    if source is None:
        notes.append(f"model.name: {name}: data.max_length not checked against the model's positions (its config is "
                     "not on this machine yet)")
        return []
    try:
        error, warning = max_length_problem(load_config(source, recipe.model), recipe.data.max_length, name)
    except RecipeError as e:
        return [str(e)]
    if warning:
        notes.append(warning)
    return [error] if error else []
