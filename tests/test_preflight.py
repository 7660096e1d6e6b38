"""`lora-ft validate`: no false errors (Hub ids are not files), the checks it can run without weights (guards that
cannot act, data, position limits), each also refused by `train` before anything is written."""

import json

import pytest
import yaml
from conftest import write_jsonl

from lora_ft.cli import main

NO_VALIDATION = "the recipe has no validation data: set data.validation or data.validation_split, or unset it"
# (recipe changes, validate's problems or None, warnings in the log) — a table of the settings that cannot act
GUARDS = {
    "early stopping without validation": (
        {"train": {"early_stopping_patience": 2}},
        f"train.early_stopping_patience watches the validation score, and {NO_VALIDATION}", []),
    "forgetting budget without validation": (
        {"forgetting": {"enabled": True, "max_kl": 0.1}},
        f"forgetting.max_kl is checked at each validation, and {NO_VALIDATION}", []),
    "forgetting perplexity budget without validation": (
        {"forgetting": {"enabled": True, "max_ppl_increase": 0.1, "action": "rollback"}},
        f"forgetting.max_ppl_increase is checked at each validation, and {NO_VALIDATION}", []),
    "eval_every without validation": (
        {"train": {"eval_every": 5}}, None,
        ["train.eval_every has nothing to evaluate: the recipe has no validation data"]),
    "rollback without a budget": (
        {"forgetting": {"enabled": True, "action": "rollback"}, "data": {"validation_split": 0.2}}, None,
        ["forgetting.action rollback acts when forgetting.max_kl or max_ppl_increase is exceeded, and neither is "
         "set"]),
    "a budget of a guard switched off": (
        {"forgetting": {"max_kl": 0.1}, "data": {"validation_split": 0.2}}, None,
        ["forgetting.max_kl is set but forgetting.enabled is false: nothing checks it"]),
    "early stopping with a carved validation split": (
        {"train": {"early_stopping_patience": 2}, "data": {"validation_split": 0.2}}, None, []),
}


def _recipe(tmp_path, tree: dict):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    return recipe


def _base(tiny_llama, chat_data, tmp_path) -> dict:
    return {"model": {"name": str(tiny_llama)}, "data": {"train": str(chat_data["train"]), "max_length": 64},
            "train": {"max_steps": 1}, "output_dir": str(tmp_path / "run")}


@pytest.mark.parametrize("case", list(GUARDS))
def test_a_guard_that_cannot_act_is_refused_or_warned_about(case, tiny_llama, chat_data, tmp_path, capsys, caplog):
    """Refused where the recipe asks for an action that could never happen (the run would silently do something
    else than asked); a warning where a setting is merely inert."""
    changes, problem, warnings = GUARDS[case]
    tree = _base(tiny_llama, chat_data, tmp_path)
    for section, values in changes.items():
        tree[section] = {**tree.get(section, {}), **values}
    recipe = _recipe(tmp_path, tree)
    code = main(["validate", str(recipe)])
    err = capsys.readouterr().err.strip().splitlines()
    if problem is None:
        # Exactly the expected warnings, each once; none where the setting can act.
        warned = [line.split(": ", 1)[1] for line in err if " WARNING lora_ft" in line]
        assert code == 0 and len(warned) == len(warnings), err
        assert all(any(w in line for line in warned) for w in warnings), err
        return
    assert code == 2 and err[-1] == f"lora-ft: error: {recipe}: 1 problem(s): {problem}"
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"lora-ft: error: 1 problem(s): {problem}"
    assert not (tmp_path / "run").exists()


def test_hub_dataset_ids_are_not_reported_as_missing_files(tiny_llama, chat_data, tmp_path, capsys):
    """``teknium/OpenHermes-2.5`` has a dot, ``tatsu-lab/alpaca`` none: both are Hub ids, not missing files;
    ``data/x.txt`` and ``./nope.jsonl`` are files (one of a kind lora_ft does not read, one missing)."""
    tree = _base(tiny_llama, chat_data, tmp_path)
    tree["data"].update(validation="teknium/OpenHermes-2.5", test="tatsu-lab/alpaca")
    assert main(["validate", str(_recipe(tmp_path, tree))]) == 0
    err = capsys.readouterr().err
    assert "data.validation: 'teknium/OpenHermes-2.5' is a Hub dataset id, not checked" in err
    tree["data"].update(validation="data/x.txt", test="./nope.jsonl")
    recipe = _recipe(tmp_path, tree)
    assert main(["validate", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lora-ft: error: {recipe}: 2 problem(s): data.validation: file not found: {tmp_path}/data/x.txt; "
        f"data.test: file not found: {tmp_path}/nope.jsonl")


def _config_only(tmp_path, name: str, config) -> str:
    """A model folder holding only its config.json: the position limit is checked before any weight is read."""
    folder = tmp_path / name
    config.save_pretrained(folder)
    return str(folder)


def _limits(tmp_path):
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

    return {
        "BERT (learned positions)": (
            _config_only(tmp_path, "bert", BertConfig(max_position_embeddings=128)), "sequence_classification",
            "data.max_length 512 exceeds the 128 positions of {m} (learned position embeddings cannot go further): "
            "set data.max_length to at most 128"),
        "GPT-2 (n_positions)": (
            _config_only(tmp_path, "gpt2", GPT2Config(n_positions=256, n_layer=1)), "causal_lm",
            "data.max_length 512 exceeds the 256 positions of {m} (learned position embeddings cannot go further): "
            "set data.max_length to at most 256"),
        "RoBERTa (positions after the padding index)": (
            _config_only(tmp_path, "roberta", RobertaConfig(max_position_embeddings=514, pad_token_id=1)),
            "sequence_classification",
            "data.max_length 600 exceeds the 512 positions of {m} (learned position embeddings cannot go further): "
            "set data.max_length to at most 512"),
        "Llama (rotary positions: a warning)": (
            _config_only(tmp_path, "llama", LlamaConfig(max_position_embeddings=256, num_hidden_layers=1)),
            "causal_lm", None),
    }


@pytest.mark.parametrize("case", ["BERT (learned positions)", "GPT-2 (n_positions)",
                                  "RoBERTa (positions after the padding index)", "Llama (rotary positions: a warning)"])
def test_max_length_beyond_the_models_positions_fails_before_loading(case, tmp_path, capsys):
    model, task, message = _limits(tmp_path)[case]
    max_length = 600 if "RoBERTa" in case else 512
    rows = [{"text": "a b", "label": "x"}, {"text": "c d", "label": "y"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows if task != "causal_lm" else [{"text": "hello"}])
    recipe = _recipe(tmp_path, {"model": {"name": model, "task": task}, "output_dir": str(tmp_path / "run"),
                                "data": {"train": str(data), "max_length": max_length}})
    code = main(["validate", str(recipe)])
    err = capsys.readouterr().err.strip().splitlines()
    if message is None:  # runs past the context, so only a warning; validate passes
        assert code == 0 and any("exceeds the 256-token context" in line for line in err), err
        return
    message = message.format(m=model)
    assert code == 2 and err[-1] == f"lora-ft: error: {recipe}: 1 problem(s): {message}"
    # train says the same before touching the weights (the folder has none: loading them would fail otherwise)
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"lora-ft: error: {message}"
    assert not (tmp_path / "run").exists()


def test_validate_reads_the_data_as_train_will(tiny_bert, tmp_path, capsys):
    """Columns and cells are checked (not only that the files exist), and every problem is reported at once."""
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": None}])
    val = write_jsonl(tmp_path / "v.jsonl", [{"txt": "a", "label": "x"}])
    recipe = _recipe(tmp_path, {"model": {"name": str(tiny_bert), "task": "sequence_classification"},
                                "data": {"train": str(train), "validation": str(val), "max_length": 64},
                                "output_dir": str(tmp_path / "run")})
    assert main(["validate", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lora-ft: error: {recipe}: 2 problem(s): data.train: {train} row 2, column 'label' is empty; every example "
        "needs a label; data.validation: column(s) ['text'] not found; columns present: ['txt', 'label'] (set "
        "data.text_column: txt)")
    assert json.loads(json.dumps(str(recipe)))
