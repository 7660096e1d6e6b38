"""Recipe schema: defaults, strict keys with did-you-mean, all errors at once, overrides, paths."""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lora_ft.errors import RecipeError
from lora_ft.recipe import Recipe, load_recipe, parse_overrides


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


def test_a_chat_template_for_an_encoder_task_is_reported_with_the_other_problems(tmp_path):
    p = write(tmp_path, "model: {task: sequence_classification, chat_template: chatml, quant: nf5}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert "2 problem(s)" in str(e.value) and (
        "model.chat_template: renders conversations for a decoder: it needs model.task causal_lm or reward, not "
        "sequence_classification") in str(e.value)
    assert load_recipe(write(tmp_path, "model: {task: reward, chat_template: chatml}\n")).model.chat_template == (
        "chatml")


REPEAT = "YAML would keep the last silently, so remove all but one"


def test_a_repeated_key_is_refused_naming_the_key_and_its_lines_with_the_other_problems(tmp_path, capsys):
    """A section pasted twice and a key twice in one section: each is one problem naming the dotted key and the
    lines, listed with the schema's problems on the one line (the last value would have won silently)."""
    p = write(tmp_path, "lora:\n  r: 8\n  alpha: 16\n  r: 16\ntrain: {lr: -1}\nlora:\n  dropout: 0.1\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(e.value) == (f"{p}: 3 problem(s): lora: given twice (lines 1 and 6); {REPEAT}; lora.r: given twice "
                            f"(lines 2 and 4); {REPEAT}; train.lr: Input should be a positive number or 'auto' "
                            "(got -1)")
    # Alone (the recipe is otherwise valid, and --set of the same key is no repeat), three times, equal values too.
    p = write(tmp_path, "data: {train: x.jsonl}\nlora: {r: 4,\n  alpha: 8, r: 4}\ntrain:\n  lr: 0.001\n  lr: 0.001\n"
              "  lr: 0.002\n", "again.yaml")
    problems = f"lora.r: given twice (lines 2 and 3); {REPEAT}; train.lr: given 3 times (lines 5, 6 and 7); {REPEAT}"
    with pytest.raises(RecipeError) as e:
        load_recipe(p, ["lora.r=8"])
    assert str(e.value) == f"{p}: 2 problem(s): {problems}"
    from lora_ft.cli import main

    assert main(["validate", str(p)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"lora-ft: error: {p}: 2 problem(s): {problems}"


def test_the_same_key_in_other_sections_and_a_merge_key_override_are_not_repeats(tmp_path):
    p = write(tmp_path, "data: {train: x.jsonl, validation: y.jsonl}\nlora: {r: 4, alpha: 8}\n"
              "train: {lr: 0.001, warmup: 0}\n")
    r = load_recipe(p)
    assert (r.lora.r, r.lora.alpha, r.train.lr) == (4, 8, 0.001)
    merged = load_recipe(write(tmp_path, "data: {train: x.jsonl}\nlora:\n  <<: {r: 4, alpha: 8}\n  r: 16\n", "m.yaml"))
    assert (merged.lora.r, merged.lora.alpha) == (16, 8)  # overriding a merged key is what a merge key is for


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
@example(text="")  # the success branch, every run: kept nf4, replaced, the whole mapping replaced
@example(text="  quant: int8\n")
@example(text="model: {name: x}\n")
def test_random_text_either_loads_or_raises_recipe_error(tmp_path, text):
    """A recipe that loads is what its file says: the quantization the YAML gives (nf4, unless the text replaced
    it or the whole model mapping, then the default), and a dump that reads back as the same recipe."""
    import yaml

    p = tmp_path / "fuzz.yaml"
    p.write_text("model:\n  quant: nf4\n" + text, encoding="utf-8")
    try:
        recipe = load_recipe(p)
    except RecipeError:
        return
    assert isinstance(recipe, Recipe)
    assert recipe.model.quant == yaml.safe_load(p.read_text(encoding="utf-8"))["model"].get("quant", "none")
    assert load_recipe(write(tmp_path, recipe.dump(), "again.yaml")) == recipe


QUICKSTART = Path(__file__).parent.parent / "recipes" / "quickstart" / "smollm2-qlora-chat.yaml"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_real_recipes_either_load_or_raise_recipe_error(tmp_path, data):
    """A real recipe with characters deleted, inserted or replaced (indentation, colons, numbers break)."""
    text = QUICKSTART.read_text(encoding="utf-8")
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        op = data.draw(st.sampled_from(["delete", "insert", "replace"]))
        piece = data.draw(st.text(alphabet=" :-[]{}\n#'\".0123456789abcx\t&*!|>%@", min_size=1, max_size=3))
        text = text[:at] + (piece if op != "delete" else "") + text[at + (op != "insert") :]
    p = tmp_path / "mutated.yaml"
    p.write_text(text, encoding="utf-8")
    try:
        assert isinstance(load_recipe(p), Recipe)
    except RecipeError as e:
        assert "\n" not in str(e)


DEEP_MAP = "a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 1500))


@pytest.mark.parametrize("text", ["[" * 3000 + "]" * 3000, DEEP_MAP, "train: {lr: .inf}", "train: {epochs: .inf}",
                                  "lora: {alpha: .nan}",
                                  "train: {warmup: -.inf}"])
def test_deep_nesting_and_infinite_numbers_are_recipe_errors(tmp_path, text):
    with pytest.raises(RecipeError, match="nested too deeply|finite number"):
        load_recipe(write(tmp_path, text))


def test_forgetting_guard_refuses_inits_that_rewrite_the_base(tmp_path):
    with pytest.raises(RecipeError, match="forgetting.enabled compares with the base model, which lora.init 'olora'"):
        load_recipe(write(tmp_path, "forgetting: {enabled: true}\nlora: {init: olora}\n"))
    assert load_recipe(write(tmp_path, "forgetting: {enabled: true}\nlora: {init: gaussian}\n")).forgetting.enabled


# ------------------------------------------------------------------------------------------------ lora.init
@pytest.mark.parametrize(("given", "expected"), [("true", True), ("false", False), ("gaussian", "gaussian"),
                                                 ("pissa", "pissa"), ("OLoRA", "olora"), ("loftq", "loftq")])
def test_supported_lora_inits_load(tmp_path, given, expected):
    quant = "nf4" if given == "loftq" else "none"
    assert load_recipe(write(tmp_path, f"model: {{quant: {quant}}}\nlora: {{init: {given}}}\n")).lora.init == expected


@pytest.mark.parametrize(("given", "needle"), [
    ("pisa", "lora.init: unknown init 'pisa' (did you mean 'pissa'?)"),
    ("eva", "lora.init: 'eva' needs a pass over the training data"),
    ("corda", "lora.init: 'corda' needs peft's preprocess_corda pass"),
    ("pissa_niter_4", "lora.init: 'pissa_niter_4' re-runs a randomized SVD when the adapter is loaded, so the "
                      "saved adapter would not reload faithfully: use 'pissa'"),
])
def test_unsupported_lora_inits_are_refused_with_the_fix(tmp_path, given, needle):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, f"lora: {{init: {given}}}\n"))
    msg = str(e.value)
    assert needle in msg and "1 problem(s)" in msg and "\n" not in msg
    if given in ("eva", "corda"):
        assert msg.endswith("use one of true, false, gaussian, pissa, olora, loftq")


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_weight_rewriting_inits_need_an_unquantized_base(tmp_path, init, quant):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, f"model: {{quant: {quant}}}\nlora: {{init: {init}}}\n"))
    assert f"lora.init: '{init}' rewrites the base weights, which needs them in full precision, not model.quant " \
           f"{quant}: set model.quant: none, or lora.init: true" in str(e.value)
    ok = load_recipe(write(tmp_path, f"model: {{quant: {quant}}}\nlora: {{init: gaussian}}\n"))
    assert (ok.model.quant, ok.lora.init) == (quant, "gaussian")


@pytest.mark.parametrize("quant", ["none", "fp4", "int8"])
def test_loftq_needs_an_nf4_base(tmp_path, quant):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, f"model: {{quant: {quant}}}\nlora: {{init: loftq}}\n"))
    assert "lora.init: 'loftq' starts the adapter at the NF4 quantization error of the base, not model.quant " \
           f"{quant}: set model.quant: nf4, or lora.init: true" in str(e.value)


@pytest.mark.parametrize("extra", ["forgetting: {enabled: true}", "objective: {type: dpo}\ndata: {format: preference}"])
def test_loftq_is_refused_where_the_base_with_the_adapter_off_is_the_reference(tmp_path, extra):
    # LoftQ's adapter starts non-zero: the adapter-off model is the NF4 base, not the model training starts from.
    with pytest.raises(RecipeError, match="which lora.init 'loftq' does not start from: use lora.init: true"):
        load_recipe(write(tmp_path, f"model: {{quant: nf4}}\nlora: {{init: loftq}}\n{extra}\n"))


def test_lora_plus_is_refused_with_layer_decay_or_a_head_rate_of_its_own(tmp_path):
    for train in ("{lr_layer_decay: 0.9}", "{lr: 1e-4, head_lr: 1e-3}"):
        with pytest.raises(RecipeError) as e:
            load_recipe(write(tmp_path, f"lora: {{plus_lr_ratio: 16}}\ntrain: {train}\n"))
        assert "lora.plus_lr_ratio (LoRA+) sets its own parameter groups" in str(e.value)
    # a head rate equal to lr is what `auto` resolves to: the run_config.yaml of a LoRA+ run loads again
    resolved = load_recipe(write(tmp_path, "lora: {plus_lr_ratio: 16}\ntrain: {lr: 1e-4, head_lr: 1e-4}\n"))
    assert resolved.lora.plus_lr_ratio == 16
    with pytest.raises(RecipeError, match="lora.plus_lr_ratio: Input should be greater than or equal to 1"):
        load_recipe(write(tmp_path, "lora: {plus_lr_ratio: 0.5}\n"))


def test_init_problems_are_reported_with_the_other_problems(tmp_path, capsys):
    p = write(tmp_path, "model: {quant: nf4}\nlora: {init: pissa}\ntrain: {lr: -1, epoch: 2}\ndata: {train: x.jsonl}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "3 problem(s)" in msg and "\n" not in msg
    assert "lora.init: 'pissa' rewrites the base weights" in msg and "train.lr" in msg and "train.epoch" in msg
    # `lora-ft validate` reads recipes the same way: it fails without loading anything.
    from lora_ft.cli import main

    p = write(tmp_path, "lora: {init: eva}\n", "eva.yaml")
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-ft: error: ") and "lora.init: 'eva' needs" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------ objective
def test_objective_type_gets_did_you_mean_and_each_type_its_default_beta(tmp_path):
    with pytest.raises(RecipeError, match=r"objective.type: unknown objective 'dop' \(did you mean 'dpo'\?\)"):
        load_recipe(write(tmp_path, "objective: {type: dop}\n"))
    with pytest.raises(RecipeError, match=r"objective.betta: unknown key \(did you mean 'beta'\?\)"):
        load_recipe(write(tmp_path, "objective: {type: dpo, betta: 0.1}\n"))
    betas = {t: load_recipe(write(tmp_path, f"objective: {{type: {t}}}\n")).objective.resolved_beta
             for t in ("dpo", "ipo", "orpo", "simpo")}
    assert betas == {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0}
    assert load_recipe(write(tmp_path, "objective: {type: DPO, beta: 0.5}\n")).objective.resolved_beta == 0.5


@pytest.mark.parametrize("text,needle", [
    ("model: {task: sequence_classification}\nobjective: {type: dpo}\n", "needs model.task causal_lm"),
    ("objective: {type: dpo}\ndata: {format: messages}\n", "data.format auto or preference"),
    ("data: {format: preference}\n", "data.format preference needs a preference objective"),
    ("objective: {type: classification}\n", "objective.type classification needs model.task sequence_classif"),
    ("objective: {type: sft, beta: 0.2}\n", "apply to the preference objectives"),
    ("objective: {type: dpo}\nlora: {init: pissa}\n", "compares with the base model, which lora.init 'pissa'"),
    ("objective: {type: dpo, precompute_reference: false}\nlora: {init_from: runs/sft}\n", "remove the setting"),
    ("objective: {type: orpo, cpo_alpha: 1}\n", "apply to simpo, not orpo"),
    ("objective: {type: ipo}\ndata: {augment: {neftune_alpha: 5}}\n", "apply to objective sft, not ipo"),
    ("objective: {type: simpo}\ndata: {packing: true}\n", "data.packing true: objective.type simpo scores"),
    ("objective: {type: dpo}\ntrain: {max_tokens_per_batch: 4096}\n", "does not count the two sequences"),
    ("objective: {type: KTO}\ndata: {format: preference}\n", "kto reads its own columns: data.format auto, not"),
])
def test_objective_rules_name_the_fields_and_the_fix(tmp_path, text, needle):
    with pytest.raises(RecipeError, match=needle):
        load_recipe(write(tmp_path, text))


def test_reference_is_precomputed_by_default_only_when_it_is_a_starting_adapter(tmp_path):
    def precomputes(text):
        r = load_recipe(write(tmp_path, text))
        return r.objective.precomputes_reference(r.lora)

    assert not precomputes("objective: {type: dpo}\n")
    assert precomputes("objective: {type: dpo, precompute_reference: true}\n")
    assert precomputes("objective: {type: ipo}\nlora: {init_from: sft}\n")
    assert not precomputes("objective: {type: simpo}\nlora: {init_from: sft}\n")  # reference-free
    (tmp_path / "sft").mkdir()
    assert load_recipe(write(tmp_path, "lora: {init_from: sft}\n")).lora.init_from == str(tmp_path / "sft")
