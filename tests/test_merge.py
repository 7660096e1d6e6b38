"""lora-ft merge on tiny models: merged outputs reproduce the adapter model, and the folder is plain transformers."""

import ast
import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_recipe
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lora_ft.cli import main
from lora_ft.errors import FidelityError
from lora_ft.run import MERGE_MARKER, load_adapter_model, open_run
from lora_ft.shipping.merge import KL_LIMITS, merge_run
from lora_ft.training.trainer import train

FEW_STEPS = {"max_steps": 12, "eval_every": None}


def _train(tmp_path_factory, name, model_dir, data, **sections):
    out = tmp_path_factory.mktemp("runs") / name
    sections["train"] = {**FEW_STEPS, **sections.get("train", {})}
    recipe = make_recipe(model_dir, data, out, **sections)
    recipe.data.max_eval_examples = 12  # (make_recipe's own `data` argument is the files)
    train(recipe)
    return out


@pytest.fixture(scope="module")
def fp32_run(tiny_llama, chat_data, tmp_path_factory):
    return _train(tmp_path_factory, "chat-fp32", tiny_llama, chat_data)


@pytest.fixture(scope="module")
def nf4_run(tiny_llama, chat_data, tmp_path_factory):
    return _train(tmp_path_factory, "chat-nf4", tiny_llama, chat_data, model={"quant": "nf4"})


def chat_texts(run: Path, n: int = 6) -> list[str]:
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    rows = [json.loads(x) for x in Path(open_run(run).recipe.data.validation).read_text().splitlines()[:n]]
    return [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]


@torch.no_grad()
def logits_on(model, tok, texts: list[str]) -> torch.Tensor:
    """Logits of every real (non-pad) position, one row each."""
    enc = tok(texts, return_tensors="pt", padding=True)
    out = model(**enc).logits.float()
    return out[enc["attention_mask"].bool()] if out.dim() == 3 else out


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def kl(ref: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(new, -1), F.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1)


def test_fp32_lora_merge_matches_the_adapter_and_loads_alone(fp32_run, capsys):
    # Through the CLI, with a tiny shard size so the folder is sharded as a big model's would be.
    assert main(["merge", str(fp32_run), "--max-shard-size", "100KB"]) == 0
    printed = capsys.readouterr().out
    entry = json.loads(printed[: printed.rindex("}") + 1])
    assert entry["base"] == "original" and entry["dtype"] == "fp32" and entry["passed"]
    assert entry["max_abs_logit_diff"] < 1e-4 and entry["top1_agreement"] == 1.0
    report = json.loads((fp32_run / "merge_report.json").read_text())
    assert report["original-fp32"]["kl_mean"] == entry["kl_mean"] < 1e-8

    merged_dir = fp32_run / "merged"
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((merged_dir / s).is_file() for s in shards)
    assert not any("lora" in k for k in index["weight_map"])  # merged, not an adapter in disguise
    assert (merged_dir / "generation_config.json").is_file() and not (merged_dir / "adapter_config.json").exists()

    # Independent check: plain transformers on the merged folder vs peft on the original base.
    tok = AutoTokenizer.from_pretrained(merged_dir)
    assert tok.chat_template and tok.pad_token is not None
    texts = chat_texts(fp32_run)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    run = open_run(fp32_run)
    adapter = load_adapter_model(run, "cpu", tok)
    ref = logits_on(adapter, tok, texts)
    diff = (logits_on(merged, tok, texts) - ref).abs().max().item()
    assert diff < 1e-4
    with adapter.disable_adapter():  # the adapter really changes outputs, so the comparison can fail
        assert (logits_on(adapter, tok, texts) - ref).abs().max().item() > 0.1


def test_nf4_merge_into_dequantized_weights_is_faithful_and_into_original_is_refused(nf4_run, tmp_path):
    entry = merge_run(nf4_run, examples=12)
    assert entry["base"] == "dequantized" and entry["quant"] == "nf4" and entry["saved"]
    assert entry["kl_mean"] < 1e-3 and entry["top1_agreement"] == 1.0
    assert entry["positions"] > 50 and entry["data"] == "validation"
    assert entry["loss_merged"] == pytest.approx(entry["loss_adapter"], abs=1e-4)

    # The same adapter merged into the original (un-rounded) weights drifts: refused, but reported.
    with pytest.raises(FidelityError, match="--force"):
        merge_run(nf4_run, base="original", examples=12, out=tmp_path / "orig")
    report = json.loads((nf4_run / "merge_report.json").read_text())
    original = report["original-fp32"]
    assert not original["passed"] and not original["saved"] and not (tmp_path / "orig").exists()
    assert original["kl_mean"] > KL_LIMITS["fp32"] and original["kl_mean"] > 1000 * entry["kl_mean"]
    assert report["dequantized-fp32"]["kl_mean"] == entry["kl_mean"]

    # Independently: the saved folder, opened with transformers alone, against the nf4 adapter model.
    merged_dir = nf4_run / "merged"
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    adapter = load_adapter_model(open_run(nf4_run), "cpu", tok)
    assert adapter.get_base_model().is_loaded_in_4bit
    texts = chat_texts(nf4_run)
    assert kl(logits_on(adapter, tok, texts), logits_on(merged, tok, texts)).mean().item() < 1e-3


def test_bf16_merge_is_saved_in_bf16_within_its_limit(nf4_run, tmp_path):
    entry = merge_run(nf4_run, dtype="bf16", examples=12, out=tmp_path / "bf16")
    assert entry["dtype"] == "bf16" and entry["kl_limit"] == KL_LIMITS["bf16"] and entry["passed"]
    assert 0 < entry["kl_mean"] < KL_LIMITS["bf16"]
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_dora_adapter_on_nf4_merges_faithfully(tiny_llama, chat_data, tmp_path_factory):
    run = _train(tmp_path_factory, "chat-dora", tiny_llama, chat_data, model={"quant": "nf4"},
                 lora={"use_dora": True})
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["use_dora"]
    entry = merge_run(run, examples=12)
    assert entry["passed"] and entry["kl_mean"] < 1e-3 and entry["top1_agreement"] == 1.0
    # DoRA's magnitude is relative to the weight it was trained on: the original weights give a worse merge.
    original = merge_run(run, base="original", examples=12, force=True, out=run / "merged-original")
    assert original["saved"] and original["kl_mean"] > 100 * entry["kl_mean"]


def test_nf4_classifier_head_survives_the_merge(tiny_bert, cls_data, tmp_path_factory):
    run = _train(tmp_path_factory, "cls-nf4", tiny_bert, cls_data, model={"task": "sequence_classification",
                 "quant": "nf4"}, train={"lr": 3e-3, "micro_batch_size": 30})
    entry = merge_run(run, examples=30)
    assert entry["compared"] == "class distributions" and entry["positions"] == 30
    assert entry["passed"] and entry["kl_mean"] < 1e-3 and entry["top1_agreement"] == 1.0

    merged_dir = run / "merged"
    model = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    info = json.loads((run / "run_info.json").read_text())
    assert info["head_modules"] == ["classifier"]
    assert model.config.id2label == {int(k): v for k, v in info["id2label"].items()}
    # The trained head (peft modules_to_save), not a fresh one, is what the merged model carries.
    with safe_open(run / "adapter" / "adapter_model.safetensors", "pt") as f:
        trained = {k.rsplit(".", 1)[-1]: f.get_tensor(k) for k in f.keys() if ".classifier." in k}
    assert set(trained) == {"weight", "bias"}
    assert torch.equal(model.classifier.weight, trained["weight"])
    assert torch.equal(model.classifier.bias, trained["bias"])
    # ... and it predicts what training measured on the test split (max_eval_examples=12 of them).
    tok = AutoTokenizer.from_pretrained(merged_dir)
    rows = [json.loads(x) for x in Path(cls_data["test"]).read_text().splitlines()][:12]
    logits = logits_on(model, tok, [r["text"] for r in rows])
    predicted = [model.config.id2label[int(i)] for i in logits.argmax(-1)]
    accuracy = sum(p == r["label"] for p, r in zip(predicted, rows, strict=True)) / len(rows)
    assert accuracy == pytest.approx(json.loads((run / "eval_results.json").read_text())["after"]["test"]["accuracy"])


def test_merge_errors_are_one_line_with_exit_2(fp32_run, tmp_path, capsys):
    assert main(["merge", str(tmp_path)]) == 2
    assert "is not a lora_ft run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # argparse, with lora_ft's one-line errors (arguments.Parser)
        main(["merge", str(fp32_run), "--examples", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 2 and err == ["lora-ft: error: merge: argument --examples: must be at least 1 (got 0) "
                                               "(see lora-ft merge --help)"]
    # --out never replaces something that is not an earlier merge (the run itself, a folder of other files).
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    for out in (fp32_run, other):
        assert main(["merge", str(fp32_run), "--out", str(out)]) == 2
        assert "is not a merged model folder" in capsys.readouterr().err
    assert (other / "todo.txt").read_text() == "keep me" and (fp32_run / "run_config.yaml").is_file()


def test_refused_merge_through_the_cli_is_one_line_with_exit_1(nf4_run, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["merge", str(nf4_run), "--base", "original", "--out", str(out), "--examples", "12"]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("lora-ft: error:")]
    assert len(errors) == 1 and "--force" in errors[0] and "mean KL" in errors[0], captured.err
    assert captured.out == "" and not out.exists() and not list(tmp_path.iterdir())
    entry = json.loads((nf4_run / "merge_report.json").read_text())["original-fp32"]
    assert not entry["passed"] and not entry["saved"] and f"{entry['kl_mean']:.3g}" in errors[0]


def test_merge_never_replaces_a_folder_it_did_not_write(fp32_run, tiny_llama, tmp_path, capsys):
    # The base model's own folder (what a mistyped --out most plausibly names) is refused before any loading.
    before = tree_hashes(tiny_llama)
    siblings = set(tiny_llama.parent.iterdir())
    assert main(["merge", str(fp32_run), "--out", str(tiny_llama)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "choose another --out or remove it" in err[0]
    assert tree_hashes(tiny_llama) == before and set(tiny_llama.parent.iterdir()) == siblings

    # Another run's merge is not ours to replace either.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    (foreign / MERGE_MARKER).write_text(json.dumps({"run_dir": str(tmp_path / "another-run")}))
    assert main(["merge", str(fp32_run), "--out", str(foreign)]) == 2
    assert "holds the merged model of another run" in capsys.readouterr().err
    assert (foreign / "config.json").read_text() == "{}"

    # This run's own earlier merge is replaced; the marker says which run wrote the folder.
    out = tmp_path / "mine"
    first = merge_run(fp32_run, examples=4, out=out)
    (out / "stale.txt").write_text("from the first merge")
    second = merge_run(fp32_run, examples=4, out=out)
    assert second["written"] >= first["written"] and not (out / "stale.txt").exists()
    marker = json.loads((out / MERGE_MARKER).read_text())
    assert marker == {"run_dir": str(fp32_run.resolve()), "base": "original", "dtype": "fp32",
                      "written": second["written"]}
    assert AutoModelForCausalLM.from_pretrained(out).config.architectures == ["LlamaForCausalLM"]


def test_a_merge_that_cannot_be_written_keeps_the_earlier_merge(fp32_run, tmp_path, capsys, monkeypatch):
    """A full disk while writing the merged model: one line saying what to do, the earlier merge in --out
    untouched, no temporary folder left (the same folder writer as checkpoints and adapters)."""
    import safetensors
    import transformers.modeling_utils

    out = tmp_path / "merged"
    merge_run(fp32_run, examples=4, out=out)
    before = tree_hashes(out)

    def full_disk(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    assert main(["merge", str(fp32_run), "--examples", "4", "--out", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lora-ft:")]  # not the bars
    assert len(err) == 1 and f"could not write {out}" in err[0] and "No space left on device" in err[0]
    assert "run lora-ft merge again" in err[0] and "--resume" not in err[0]
    assert tree_hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_nf4_adapter_card_loads_the_base_quantized_as_in_training(nf4_run, tmp_path, capsys, monkeypatch):
    """The card's snippet, run as written, reproduces the evaluated adapter model (nf4 base); the old snippet
    (the adapter on the full-precision base) did not."""
    from huggingface_hub import ModelCard
    from peft import AutoPeftModelForCausalLM

    # The published adapter names its base by the folder's name (never this machine's path to it): run the snippet
    # where that name is the base's folder, as the Hub id would be on the Hub.
    monkeypatch.chdir(Path(open_run(nf4_run).recipe.model.name).parent)

    assert main(["push", str(nf4_run), "--repo", "alice/tiny-nf4", "--dry-run"]) == 0
    capsys.readouterr()
    folder = nf4_run / "hub"
    card = ModelCard.load(folder / "README.md")
    code = card.text.split("## Usage", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    ast.parse(code)
    recipe = open_run(nf4_run).recipe
    assert 'bnb_4bit_quant_type="nf4"' in code and f"bnb_4bit_use_double_quant={recipe.model.double_quant}" in code

    # Run the snippet up to the model load, with the Hub id replaced by the folder that would be uploaded.
    lines = code.splitlines()
    load = next(i for i, line in enumerate(lines) if line.startswith("model = "))
    namespace: dict = {}
    exec("\n".join(lines[: load + 1]).replace('"alice/tiny-nf4"', repr(str(folder))), namespace)
    model = namespace["model"].eval()
    tok = AutoTokenizer.from_pretrained(folder)
    reference = load_adapter_model(open_run(nf4_run), "cpu", tok)
    assert model.get_base_model().is_loaded_in_4bit
    trained = reference.get_base_model().config.quantization_config.to_dict()
    shown = model.get_base_model().config.quantization_config.to_dict()
    keys = ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")
    assert {k: shown[k] for k in keys} == {k: trained[k] for k in keys}
    texts = chat_texts(nf4_run)
    ref = logits_on(reference, tok, texts)
    # Same kernel as lora_ft's reference: on AVX512-BF16 CPUs bitsandbytes' inference path re-packs the weights and
    # computes in bf16 (KL 1.9e-4 here), which is a kernel difference, not a different model.
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    assert kl(ref, logits_on(model, tok, texts)).mean().item() < 1e-6
    full_precision = AutoPeftModelForCausalLM.from_pretrained(folder).eval()
    assert kl(ref, logits_on(full_precision, tok, texts)).mean().item() > KL_LIMITS["fp32"]


def sigterm_inside(written: list, path: Path) -> None:
    """SIGTERM while ``path`` is provably being written: it must be on disk, partly written (the caller holds the
    rest), and is noted in ``written``. lora_ft's handler runs as soon as ``os.kill`` returns, so the signal lands
    inside the write. (The other writing commands' tests, in test_hub/test_infer/test_export, use this too.)"""
    import os
    import signal

    assert path.is_file() and path.stat().st_size > 0, path
    written.append((path, path.stat().st_size))
    os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_during_the_save_of_a_merge_leaves_everything_as_it_was(fp32_run, tmp_path, capsys, monkeypatch):
    """SIGTERM landed inside the write of the merged weights (half of model.safetensors on disk, in the merge's
    temporary folder): one line, exit 143, no half-written folder, the earlier merge and merge_report.json
    untouched, the run unlocked."""
    from safetensors.torch import save
    from transformers import modeling_utils

    out = tmp_path / "m"
    assert main(["merge", str(fp32_run), "--out", str(out), "--examples", "4"]) == 0
    capsys.readouterr()
    before = tree_hashes(out), (fp32_run / "merge_report.json").read_bytes()
    written = []

    def half_then_signal(tensors, filename, metadata=None):  # transformers' safetensors writer, half at a time
        data = save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            sigterm_inside(written, Path(filename))
            f.write(data[len(data) // 2 :])

    monkeypatch.setattr(modeling_utils, "safe_save_file", half_then_signal)
    assert main(["merge", str(fp32_run), "--out", str(out), "--examples", "4", "--dtype", "bf16"]) == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("lora-ft: interrupted (SIGTERM) during lora-ft merge; nothing of this merge was saved (an earlier "
                   "merged model and merge_report.json are as they were); run the command again to start over")
    assert (tree_hashes(out), (fp32_run / "merge_report.json").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no .m.tmp, no .m.old
    assert not (fp32_run / ".lora_ft.lock").exists()
    [(partial, size)] = written
    assert partial == tmp_path / ".m.tmp" / "model.safetensors" and size > 1000
