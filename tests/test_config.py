"""Recipe schema: defaults, strict keys with did-you-mean, all errors at once, overrides, paths."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_ft.config import Recipe, RecipeError, load_recipe, parse_overrides


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_make_a_valid_recipe(tmp_path):
    r = load_recipe(write(tmp_path, "data: {train: x.jsonl}\n"))
    assert r.model.quant == "none" and r.lora.target_modules == "auto" and r.train.schedule == "cosine"
    assert r.model.trust_remote_code is False


def test_good_recipe_and_overrides(tmp_path):
    p = write(tmp_path, "model: {quant: nf4}\nlora: {r: 4}\ntrain: {lr: 0.001}\n")
    r = load_recipe(p, ["train.lr=1e-4", "lora.r=8", "lora.target_modules=[q_proj, v_proj]"])
    assert r.model.quant == "nf4" and r.lora.r == 8 and r.train.lr == pytest.approx(1e-4)
    assert r.lora.target_modules == ["q_proj", "v_proj"]


def test_typo_gets_did_you_mean(tmp_path):
    with pytest.raises(RecipeError, match=r"lora\.rank: unknown key \(did you mean 'r'\?\)"):
        load_recipe(write(tmp_path, "lora: {rank: 8}\n"))
    with pytest.raises(RecipeError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        load_recipe(write(tmp_path, "trian: {lr: 1}\n"))


def test_every_error_is_reported_at_once_on_one_line(tmp_path):
    p = write(tmp_path, "model: {quant: nf5}\nlora: {r: 0, dropout: 1.5}\ntrain: {lr: -1, epoch: 2}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "5 problem(s)" in msg and "\n" not in msg
    for needle in ("model.quant", "lora.r", "lora.dropout", "train.lr", "train.epoch: unknown key"):
        assert needle in msg


def test_wrong_type(tmp_path):
    with pytest.raises(RecipeError, match=r"train.micro_batch_size: .*integer.*'eight'"):
        load_recipe(write(tmp_path, "train: {micro_batch_size: eight}\n"))


def test_malformed_yaml_names_the_line(tmp_path):
    with pytest.raises(RecipeError, match="malformed YAML at line 3, column 1"):
        load_recipe(write(tmp_path, "model:\n  name: [unclosed\n"))


def test_relative_data_paths_resolve_against_the_recipe(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text("{}\n")
    r = load_recipe(write(tmp_path, "data: {train: d/train.jsonl}\n"))
    assert r.data.train == str((tmp_path / "d" / "train.jsonl").resolve())


def test_cross_field_rules(tmp_path):
    with pytest.raises(RecipeError, match="needs model.task: sequence_classification"):
        load_recipe(write(tmp_path, "data: {format: classification}\n"))
    with pytest.raises(RecipeError, match="not both"):
        load_recipe(write(tmp_path, "data: {validation: v.jsonl, validation_split: 0.1}\n"))


def test_bad_override_syntax():
    with pytest.raises(RecipeError, match="section.key=value"):
        parse_overrides(["train.lr"])


def test_dump_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, "model: {quant: fp4}\nlora: {r: 2}\n"))
    again = load_recipe(write(tmp_path, r.dump(), "again.yaml"))
    assert again == r


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
        ["model", "lora", "data", "train", "r", "lr", "quant", "name", "task", "epochs", "x"]), c, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=yaml_values)
def test_random_recipes_either_load_or_raise_recipe_error(tmp_path, tree):
    import yaml

    p = tmp_path / "fuzz.yaml"
    p.write_text(yaml.safe_dump(tree))
    try:
        assert isinstance(load_recipe(p), Recipe)
    except RecipeError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_random_text_either_loads_or_raises_recipe_error(tmp_path, text):
    p = tmp_path / "fuzz.yaml"
    p.write_text("model:\n  quant: nf4\n" + text, encoding="utf-8")
    try:
        load_recipe(p)
    except RecipeError:
        pass
