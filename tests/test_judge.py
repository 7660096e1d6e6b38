"""shipping/judge.py: `lora-ft eval` judges the adapter model, the merged folder and the GGUF file with one suite."""

import json

import pytest

from lora_ft.cli import main
from lora_ft.shipping.export import export_run
from lora_ft.shipping.judge import judge_run, judge_table
from lora_ft.shipping.merge import merge_run
from lora_ft.training.evaluation import evaluate_run

GENERATED = ("rougeL", "chrf", "exact_match", "stop_rate", "length_ratio", "answer_tokens")


@pytest.fixture(scope="module")
def exported(answering_run):
    merge_run(answering_run, examples=12)
    export_run(answering_run, "q8_0", examples=12)
    return answering_run


def test_the_adapter_merged_model_and_gguf_file_are_judged_side_by_side(exported, capsys, chat_data):
    assert main(["eval", str(exported), "--merged", "--gguf", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert list(results) == ["adapter", "merged", "gguf"]
    adapter, merged, gguf = results["adapter"], results["merged"], results["gguf"]
    # The default data is the run's validation file, scored whole (not eval.examples): 24 examples.
    assert adapter["examples"] == merged["examples"] == gguf["examples"] == 24
    assert set(GENERATED) <= set(adapter) and set(GENERATED) <= set(merged) and set(GENERATED) <= set(gguf)
    assert adapter["stop_rate"] >= 0.9 and adapter["rougeL"] > 0.8
    # The merge is exact in fp32: the same greedy answers, the same loss; q8_0 rounds but answers alike.
    for k in GENERATED:
        assert merged[k] == pytest.approx(adapter[k], abs=1e-9), k
    assert merged["loss"] == pytest.approx(adapter["loss"], rel=1e-4)
    assert gguf["stop_rate"] == adapter["stop_rate"] and abs(gguf["rougeL"] - adapter["rougeL"]) < 0.1
    assert gguf["loss"] == pytest.approx(adapter["loss"], rel=0.05)
    # The adapter column is exactly lora-ft eval's own evaluation of the run, generation added.
    alone = evaluate_run(exported, str(chat_data["validation"]), generate=True)
    assert alone == pytest.approx(adapter)


def test_the_table_has_a_row_per_metric_and_a_column_per_model(exported, capsys):
    assert main(["eval", str(exported), "--merged"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["metric", "adapter", "merged"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert {"loss", "perplexity", "examples", *GENERATED} <= set(rows)
    assert rows["examples"] == ["24", "24"] and rows["stop_rate"][0] == rows["stop_rate"][1]
    table = judge_table({"a": {"x": 0.5, "n": 3}, "b": {"x": float("nan")}})
    assert table.splitlines() == ["metric       a    b", "x       0.5000  nan", "n            3    –"]


def test_a_file_given_with_data_is_scored_instead(exported, chat_data, tmp_path):
    rows = chat_data["validation"].read_text().splitlines()[:5]
    (tmp_path / "five.jsonl").write_text("\n".join(rows) + "\n")
    results = judge_run(exported, str(tmp_path / "five.jsonl"))
    assert list(results) == ["adapter"] and results["adapter"]["examples"] == 5
    assert results["adapter"]["answer_tokens"] > 0


def test_asking_for_a_merged_model_that_was_never_written_says_how_to_write_it(answering_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(answering_run, copy, ignore=shutil.ignore_patterns("merged", "gguf", "*_report.json"))
    assert main(["eval", str(copy), "--merged"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # refused before the adapter model is evaluated
    assert err == [f"lora-ft: error: {copy / 'merged'} holds no merged model; run 'lora-ft merge {copy}' first "
                   "(or drop --merged to use the adapter)"]
    assert main(["eval", str(copy), "--gguf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no passing GGUF export is recorded" in err[0]
