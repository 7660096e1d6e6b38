"""lora-ft export --format gguf on tiny runs: the fidelity gate, the report, --force, the Modelfile, refusals."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from lora_ft.cli import main
from lora_ft.errors import FidelityError
from lora_ft.lock import RunLock
from lora_ft.run import LOCK, load_adapter_model, load_run_tokenizer, open_run
from lora_ft.shipping import export
from lora_ft.training.trainer import train


def _run(tmp_path_factory, tiny_llama, chat_data, name, **model):
    out = tmp_path_factory.mktemp("runs") / name
    splits = {k: v for k, v in chat_data.items() if k != "test"}
    recipe = make_recipe(tiny_llama, splits, out, model=model, train={"max_steps": 12, "eval_every": None},
                         data={"system_prompt": "Answer like a farmer."})
    recipe.data.max_eval_examples = 12
    train(recipe)
    return out


@pytest.fixture(scope="module")
def fp32_run(tiny_llama, chat_data, tmp_path_factory):
    return _run(tmp_path_factory, tiny_llama, chat_data, "fp32")


def entry_of(capsys) -> dict:
    printed = capsys.readouterr().out
    return json.loads(printed[: printed.rindex("}") + 1])


@torch.no_grad()
def answer_logits(model, tok, run: Path) -> torch.Tensor:
    rows = [json.loads(x) for x in Path(open_run(run).recipe.data.validation).read_text().splitlines()[:4]]
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    return torch.cat([model(**tok(t, return_tensors="pt")).logits[0] for t in texts])


def test_f16_export_reproduces_the_adapter_model_and_runs_in_transformers(fp32_run, capsys):
    assert main(["export", str(fp32_run), "--format", "gguf", "--quant", "f16"]) == 0
    entry = entry_of(capsys)
    path = fp32_run / "gguf" / f"{fp32_run.name}-F16.gguf"
    assert entry["out"] == str(path.resolve()) and path.is_file() and entry["size_bytes"] == path.stat().st_size
    # A random tiny model has near-tied logits: f16 rounding may flip the top-1 of one position in a hundred
    # (it did once the fixture's run packed its batches); the KL is what says the file reproduces the model.
    assert entry["passed"] and entry["saved"] and entry["top1_agreement"] >= 0.99 and entry["kl_mean"] < 1e-5
    assert entry["examples"] == 24  # the whole validation file (--examples 64)
    assert entry["tokenizer"] == {"texts": 24, "identical": 24, "first_mismatch": None, "add_bos_eos": True,
                                  "special_ids": True, "chat_template": True}
    assert json.loads((fp32_run / "export_report.json").read_text())["gguf-f16"] == entry
    # Independently of the gate: the file, loaded alone, gives the adapter model's logits (to f16 rounding).
    tok = load_run_tokenizer(open_run(fp32_run))
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref = answer_logits(load_adapter_model(open_run(fp32_run), "cpu", tok), tok, fp32_run)
    assert (answer_logits(gguf_model, tok, fp32_run) - ref).abs().max() < 0.05
    modelfile = (path.parent / "Modelfile").read_text()
    assert f"FROM ./{path.name}" in modelfile and 'SYSTEM """Answer like a farmer."""' in modelfile
    assert "TEMPLATE" in modelfile and entry["modelfile_template"]


def test_nf4_run_is_exported_from_the_weights_its_adapter_was_trained_on(tiny_llama, chat_data, tmp_path_factory):
    run = _run(tmp_path_factory, tiny_llama, chat_data, "nf4", quant="nf4")
    entry = export.export_run(run, "f32")
    # fp32 all the way from the de-quantized NF4 base: only float noise separates the file from the adapter model
    # (the original weights would give the adapter's whole effect as KL, ~0.1 here).
    assert entry["passed"] and entry["kl_mean"] < 1e-6 and entry["tensor_types"] == {"F32": 21}


def test_an_export_above_its_limit_is_refused_unless_forced(fp32_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(export.KL_LIMITS, "q4_0", 1e-12)
    out = tmp_path / "m-Q4_0.gguf"
    assert main(["export", str(fp32_run), "--quant", "q4_0", "--out", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lora-ft:")]
    assert len(err) == 1 and "--force" in err[0]
    assert err[0].startswith("lora-ft: error: the GGUF file does not reproduce the adapter model: mean KL")
    assert not out.exists() and not (tmp_path / "Modelfile").exists() and list(tmp_path.iterdir()) == []
    refused = json.loads((fp32_run / "export_report.json").read_text())["gguf-q4_0"]
    assert not refused["passed"] and not refused["saved"] and refused["kl_mean"] > 1e-12

    assert main(["export", str(fp32_run), "--quant", "q4_0", "--out", str(out), "--force"]) == 0
    kept = entry_of(capsys)
    assert out.is_file() and not kept["passed"] and kept["saved"] and (tmp_path / "Modelfile").is_file()
    assert kept["kl_mean"] == pytest.approx(refused["kl_mean"])
    # ... and the same --out may be exported to again: it is this run's file now
    assert main(["export", str(fp32_run), "--quant", "q4_0", "--out", str(out), "--force"]) == 0


def test_flags_and_unsupported_models_are_refused_before_loading(fp32_run, tmp_path, capsys):
    foreign = tmp_path / "someone-elses.gguf"
    foreign.write_bytes(b"GGUF")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "Modelfile").write_text("FROM llama3\n")
    cases = {("--quant", "q3_k"): "--quant q3_k: choose one of f32, f16",
             ("--out", str(tmp_path / "m.bin")): "ending in .gguf",
             ("--out", str(foreign)): "is not a GGUF file exported from this run",
             ("--out", str(tmp_path / "theirs" / "m.gguf")): "was not written by lora_ft"}
    for flags, message in cases.items():
        assert main(["export", str(fp32_run), *flags]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lora-ft:")]
        assert len(err) == 1 and message in err[0], err
    assert foreign.read_bytes() == b"GGUF"
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it, in one line
        main(["export", str(fp32_run), "--examples", "0"])
    assert exit_.value.code == 2 and "argument --examples" in capsys.readouterr().err

    # A run on a base the export cannot map (GPT-2 here): one line naming the supported architectures.
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(gpt2)
    other = Path(shutil.copytree(fp32_run, tmp_path / "other-run", ignore=shutil.ignore_patterns("gguf")))
    info = json.loads((other / "run_info.json").read_text())
    (other / "run_info.json").write_text(json.dumps({**info, "source": str(gpt2)}))
    assert main(["export", str(other)]) == 2
    assert "GGUF export supports Llama (incl. SmolLM2), Mistral, Qwen2, Qwen3; this run's base is GPT2LMHeadModel" \
        in capsys.readouterr().err


def test_a_classifier_run_is_refused_in_one_line_before_anything_is_written(tiny_bert, cls_data, tmp_path, capsys):
    out = tmp_path / "cls"
    recipe = make_recipe(tiny_bert, cls_data, out, model={"task": "sequence_classification"}, train={"max_steps": 2})
    recipe.data.max_eval_examples = 10
    train(recipe)
    assert main(["export", str(out), "--quant", "f16"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lora-ft:")]
    assert err == [f"lora-ft: error: GGUF export is for causal LM runs; {out} is a sequence_classification run"]
    assert not (out / "gguf").exists() and not (out / "export_report.json").exists()


def test_a_mismatching_tokenizer_fails_the_gate(fp32_run, tmp_path, monkeypatch):
    # Simulate a writer that loses a merge rule: the file's tokenizer then splits some words differently.
    real = export.write_gguf

    def lossy(model, tokenizer, path, quant, name):
        tok = AutoTokenizer.from_pretrained(open_run(fp32_run).adapter_dir)
        spec = json.loads(tok.backend_tokenizer.to_str())
        spec["model"]["merges"] = spec["model"]["merges"][:-40]
        (tmp_path / "tok").mkdir(exist_ok=True)
        tok.save_pretrained(tmp_path / "tok")
        (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
        return real(model, AutoTokenizer.from_pretrained(tmp_path / "tok"), path, quant, name)

    monkeypatch.setattr(export, "write_gguf", lossy)
    with pytest.raises(FidelityError, match="tokenizer read back from the file differs"):
        export.export_run(fp32_run, "f32", out=tmp_path / "out" / "m.gguf")
    report = json.loads((fp32_run / "export_report.json").read_text())["gguf-f32"]
    assert report["kl_mean"] < 1e-6 and report["tokenizer"]["identical"] < report["tokenizer"]["texts"]
    assert not (tmp_path / "out" / "m.gguf").exists()


def test_an_export_is_refused_while_another_command_holds_the_run_and_writes_nothing(fp32_run, tmp_path, capsys):
    report = fp32_run / "export_report.json"
    before = report.read_bytes() if report.is_file() else None
    out = tmp_path / "m-F32.gguf"
    with RunLock(fp32_run / LOCK, f"output_dir {fp32_run}"):  # e.g. a training resumed into the run
        assert main(["export", str(fp32_run), "--quant", "f32", "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lora-ft:")]
    assert len(err) == 1 and "is in use by another lora_ft process" in err[0] and f"pid {os.getpid()}" in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert (report.read_bytes() if report.is_file() else None) == before
    # Once the holder is gone, the same export goes through and unlocks the run behind it.
    assert main(["export", str(fp32_run), "--quant", "f32", "--out", str(out)]) == 0
    assert out.is_file() and not (fp32_run / LOCK).exists()


@pytest.mark.slow
def test_the_smollm2_quickstart_exports_to_q8_0_within_its_limit(quickstart_chat_run, tmp_path):
    run = Path(shutil.copytree(quickstart_chat_run[0], tmp_path / "run"))  # the export writes into its run
    entry = export.export_run(run, "q8_0", examples=16)
    assert entry["passed"] and entry["kl_mean"] < export.KL_LIMITS["q8_0"] and entry["top1_agreement"] > 0.95
    assert entry["tokenizer"]["identical"] == entry["tokenizer"]["texts"] == 16
    assert abs(entry["loss_gguf"] - entry["loss_adapter"]) < 0.05
    modelfile = (Path(entry["out"]).parent / "Modelfile").read_text()
    assert "named SmolLM" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_a_signal_while_the_gguf_is_written_keeps_the_earlier_export_and_report(fp32_run, tmp_path, monkeypatch,
                                                                                 capsys):
    """SIGTERM with the GGUF's header and metadata on disk and its tensors not yet: one line, exit 143, the earlier
    export, its Modelfile and export_report.json byte for byte, no partial file left, the run unlocked."""
    import gguf
    from test_merge import sigterm_inside

    out = tmp_path / "m-F32.gguf"
    assert main(["export", str(fp32_run), "--quant", "f32", "--out", str(out)]) == 0
    capsys.readouterr()
    report = fp32_run / "export_report.json"
    def files() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in tmp_path.iterdir()} | {report.name: report.read_bytes()}

    before, written = files(), []
    assert set(before) == {out.name, "Modelfile", report.name}
    real_tensors = gguf.GGUFWriter.write_tensors_to_file

    def signal_before_the_tensors(self, *args, **kwargs):
        for f in self.fout:
            f.flush()
        sigterm_inside(written, Path(self.fout[0].name))
        return real_tensors(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", signal_before_the_tensors)
    assert main(["export", str(fp32_run), "--quant", "f32", "--out", str(out)]) == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("lora-ft: interrupted (SIGTERM) during lora-ft export; nothing was written; run the command again "
                   "to start over")
    assert files() == before and not (fp32_run / LOCK).exists()  # and no partial file beside the export
    [(partial, size)] = written
    assert partial.parent == tmp_path and ".partial" in partial.name and 0 < size < len(before[out.name])
