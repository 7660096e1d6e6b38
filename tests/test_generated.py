"""training/generated.py: the generation evaluation inside a run — metrics before and after, the samples the model
really generated, selection by a generated metric, the trackers' tables, refusals before any training."""

import json
import shutil
import sqlite3

import pytest
import torch
from conftest import make_recipe, metrics_rows
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_ft.cli import main
from lora_ft.errors import RecipeError
from lora_ft.shipping.infer import generate_reply, load_for_inference
from lora_ft.training.trainer import train

GENERATED = {"rougeL", "chrf", "exact_match", "stop_rate", "length_ratio", "answer_tokens"}


@pytest.fixture(scope="module")
def gen_run(tiny_llama, chat_data, tmp_path_factory, trackio_dir):
    """40 steps on the animal-sounds chat data with the default generation evaluation, logged to TensorBoard,
    MLflow (a SQLite database), Trackio and W&B (offline)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("sqlalchemy")  # MLflow's database stores (mlflow-skinny leaves it out)
    root = tmp_path_factory.mktemp("generated")
    splits = {k: v for k, v in chat_data.items() if k != "test"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(root)  # a database store keeps artifacts in ./mlruns (MLflow's default artifact root)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        recipe = make_recipe(tiny_llama, splits, root / "gen", eval={"generate": "auto"},
                             train={"max_steps": 40, "eval_every": 20, "checkpoint_every": 20,
                                    "trackers": ["tensorboard", "mlflow", "trackio", "wandb"]})
        train(recipe)
    return root


def test_a_minimal_recipe_reports_generated_metrics_before_and_after_training(gen_run):
    results = json.loads((gen_run / "gen" / "eval_results.json").read_text())
    before, after = results["before"]["validation"], results["after"]["validation"]
    assert GENERATED <= set(before) and GENERATED <= set(after)
    # An untrained random model rambles until max_new_tokens; the trained one answers like the references.
    assert before["stop_rate"] < 0.2 and after["stop_rate"] >= 0.9
    assert before["rougeL"] < 0.2 and after["rougeL"] > 0.8 and after["exact_match"] > 0.5
    assert before["length_ratio"] > 2 and 0.8 < after["length_ratio"] < 1.25
    info = json.loads((gen_run / "gen" / "run_info.json").read_text())["generation"]
    assert info["examples"] == 24 and info["metrics"] == ["rougeL", "chrf", "exact_match", *sorted(GENERATED - {
        "rougeL", "chrf", "exact_match"}, key=["stop_rate", "length_ratio", "answer_tokens"].index)]
    step0 = [r for r in metrics_rows(gen_run / "gen") if r.get("split") == "validation" and r["step"] == 0]
    assert len(step0) == 1 and step0[0]["rougeL"] == before["rougeL"]


def _by_generate(model, tok, prompt_messages, max_new_tokens):
    """The model's greedy answer through transformers' own ``generate`` (lora-ft generate's path), one prompt."""
    class Im:  # what generate_reply reads of an InferenceModel
        causal = True

    im = Im()
    im.model, im.tokenizer = model, tok
    return generate_reply(im, prompt_messages, max_new_tokens=max_new_tokens)


def test_the_samples_are_what_the_models_generate_before_and_after(gen_run, tiny_llama, chat_data):
    rows = [json.loads(x) for x in (gen_run / "gen" / "samples.jsonl").read_text().splitlines()]
    data = [json.loads(x) for x in chat_data["validation"].read_text().splitlines()]
    assert len(rows) == 24
    max_new = json.loads((gen_run / "gen" / "run_info.json").read_text())["generation"]["max_new_tokens"]
    trained = load_for_inference(gen_run / "gen", device="cpu")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    base_tok = AutoTokenizer.from_pretrained(gen_run / "gen" / "adapter")
    for row, example in list(zip(rows, data, strict=True))[:6]:
        prompt = example["messages"][:-1]
        assert row["prompt"] == f"user: {prompt[0]['content']}"
        assert row["reference"] == example["messages"][-1]["content"]
        assert row["after"] == _by_generate(trained.model, trained.tokenizer, prompt, max_new)
        assert row["before"] == _by_generate(base, base_tok, prompt, max_new)  # B = 0: the untrained adapter
    md = (gen_run / "gen" / "samples.md").read_text()
    assert md.count("\n| ") >= 24 + 6 and rows[0]["reference"] in md


def test_the_trackers_show_the_samples_table(gen_run, trackio_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    md = (gen_run / "gen" / "samples.md").read_text()
    texts = []
    for events in (gen_run / "gen").rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            if tag.startswith("samples"):
                texts += [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)]
    assert texts == [md]
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{gen_run / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lora_ft").experiment_id])
    assert mlflow.artifacts.load_text(f"{run.info.artifact_uri}/samples.md") == md
    assert len(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/samples.jsonl").splitlines()) == 24
    (db,) = trackio_dir.rglob("lora_ft.db")
    with sqlite3.connect(db) as con:
        logged = [json.loads(m) for (m,) in con.execute("select metrics from metrics")]
    tables = [m["samples"] for m in logged if "samples" in m]
    assert len(tables) == 1 and "The cow says moo." in json.dumps(tables[0])
    rows = [json.loads(x) for x in (gen_run / "gen" / "samples.jsonl").read_text().splitlines()]
    (table,) = (gen_run / "gen" / "wandb").rglob("media/table/samples_*.table.json")
    wandb_table = json.loads(table.read_text())
    assert wandb_table["columns"] == ["prompt", "reference", "before", "after"]
    assert wandb_table["data"] == [[r["prompt"], r["reference"], r["before"], r["after"]] for r in rows]


def test_a_resumed_run_keeps_the_answers_from_before_training(gen_run, tiny_llama, chat_data, tmp_path):
    part = tmp_path / "part"
    shutil.copytree(gen_run / "gen" / "checkpoints" / "step-00000020", part / "checkpoints" / "step-00000020")
    splits = {k: v for k, v in chat_data.items() if k != "test"}
    recipe = make_recipe(tiny_llama, splits, part, eval={"generate": "auto"},
                         train={"max_steps": 40, "eval_every": 20, "checkpoint_every": 20})
    train(recipe, resume="latest")
    full = [json.loads(x) for x in (gen_run / "gen" / "samples.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (part / "samples.jsonl").read_text().splitlines()]
    assert [r["before"] for r in resumed] == [r["before"] for r in full]
    assert [r["after"] for r in resumed] == [r["after"] for r in full]


def test_selection_by_a_generated_metric_keeps_the_adapter_that_generated_best(tiny_llama, chat_data, tmp_path):
    splits = {k: v for k, v in chat_data.items() if k != "test"}
    recipe = make_recipe(tiny_llama, splits, tmp_path / "sel", eval={
        "generate": "auto", "every_eval": True, "select_by": "chrf", "examples": 8, "metrics": ["chrf"]},
        train={"max_steps": 24, "eval_every": 6, "early_stopping_patience": None})
    results = train(recipe)
    evals = [r for r in metrics_rows(tmp_path / "sel") if r.get("split") == "validation" and not r.get("final")]
    assert [r["step"] for r in evals] == [0, 6, 12, 18, 24] and all("chrf" in r for r in evals)
    best = max(evals[1:], key=lambda r: (r["chrf"], -r["loss"]))
    info = json.loads((tmp_path / "sel" / "run_info.json").read_text())
    assert info["best_step"] == best["step"]
    assert results["after"]["validation"]["chrf"] == pytest.approx(best["chrf"])


def test_generation_off_writes_no_samples_and_no_generated_metrics(tiny_llama, chat_data, tmp_path):
    recipe = make_recipe(tiny_llama, chat_data, tmp_path / "off", train={"max_steps": 2})  # conftest: generate off
    results = train(recipe)
    assert not GENERATED & set(results["after"]["validation"])
    assert not (tmp_path / "off" / "samples.jsonl").exists() and not (tmp_path / "off" / "samples.md").exists()


def test_a_misspelled_metric_or_selection_is_refused_before_any_training(tiny_llama, chat_data, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {tiny_llama}}}\ndata: {{train: {chat_data['train']}, validation: "
                      f"{chat_data['validation']}}}\neval: {{metrics: [rougel, bleu]}}\noutput_dir: {tmp_path / 'o'}\n")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.metrics: " in err[0] and "rougeL" in err[0]  # did you mean
    assert not (tmp_path / "o").exists()  # refused before the folder was written
    typo = make_recipe(tiny_llama, chat_data, tmp_path / "t", eval={"generate": "auto", "select_by": "rogueL"},
                       train={"max_steps": 2})
    with pytest.raises(RecipeError, match=r"eval.select_by rogueL: the validation reports \[.*'rougeL'"):
        train(typo)
    assert not (tmp_path / "t" / "checkpoints").exists() and not (tmp_path / "t" / "adapter").exists()
