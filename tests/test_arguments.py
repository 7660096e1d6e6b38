"""Every command-line number has a range and every path is checked the way a user expects: one line, exit 2,
nothing written; an output never lands on an input, on a run's own files or on the current directory."""

import hashlib
import shutil

import pytest
import yaml
from conftest import make_recipe, write_jsonl

from lora_ft.cli import main
from lora_ft.run import RunFolder

# (command and arguments with the bad value; RUN and RECIPE are placeholders) → the message after "error: "
NUMBERS = {
    "train --num-processes 0": ("train RECIPE --num-processes 0", "train: argument --num-processes: must be at least "
                                                                 "1 (got 0)"),
    "train --num-processes two": ("train RECIPE --num-processes two", "train: argument --num-processes: expected a "
                                                                     "whole number at least 1, got 'two'"),
    "sweep --trials -1": ("sweep RECIPE --grid lora.r=2,4 --trials -1",
                          "sweep: argument --trials: must be at least 1 (got -1)"),
    "sweep --trials 0": ("sweep RECIPE --grid lora.r=2,4 --trials 0",
                         "sweep: argument --trials: must be at least 1 (got 0)"),
    "plan --answer-fraction 0": ("plan RECIPE --answer-fraction 0",
                                 "plan: argument --answer-fraction: must be a finite number > 0 and ≤ 1 (got 0)"),
    "plan --answer-fraction 1.5": ("plan RECIPE --answer-fraction 1.5",
                                   "plan: argument --answer-fraction: must be a finite number > 0 and ≤ 1 (got 1.5)"),
    "plan --answer-fraction nan": ("plan RECIPE --answer-fraction nan",
                                   "plan: argument --answer-fraction: must be a finite number > 0 and ≤ 1 (got nan)"),
    "plan --seq-len 1": ("plan RECIPE --seq-len 1", "plan: argument --seq-len: must be at least 2 (got 1)"),
    "plan --micro-batch 0": ("plan RECIPE --micro-batch 0", "plan: argument --micro-batch: must be at least 1 (got 0)"),
    "plan --memory 0GB": ("plan RECIPE --memory 0GB", "plan: argument --memory: expected a positive size such as 5GB "
                                                      "or 500MB, got '0GB'"),
    "plan --memory lots": ("plan RECIPE --memory lots", "plan: argument --memory: expected a positive size such as "
                                                        "5GB or 500MB, got 'lots'"),
    "merge --examples 0": ("merge RUN --examples 0", "merge: argument --examples: must be at least 1 (got 0)"),
    "merge --max-shard-size -5GB": ("merge RUN --max-shard-size=-5GB", "merge: argument --max-shard-size: expected a "
                                                                       "positive size such as 5GB or 500MB, got "
                                                                       "'-5GB'"),
    "predict --batch-size 0": ("predict RUN --data d.jsonl --batch-size 0",
                               "predict: argument --batch-size: must be at least 1 (got 0)"),
    "generate --max-new-tokens 0": ("generate RUN --prompt hi --max-new-tokens 0",
                                    "generate: argument --max-new-tokens: must be at least 1 (got 0)"),
    "generate --temperature -1": ("generate RUN --prompt hi --temperature=-1",
                                  "generate: argument --temperature: must be a finite number ≥ 0 (got -1)"),
    "chat --temperature inf": ("chat RUN --temperature inf",
                               "chat: argument --temperature: must be a finite number ≥ 0 (got inf)"),
    "chat --top-p 0": ("chat RUN --top-p 0", "chat: argument --top-p: must be a finite number > 0 and ≤ 1 (got 0)"),
    "generate --top-p 2": ("generate RUN --prompt hi --top-p 2",
                           "generate: argument --top-p: must be a finite number > 0 and ≤ 1 (got 2)"),
    "empty recipe path": ("validate ''", "validate: argument recipe: is empty; give a path"),
    "empty run folder": ("eval '' --data d.jsonl", "eval: argument run_dir: is empty; give a path"),
    "empty --data": ("eval RUN --data ''", "eval: argument --data: is empty; give a path"),
    "empty merge --out": ("merge RUN --out ''", "merge: argument --out: is empty; give a path"),
    "empty --resume": ("train RECIPE --resume ''", "train: argument --resume: is empty; give a path"),
    "empty --repo": ("push RUN --repo ''", "push: argument --repo: is empty"),
}


@pytest.mark.parametrize("case", list(NUMBERS))
def test_a_bad_number_or_empty_path_is_one_line_with_exit_2(case, tmp_path, capsys, monkeypatch):
    import shlex

    command, message = NUMBERS[case]
    monkeypatch.chdir(tmp_path)
    args = [a.replace("RECIPE", "r.yaml").replace("RUN", "run") for a in shlex.split(command)]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lora-ft: error: {message} (see lora-ft {args[0]} --help)"]
    assert list(tmp_path.iterdir()) == []  # nothing written


def _tree(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


@pytest.fixture
def fake_run(tiny_llama, chat_data, tmp_path):
    """A run folder with a config and an adapter config: enough for the commands to check their paths."""
    recipe = make_recipe(tiny_llama, chat_data, tmp_path / "run")
    folder = RunFolder(recipe.output_dir)
    folder.start(recipe, {"compute_dtype": "fp32"}, fresh=True)
    folder.adapter.mkdir()
    (folder.adapter / "adapter_config.json").write_text("{}")
    return folder.path


def test_output_paths_never_land_on_inputs_or_the_current_directory(fake_run, tiny_llama, chat_data, tmp_path,
                                                                     capsys, monkeypatch):
    """One row per way an output could replace something: the command refuses before loading anything, and
    nothing on disk changes (hashes of the run, the model and the data)."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    rows = {
        "predict --out is the --data file": (
            ["predict", str(fake_run), "--data", str(data), "--out", str(data)],
            f"--out {data} is the --data file itself; write the output to another file"),
        "predict --out is a run file": (
            ["predict", str(fake_run), "--data", str(data), "--out", str(fake_run / "run_config.yaml")],
            f"--out {fake_run / 'run_config.yaml'} lies inside {(fake_run / 'run_config.yaml').resolve()}, which "
            "lora_ft writes itself; choose another file"),
        "predict --out is the current directory": (
            ["predict", str(fake_run), "--data", str(data), "--out", "."],
            "--out . is a folder; give a file name, e.g. predictions.jsonl"),
        "merge --out is the current directory": (
            ["merge", str(fake_run), "--out", "."],
            "--out . is the current directory or one above it; give the merged model a folder of its own, e.g. "
            "--out merged-model"),
        "merge --out is the base model's folder": (
            ["merge", str(fake_run), "--out", str(tiny_llama)],
            f"--out {tiny_llama} exists and is not a merged model folder of this run; choose another --out or "
            "remove it"),
        "merge --out is the run itself": (
            ["merge", str(fake_run), "--out", str(fake_run)],
            f"--out {fake_run} exists and is not a merged model folder of this run; choose another --out or remove "
            "it"),
    }
    watched = [fake_run, tiny_llama, tmp_path / "d.jsonl", work]
    before = {str(p): _tree(p) if p.is_dir() else p.read_bytes() for p in watched}
    for name, (argv, message) in rows.items():
        assert main(argv) == 2, name
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"lora-ft: error: {message}", name
    assert {str(p): _tree(p) if p.is_dir() else p.read_bytes() for p in watched} == before


OUTPUT_DIRS = {
    "empty": lambda w: ("", "output_dir: is empty: name the run's own folder, e.g. runs/my-run (an empty value "
                            "would write into the current directory)"),
    "the current directory": lambda w: (".", "output_dir '.' is the current directory: a run writes adapter/, "
                                             "checkpoints/, metrics.jsonl... there and --overwrite replaces them; give "
                                             "the run a folder of its own, e.g. runs/my-run"),
    "a parent of it": lambda w: ("..", f"output_dir '..' is a parent of the current directory ({w['work']}): a run "
                                       "writes adapter/, checkpoints/, metrics.jsonl... there and --overwrite replaces "
                                       "them; give the run a folder of its own, e.g. runs/my-run"),
    "inside the base model": lambda w: (f"{w['model']}/runs/x", f"output_dir {w['model']}/runs/x is inside the base "
                                                                 f"model's folder {w['model']}: choose a folder of its "
                                                                 "own for the run"),
    "holding the data among its outputs": lambda w: (
        str(w["old"]), f"data.train {w['old']}/checkpoints/train.jsonl lies among the outputs of output_dir "
                       f"{w['old']}, which a run writes and --overwrite replaces: move it, or choose another "
                       "output_dir"),
    "a file": lambda w: (str(w["file"]), f"output_dir {w['file']} is a file; give the run a folder of its own"),
}


@pytest.mark.parametrize("case", list(OUTPUT_DIRS))
def test_an_output_dir_that_would_write_over_something_is_refused(case, tiny_llama, chat_data, tmp_path, capsys,
                                                                  monkeypatch):
    where = {"work": tmp_path / "work", "model": tmp_path / "model", "old": tmp_path / "old-run",
             "file": tmp_path / "a-file"}
    where["work"].mkdir()
    (where["work"] / "notes.txt").write_text("mine")
    shutil.copytree(tiny_llama, where["model"])
    (where["old"] / "checkpoints").mkdir(parents=True)
    train = shutil.copy(chat_data["train"], where["old"] / "checkpoints" / "train.jsonl")
    where["file"].write_text("x")
    output_dir, message = OUTPUT_DIRS[case](where)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": str(where["model"])},
                                      "data": {"train": str(train), "max_length": 64}, "output_dir": output_dir}))
    monkeypatch.chdir(where["work"])
    before = _tree(tmp_path)
    for command in ("validate", "train"):
        assert main([command, str(recipe)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        prefix = f"{recipe}: 1 problem(s): " if command == "validate" or case == "empty" else ""
        assert err == f"lora-ft: error: {prefix}{message}", command
    assert _tree(tmp_path) == before


def test_paths_are_expanded_and_set_values_resolve_like_the_file(chat_data, tmp_path, capsys, monkeypatch):
    """``~`` is expanded in every path, and ``--set data.train=FILE`` resolves against the recipe's folder exactly
    as the same value written in the recipe does (the README says so)."""
    home = tmp_path / "home"
    (home / "recipes" / "data").mkdir(parents=True)
    shutil.copy(chat_data["train"], home / "recipes" / "data" / "t.jsonl")
    (home / "recipes" / "r.yaml").write_text(yaml.safe_dump({"data": {"train": "data/t.jsonl"},
                                                             "model": {"name": "example:smollm2-135m-instruct"}}))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    from lora_ft.recipe import load_recipe

    in_file = load_recipe(str(home / "recipes" / "r.yaml"))
    by_set = load_recipe(str(home / "recipes" / "r.yaml"), ["data.train=data/t.jsonl"])
    assert in_file.data.train == by_set.data.train == str(home / "recipes" / "data" / "t.jsonl")
    assert main(["validate", "~/recipes/r.yaml", "--set", "data.train=data/t.jsonl", "--set",
                 "output_dir=~/runs/x"]) == 0
    assert f"-> {home / 'runs' / 'x'}" in capsys.readouterr().out
