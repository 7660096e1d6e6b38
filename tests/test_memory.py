"""The memory planner: config-only predictions against real bitsandbytes storage and measured CPU peaks,
the auto micro-batch, and ``lora-ft plan``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_bert_tokenizer, make_recipe, prepare, save_random_llama, save_random_model

from lora_ft.cli import main
from lora_ft.errors import RecipeError
from lora_ft.memory import launch
from lora_ft.memory.activations import attended_pairs, layer_terms
from lora_ft.memory.estimate import _loss_bytes, estimate, largest_micro_batch, quantized_weight_bytes, static_rows
from lora_ft.memory.launch import (
    TRIM_MIN_ACTIVATIONS,
    answer_tokens_of,
    resolve_auto_checkpointing,
    resolve_auto_micro_batch,
    resolve_auto_trim,
    resolve_for_launch,
)
from lora_ft.memory.shape import CPU_RUNTIME, CUDA_CONTEXT, CUDA_FRAGMENTATION, model_shape, setting_for
from lora_ft.modeling.packed_attention import SDPA_FROM
from lora_ft.objectives import chunked_loss
from lora_ft.recipe import Recipe
from lora_ft.training.measure import measure_peak, synthetic_pairs


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """A 4-layer Llama with GQA and a 4096 vocabulary: big enough that every term of the plan shows."""
    return save_random_llama(tmp_path_factory, "small-llama", vocab_size=4096, hidden_size=256,
                             intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def small_bert(tmp_path_factory):
    """A 4-layer BERT encoder (dropout 0.1 in attention and hidden states, as BERT checkpoints ship)."""
    from transformers import BertConfig, BertModel

    tok = build_bert_tokenizer()
    cfg = BertConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                     num_attention_heads=4, max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    return save_random_model(tmp_path_factory, "small-bert", BertModel, cfg, tok)


@pytest.fixture
def one_thread():
    """Measurements run on one thread: memory does not depend on it, and on a shared CPU a second thread
    spinning against other processes makes small matmuls 20× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def recipe_for(folder, task="causal_lm", quant="none", **sections) -> Recipe:
    # fp32 unless a case sets bf16: compute_dtype auto would be bf16 on CPUs with bf16 units, fp32 elsewhere
    tree = {"model": {"name": str(folder), "task": task, "quant": quant, "compute_dtype": "fp32"}, "lora": {"r": 16}}
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return Recipe.model_validate(tree)


# ---------------------------------------------------------------------------------------------- static terms
@pytest.mark.parametrize("quant,double_quant", [("nf4", False), ("nf4", True), ("fp4", True), ("int8", False)])
def test_quantized_size_formula_matches_bitsandbytes_storage(quant, double_quant):
    import bitsandbytes as bnb

    out, fan_in = 192, 576
    w = torch.randn(out, fan_in)
    if quant == "int8":
        layer = bnb.nn.Linear8bitLt(fan_in, out, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        layer = layer.to("cpu")
        tensors = [layer.weight, layer.weight.SCB]
    else:
        layer = bnb.nn.Linear4bit(fan_in, out, bias=False, compress_statistics=double_quant, quant_type=quant)
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant, quant_type=quant)
        layer = layer.to("cpu")
        qs = layer.weight.quant_state
        tensors = [layer.weight, qs.absmax, qs.code]
        if qs.nested:
            tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
    stored = sum(t.untyped_storage().nbytes() for t in tensors)
    assert quantized_weight_bytes(out * fan_in, out, quant, double_quant) == stored


def test_7b_weights_are_counted_from_the_config_alone(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000).save_pretrained(tmp_path / "llama-7b")
    recipe = recipe_for(tmp_path / "llama-7b", quant="nf4")
    shape = model_shape(recipe)
    assert shape.total_params == 6_738_415_616  # Llama-2-7B's published size
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert sum(i * o for n, i, o, _ in shape.linear if n in shape.quantizable) == linear  # lm_head stays fp32
    rows = {r.label.split(" (")[0]: r.bytes for r in static_rows(shape, setting_for(recipe, "cuda"))}
    blocks = linear / 64
    assert rows["base weights, nf4"] == pytest.approx(linear / 2 + blocks + 4 * blocks / 256, rel=1e-3)
    assert rows["base weights, fp32"] == pytest.approx(4 * (shape.total_params - linear))
    lora = 32 * 16 * (4 * 8192 + 3 * (4096 + 11008))
    tensors = 2 * 32 * 7  # A and B of 7 modules a layer: AdamW's 0-d fp32 step each
    assert rows["LoRA weights + grads + AdamW"] == 16 * lora + 4 * tensors


# ---------------------------------------------------------------------------------------------- vs measurement
CASES = [
    *[("llama", q, s, {}) for q in ("none", "int8", "nf4") for s in (32, 128)],
    *[("bert", q, s, {}) for q in ("none", "int8", "nf4") for s in (32, 128)],
    ("llama", "nf4", 128, {"model": {"compute_dtype": "bf16"}, "train": {"gradient_checkpointing": True}}),
    # The fused layer hands on 4-bit products in bf16 under autocast: the saved projection outputs are 16-bit.
    *[(m, "nf4", 128, {"model": {"compute_dtype": "bf16"}}) for m in ("llama", "bert")],
    ("llama", "none", 128, {"model": {"compute_dtype": "bf16"}}),
    ("llama", "none", 128, {"train": {"gradient_checkpointing": True}, "lora": {"dropout": 0.0}}),
    ("llama", "int8", 32, {"lora": {"dropout": 0.0}}),  # int8 and LoRA share their saved input
    # Packed rows of 128-token examples, bf16: packed_attention's probabilities are a fifth of the step's tensors.
    ("llama", "none", 512, {"model": {"compute_dtype": "bf16"}}),
    # The llama cases above pack (data.packing auto); these measure left-padded batches.
    *[("llama", q, 128, {"data": {"packing": False}}) for q in ("none", "nf4")],
]


@pytest.mark.parametrize("model,quant,seq,extra", CASES,
                         ids=[f"{m}-{q}-{s}{'-' + '-'.join(x) if x else ''}" for m, q, s, x in CASES])
def test_predicted_peak_is_within_15_percent_of_the_measured_cpu_peak(small_llama, small_bert, one_thread, model,
                                                                       quant, seq, extra):
    folder, task = (small_llama, "causal_lm") if model == "llama" else (small_bert, "sequence_classification")
    recipe = recipe_for(folder, task, quant, **extra)
    batch = 4
    measured = measure_peak(recipe, batch, seq, answer_fraction=0.5)
    e = estimate(model_shape(recipe), setting_for(recipe, "cpu"), batch, seq, answer_fraction=0.5,
                 attended=synthetic_pairs(batch, seq))  # what measure_peak's packed rows keep, as data would say
    assert measured["step"] > 0.3 * measured["peak"]  # the step, not the weights, must be a real part of the peak
    assert e.step_peak == pytest.approx(measured["peak"], rel=0.15), {r.label: r.bytes for r in e.rows}


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_preference_step_counts_two_sequences_per_pair_and_its_reference_pass(small_llama, one_thread, quant):
    """A DPO micro-batch of 4 pairs is 8 sequences (and a reference forward without gradients): predicted from the
    config as such and measured with the objective's own loss."""
    recipe = recipe_for(small_llama, "causal_lm", quant, objective={"type": "dpo"})
    e = estimate(model_shape(recipe), setting_for(recipe, "cpu"), 4, 128, answer_fraction=0.5)
    measured = measure_peak(recipe, 4, 128, answer_fraction=0.5)
    assert e.step_peak == pytest.approx(measured["peak"], rel=0.15), {r.label: r.bytes for r in e.rows}
    sft = recipe_for(small_llama, "causal_lm", quant, data={"packing": False})  # pairs are never packed
    as_sequences = estimate(model_shape(sft), setting_for(sft, "cpu"), 8, 128, answer_fraction=0.5)
    assert e.step_peak == as_sequences.step_peak and e.micro_batch == 4


@pytest.fixture(scope="module")
def wide_vocab_llama(tmp_path_factory):
    """A one-layer Llama with a 32k vocabulary: the loss is most of the step, as for SmolLM2 or Llama 3."""
    return save_random_llama(tmp_path_factory, "wide-vocab-llama", vocab_size=32_768, hidden_size=64,
                             intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


@pytest.mark.parametrize("evaluation", [False, True])
def test_chunked_loss_term_is_measured_where_the_vocabulary_dominates(wide_vocab_llama, one_thread, monkeypatch,
                                                                      evaluation):
    monkeypatch.setattr(chunked_loss, "CHUNK_VALUES", 64 * 32_768)  # chunks of 64 positions: several per batch
    recipe = recipe_for(wide_vocab_llama)
    shape, s = model_shape(recipe), setting_for(recipe, "cpu")
    e = estimate(shape, s, 4, 256, answer_fraction=0.5, attended=synthetic_pairs(4, 256))
    measured = measure_peak(recipe, 8 if evaluation else 4, 256, answer_fraction=0.5, evaluation=evaluation)
    predicted = e.eval_peak if evaluation else e.step_peak
    assert predicted == pytest.approx(measured["peak"], rel=0.15), {r.label: r.bytes for r in e.rows}
    full = _loss_bytes(shape, s, 4, e.keep, chunked=False)[0]
    assert measured["step"] < full / 2  # unchunked, three (positions × vocabulary) copies alone would not fit


@pytest.mark.parametrize("model,quant", [("llama", "none"), ("llama", "nf4"), ("bert", "none")])
def test_evaluation_step_is_predicted_too(small_llama, small_bert, one_thread, model, quant):
    """Evaluation (micro-batch × 2, no gradients) is a peak of its own, and the first thing training does."""
    folder, task = (small_llama, "causal_lm") if model == "llama" else (small_bert, "sequence_classification")
    recipe = recipe_for(folder, task, quant)
    measured = measure_peak(recipe, 8, 128, answer_fraction=0.5, evaluation=True)
    shape, s = model_shape(recipe), setting_for(recipe, "cpu")
    e = estimate(shape, s, 4, 128, answer_fraction=0.5)
    assert e.eval_peak == pytest.approx(measured["peak"], rel=0.15)
    assert e.peak == max(e.eval_peak, e.step_peak)


@pytest.mark.slow
@pytest.mark.parametrize("name,task,quant,seq", [("example:smollm2-135m-instruct", "causal_lm", "nf4", 64),
                                                 ("example:minilm-l6", "sequence_classification", "int8", 128)])
def test_example_models_within_15_percent(one_thread, name, task, quant, seq):
    recipe = recipe_for(name, task, quant)
    measured = measure_peak(recipe, 2, seq, answer_fraction=0.5)
    e = estimate(model_shape(recipe), setting_for(recipe, "cpu"), 2, seq, answer_fraction=0.5)
    assert e.step_peak == pytest.approx(measured["peak"], rel=0.15)


# ---------------------------------------------------------------------------------------------- auto micro-batch
def test_auto_micro_batch_is_the_largest_that_fits_and_keeps_the_global_batch(small_llama):
    recipe = recipe_for(small_llama, train={"micro_batch_size": "auto", "global_batch_size": 24},
                        data={"max_length": 256})
    shape, s = model_shape(recipe), setting_for(recipe, "cpu")
    total = [estimate(shape, s, b, 256).total for b in range(1, 9)]
    assert total == sorted(total)  # memory grows with the micro-batch
    budget = (total[5] + total[6]) / 2  # 6 fit, 7 do not
    assert largest_micro_batch(shape, s, 256, budget) == 6
    resolved = resolve_auto_micro_batch(recipe, world=1, device="cpu", budget=budget)
    assert (resolved.train.micro_batch_size, resolved.train.for_processes(1).grad_accum) == (6, 4)
    # the largest divisor of the per-process global batch that fits: 24 / 2 processes = 12 → 6; 20 → 5
    two = resolve_auto_micro_batch(recipe, world=2, device="cpu", budget=budget)
    assert (two.train.micro_batch_size, two.train.for_processes(2).grad_accum) == (6, 2)
    odd = recipe.model_copy(update={"train": recipe.train.model_copy(update={"global_batch_size": 20})})
    assert resolve_auto_micro_batch(odd, 1, "cpu", budget).train.micro_batch_size == 5
    # no global_batch_size: the global batch of the default micro-batch 4 × grad_accum 3 = 12
    plain = recipe.model_copy(update={"train": recipe.train.model_copy(update={"global_batch_size": None,
                                                                               "grad_accum": 3})})
    resolved = resolve_auto_micro_batch(plain, 1, "cpu", budget)
    assert (resolved.train.micro_batch_size, resolved.train.for_processes(1).grad_accum) == (6, 2)
    with pytest.raises(RecipeError, match="one example of data.max_length 256 needs"):
        resolve_auto_micro_batch(recipe, 1, "cpu", total[0] * 0.9)


def test_auto_gradient_checkpointing_is_on_only_when_memory_needs_it(small_llama, monkeypatch):
    from dataclasses import replace

    recipe = recipe_for(small_llama, train={"micro_batch_size": 8}, data={"max_length": 256})
    assert recipe.train.gradient_checkpointing == "auto"
    shape, s = model_shape(recipe), setting_for(recipe, "cuda")
    off = estimate(shape, replace(s, gradient_checkpointing=False), 8, 256).total
    on = estimate(shape, replace(s, gradient_checkpointing=True), 8, 256).total
    assert on < off

    def gc(r, budget):
        return resolve_auto_checkpointing(r, 1, "cuda", budget).train.gradient_checkpointing

    assert gc(recipe, off * 1.01) is False  # fits without: no recomputation
    assert gc(recipe, (on + off) / 2) is True  # fits only with it
    # auto micro-batch, global batch 8: on only when it buys a larger micro-batch of that global batch
    auto = recipe_for(small_llama, train={"micro_batch_size": "auto", "global_batch_size": 8}, data={"max_length": 256})
    assert gc(auto, off * 1.01) is False  # 8 fit either way
    assert gc(auto, (on + off) / 2) is True  # 8 with it, fewer without
    explicit = recipe_for(small_llama, train={"micro_batch_size": 8, "gradient_checkpointing": False})
    assert gc(explicit, 1.0) is False  # the recipe's own choice is never overridden


def test_launch_resolves_checkpointing_without_a_data_pass_when_the_worst_case_fits(small_llama, monkeypatch):
    from accelerate import PartialState

    recipe = recipe_for(small_llama, train={"micro_batch_size": 2}, data={"max_length": 64, "train": "x.jsonl"})
    monkeypatch.setattr(launch, "answer_tokens_from_data", lambda r: pytest.fail("no data pass needed"))
    accelerator = PartialState(cpu=True)
    resolved = resolve_for_launch(recipe, accelerator)
    assert resolved.train.gradient_checkpointing is False and resolved.train.micro_batch_size == 2


def test_training_with_auto_micro_batch_uses_the_planned_batch(tiny_llama, chat_data, tmp_path, monkeypatch):
    recipe = make_recipe(tiny_llama, chat_data, tmp_path / "auto",
                         train={"micro_batch_size": "auto", "global_batch_size": 16, "max_steps": 2})
    recipe.data.max_length = 64
    from lora_ft.modeling.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_llama), recipe.model)
    answers = answer_tokens_of(prepare(recipe.data, "causal_lm", tok, 0).splits["train"])
    shape, s = model_shape(recipe), setting_for(recipe, "cpu")
    budget = (estimate(shape, s, 4, 64, answer_tokens=answers).total
              + estimate(shape, s, 5, 64, answer_tokens=answers).total) / 2
    monkeypatch.setattr(launch, "device_memory", lambda device: budget)
    from lora_ft.training.trainer import train

    train(recipe)
    info = json.loads((tmp_path / "auto" / "run_info.json").read_text())
    assert (info["global_batch"], info["grad_accum"]) == (16, 4)  # micro-batch 4 (fits) × 4
    assert "micro_batch_size: 4" in (tmp_path / "auto" / "run_config.yaml").read_text()
    assert "trim_cpu_memory: false" in (tmp_path / "auto" / "run_config.yaml").read_text()  # a tiny step: not worth it


def test_auto_trimming_is_on_only_where_a_cpu_step_saves_a_gibibyte_of_activations(small_llama):
    def trims(micro: int, seq: int, device: str = "cpu", trim="auto") -> bool:
        recipe = recipe_for(small_llama, train={"micro_batch_size": micro, "trim_cpu_memory": trim},
                            data={"max_length": seq, "packing": False})
        return resolve_auto_trim(recipe, device).train.trim_cpu_memory

    def activations(micro: int, seq: int) -> float:
        recipe = recipe_for(small_llama, data={"max_length": seq, "packing": False})
        est = estimate(model_shape(recipe), setting_for(recipe, "cpu"), micro, seq)
        return next(r.bytes for r in est.rows if r.label == "activations")

    assert activations(2, 128) < TRIM_MIN_ACTIVATIONS / 10 and trims(2, 128) is False
    assert activations(64, 512) > TRIM_MIN_ACTIVATIONS and trims(64, 512) is True
    assert trims(64, 512, device="cuda") is False  # no heap to trim on a GPU
    assert trims(2, 128, trim=True) is True and trims(64, 512, trim=False) is False  # a recipe's choice stands


def test_auto_trimming_counts_what_checkpointed_layers_produce_not_the_little_they_keep(small_llama):
    """With checkpointing a step keeps only the layer inputs, but every layer's activations pass through the heap
    (forward, then the recomputation): glibc keeps those, so the trim decision counts them."""
    def plan(gc: bool):
        recipe = recipe_for(small_llama, train={"micro_batch_size": 64, "gradient_checkpointing": gc},
                            data={"max_length": 512, "packing": False})
        kept = next(r.bytes for r in estimate(model_shape(recipe), setting_for(recipe, "cpu"), 64, 512).rows
                    if r.label == "activations")
        return kept, resolve_auto_trim(recipe, "cpu").train.trim_cpu_memory

    kept_on, trim_on = plan(True)
    kept_off, trim_off = plan(False)
    assert kept_on < TRIM_MIN_ACTIVATIONS < kept_off  # what checkpointing keeps is below the threshold
    assert trim_on is True and trim_off is True


# ---------------------------------------------------------------------------------------------- CLI
def test_plan_command_prints_the_breakdown_and_what_fits(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096).save_pretrained(tmp_path / "m")
    (tmp_path / "r.yaml").write_text(f"model: {{name: {tmp_path / 'm'}, quant: nf4}}\nlora: {{r: 16}}\n"
                                     "data: {max_length: 2048}\ntrain: {micro_batch_size: 4}\n")
    assert main(["plan", str(tmp_path / "r.yaml"), "--memory", "24GB", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    for text in ("base weights, nf4 (224 linear layers)", "LoRA weights + grads + AdamW", "activations",
                 "logits + loss", "evaluation step", "peak (torch.cuda.max_memory_allocated)", "fits in 24.00 GiB",
                 "gradient checkpointing on", "compute bf16"):
        assert text in out, text
    fits = dict(cell.split(": ") for cell in out.strip().splitlines()[-1].strip().split(" | "))
    assert int(fits["2048"]) >= 4 and int(fits["4096"]) < int(fits["2048"]) < int(fits["1024"])
    with pytest.raises(SystemExit) as refused:  # a bad size is refused while the arguments are read
        main(["plan", str(tmp_path / "r.yaml"), "--memory", "lots"])
    assert refused.value.code == 2 and "argument --memory: expected a positive size such as 5GB or 500MB, got " \
        "'lots'" in capsys.readouterr().err


def test_plan_terms_move_the_way_the_code_paths_say(small_llama):
    """Checkpointing and 4-bit shrink the plan; without checkpointing, autocast keeps a 16-bit copy of every
    frozen unquantized weight; unpacked, the logits follow the answer fraction and batch 1 has no padding mask;
    packed, even one row has a mask on a GPU, and on the CPU each token keeps probabilities over its example (the
    longest example bounds them); from the data every position may carry a label."""
    def est(quant="none", gc=False, device="cuda", b=4, frac=1.0, packing=False):
        recipe = recipe_for(small_llama, quant=quant, train={"gradient_checkpointing": gc},
                            data={"packing": packing}, model={"compute_dtype": "auto"})  # a GPU plan: bf16
        return estimate(model_shape(recipe), setting_for(recipe, device), b, 256, frac)

    assert est(gc=True).peak < est().peak
    assert est("nf4", gc=True).peak < est(gc=True).peak
    shape = model_shape(recipe_for(small_llama))
    frozen = sum(x.fan_in * x.fan_out for x in shape.layer_linear)
    acts = {r.label: r.bytes for r in est().rows}["activations"]
    assert acts >= shape.layers * 2 * frozen  # the weight copies are there
    logits = {r.label: r.bytes for r in est(frac=0.5).rows}["logits + loss *"]
    head16, positions = 2 * shape.vocab * shape.hidden, 4 * 128
    # chunked: one chunk (fp32 + 16-bit logits) and two hidden-size vectors per position, not three full copies
    assert shape.chunked_loss and positions < chunked_loss.chunk_rows(shape.vocab)
    assert logits == pytest.approx(6 * positions * shape.vocab + 2 * 4 * positions * shape.hidden + head16)
    unpacked = recipe_for(small_llama, data={"packing": False}, model={"compute_dtype": "auto"})
    s_cuda = setting_for(unpacked, "cuda")
    assert _loss_bytes(shape, s_cuda, 4, 128, chunked=False)[0] == 3 * 4 * positions * shape.vocab + head16
    assert not layer_terms(shape, setting_for(unpacked, "cpu"), 1).per_token_seq  # no mask to save
    packed = setting_for(recipe_for(small_llama), "cpu")
    assert packed.packed and layer_terms(shape, setting_for(recipe_for(small_llama), "cuda"), 1).per_token_seq
    terms = layer_terms(shape, packed, 1)  # packed_attention: no row mask, probabilities per pair of an example
    assert not terms.per_token_seq and terms.bytes(256, 256, 64) < terms.bytes(256, 256)
    by_pairs = [estimate(shape, packed, 4, 256, 1.0, attended=attended_pairs([n] * 8)).total for n in (32, 64)]
    by_pairs.append(estimate(shape, packed, 4, 256, 1.0).total)  # not known: examples as long as the row
    assert by_pairs == sorted(by_pairs) and len(set(by_pairs)) == 3
    # Examples too long for the eager path keep no probabilities; shorter ones n × their bucket width, over all.
    assert attended_pairs([SDPA_FROM, 60, 32]) == (60 * 64 + 32 * 32) / (SDPA_FROM + 92)
    # Packed, a stated answer fraction holds for a row as for each example; the data's longest answer says nothing
    # about how many answers share a row, so then every one of the 256 positions may carry a label.
    logits_packed = {r.label: r.bytes for r in est(frac=0.5, packing=True).rows}["logits + loss *"]
    assert logits_packed == logits
    packed_recipe = recipe_for(small_llama, data={"packing": True}, model={"compute_dtype": "auto"})
    from_data = estimate(model_shape(packed_recipe), setting_for(packed_recipe, "cuda"), 4, 256, answer_tokens=20)
    assert {r.label: r.bytes for r in from_data.rows}["logits + loss *"] == pytest.approx(
        6 * 2 * positions * shape.vocab + 2 * 4 * 2 * positions * shape.hidden + head16)
    # The CPU process beside its tensors: the runtime, and with checkpointing the heap's previous recomputed layer.
    plain, checkpointed = est(device="cpu"), est(device="cpu", gc=True)
    recomputed = {r.label: r.bytes for r in checkpointed.rows}["backward working set * (recomputed layer)"]
    assert plain.overhead == CPU_RUNTIME and checkpointed.overhead == CPU_RUNTIME + recomputed > CPU_RUNTIME
    assert est(gc=True).overhead == pytest.approx(CUDA_CONTEXT + CUDA_FRAGMENTATION * est(gc=True).peak)
