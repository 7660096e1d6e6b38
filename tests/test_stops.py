"""shipping/stops.py: the export gate refuses a merged model or GGUF file that no longer stops where the adapter
model stops (an end-of-turn token lost on the way), and passes a faithful one."""

import json

import gguf
import pytest

from lora_ft.errors import FidelityError
from lora_ft.shipping import merge as merge_module
from lora_ft.shipping.export import export_run
from lora_ft.shipping.merge import merge_run


def test_a_faithful_merge_stops_as_often_as_the_adapter_model(answering_run, tmp_path):
    entry = merge_run(answering_run, out=tmp_path / "merged", examples=12)
    assert entry["passed"] and entry["stops_ok"] and entry["stop_examples"] == 12
    assert entry["stop_rate_adapter"] >= 0.9 and entry["stop_rate_merged"] == entry["stop_rate_adapter"]


def test_a_merge_whose_generation_config_lost_the_end_token_is_refused(answering_run, tmp_path, monkeypatch):
    real = merge_module.build_merged

    def lost_eos(*args, **kwargs):  # what a base whose generation config names the end-of-text token does
        model = real(*args, **kwargs)
        model.generation_config.eos_token_id = 0
        return model

    monkeypatch.setattr(merge_module, "build_merged", lost_eos)
    with pytest.raises(FidelityError, match=r"stop less often than the adapter model's \(stop rate 0.00 vs 1.00 on "
                                            r"12 prompts, margin 0.17\); it stops only at token ids \[0\]"):
        merge_run(answering_run, out=tmp_path / "broken", examples=12)
    assert not (tmp_path / "broken").exists()  # nothing saved
    report = json.loads((answering_run / "merge_report.json").read_text())
    (refused,) = [e for e in report.values() if e["out"].endswith("broken")]
    assert refused["kl_mean"] < 1e-6 and not refused["stops_ok"] and not refused["saved"]  # logits alone pass


def test_a_gguf_file_whose_metadata_names_another_end_token_is_refused(answering_run, tmp_path, monkeypatch):
    ok = export_run(answering_run, "f16", out=tmp_path / "ok.gguf", examples=12)
    assert ok["passed"] and ok["stops_ok"] and ok["stop_rate_gguf"] == ok["stop_rate_adapter"] >= 0.9
    real = gguf.GGUFWriter.add_eos_token_id
    monkeypatch.setattr(gguf.GGUFWriter, "add_eos_token_id", lambda self, _id: real(self, 0))
    with pytest.raises(FidelityError, match="stop less often than the adapter model's"):
        export_run(answering_run, "f16", out=tmp_path / "broken.gguf", examples=12)
    assert not (tmp_path / "broken.gguf").exists()
    refused = json.loads((answering_run / "export_report.json").read_text())["gguf-f16"]
    assert refused["kl_mean"] < 1e-3 and refused["stop_rate_gguf"] == 0 and not refused["saved"]
