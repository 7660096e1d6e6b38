"""lora-ft generate / chat / predict on tiny runs, with the adapter and with the merged model."""

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_recipe

from lora_ft.cli import main
from lora_ft.shipping.infer import chat, generate_reply, load_for_inference
from lora_ft.shipping.merge import merge_run
from lora_ft.training.trainer import train

QUESTIONS = ["What does the cow say?", "Which sound does a owl make?"]


@pytest.fixture(scope="module")
def chat_run(tiny_llama, chat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "chat-nf4"
    recipe = make_recipe(tiny_llama, chat_data, out, model={"quant": "nf4"}, train={"max_steps": 20})
    recipe.data.max_eval_examples = 8
    train(recipe)
    return out


@pytest.fixture(scope="module")
def cls_run(tiny_bert, cls_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cls"
    train(make_recipe(tiny_bert, cls_data, out, model={"task": "sequence_classification"},
                      train={"max_steps": 20, "lr": 3e-3, "micro_batch_size": 30}))
    return out


def _lines(capsys) -> list[str]:
    return capsys.readouterr().out.strip().splitlines()


@torch.no_grad()
def greedy(model, tok, question: str, max_new_tokens: int = 16) -> str:
    """Greedy decoding by hand (full forward each step, argmax): what ``generate`` must reproduce."""
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    new = []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=ids).logits[0, -1].argmax())
        if token == tok.eos_token_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return tok.decode(new, skip_special_tokens=True).strip()


def test_generate_with_adapter_and_merged_model(chat_run, capsys):
    args = ["generate", str(chat_run), "--max-new-tokens", "16"] + [a for q in QUESTIONS for a in ("--prompt", q)]
    assert main(args) == 0
    adapter_replies = _lines(capsys)
    im = load_for_inference(chat_run)
    assert adapter_replies == [greedy(im.model, im.tokenizer, q) for q in QUESTIONS]
    assert all(adapter_replies) and adapter_replies[0] != adapter_replies[1]
    with im.model.disable_adapter():  # the adapter is in use: the base alone answers differently
        assert [greedy(im.model, im.tokenizer, q) for q in QUESTIONS] != adapter_replies

    merge_run(chat_run, examples=8)
    assert main(args + ["--merged"]) == 0
    assert _lines(capsys) == adapter_replies
    assert main(["generate", str(chat_run / "merged"), "--prompt", QUESTIONS[0], "--max-new-tokens", "16"]) == 0
    assert _lines(capsys) == adapter_replies[:1]


def test_chat_streams_replies_and_keeps_the_conversation(chat_run, monkeypatch, capsys):
    im = load_for_inference(chat_run)
    out = io.StringIO()
    messages = chat(im, io.StringIO("What does the dog say?\n\nWhat does the frog say?\n"), out, max_new_tokens=16)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == greedy(im.model, im.tokenizer, "What does the dog say?")
    # Streamed text is the replies, and the second reply was generated with the first exchange as context.
    assert out.getvalue().split("\n")[:2] == [messages[1]["content"], messages[3]["content"]]
    assert messages[3]["content"] == generate_reply(im, messages[:3], max_new_tokens=16)

    after_reset = chat(im, io.StringIO("What does the dog say?\n/reset\nWhat does the bee say?\n/exit\nignored\n"),
                       io.StringIO(), max_new_tokens=16)
    assert [m["content"] for m in after_reset if m["role"] == "user"] == ["What does the bee say?"]

    # The command reads stdin and streams to stdout.
    monkeypatch.setattr("sys.stdin", io.StringIO("What does the cow say?\n"))
    assert main(["chat", str(chat_run), "--max-new-tokens", "16"]) == 0
    assert greedy(im.model, im.tokenizer, "What does the cow say?") in capsys.readouterr().out


def test_predict_writes_label_names_and_probabilities(cls_run, cls_data, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(cls_run), "--data", str(cls_data["test"]), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    source = [json.loads(x) for x in Path(cls_data["test"]).read_text().splitlines()]
    labels = set(json.loads((cls_run / "run_info.json").read_text())["id2label"].values())
    assert len(rows) == len(source) == summary["examples"]
    for row, src in zip(rows, source, strict=True):
        assert row["text"] == src["text"] and row["label"] == src["label"]
        assert set(row["probabilities"]) == labels and row["prediction"] in labels
        assert sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        assert row["prediction"] == max(row["probabilities"], key=row["probabilities"].get)
    # Same model, same data: the accuracy training reported on the test split.
    after = json.loads((cls_run / "eval_results.json").read_text())["after"]["test"]["accuracy"]
    assert summary["accuracy"] == pytest.approx(after)

    # Merged elsewhere (merge --out DIR): --merged finds it through merge_report.json.
    merge_run(cls_run, examples=30, out=tmp_path / "cls-merged")
    assert not (cls_run / "merged").exists()
    merged_out = tmp_path / "merged.jsonl"
    assert main(["predict", str(cls_run), "--merged", "--data", str(cls_data["test"]), "--out", str(merged_out)]) == 0
    merged_rows = [json.loads(x) for x in merged_out.read_text().splitlines()]
    assert [r["prediction"] for r in merged_rows] == [r["prediction"] for r in rows]
    for a, b in zip(rows, merged_rows, strict=True):
        assert all(abs(a["probabilities"][k] - b["probabilities"][k]) < 1e-4 for k in labels)


def test_wrong_task_or_missing_merge_exit_2(chat_run, cls_run, cls_data, tmp_path, capsys):
    fresh, unmerged = tmp_path / "fresh", tmp_path / "unmerged"
    fresh.mkdir()
    for name in ("run_config.yaml", "run_info.json"):
        (fresh / name).write_bytes((cls_run / name).read_bytes())
    shutil.copytree(fresh, unmerged)
    shutil.copytree(cls_run / "adapter", unmerged / "adapter")
    cases = [
        (["predict", str(chat_run), "--data", str(cls_data["test"])], "use 'lora-ft generate'"),
        (["generate", str(cls_run), "--prompt", "hi"], "use 'lora-ft predict"),
        (["generate", str(tmp_path), "--prompt", "hi"], "neither a lora_ft run"),
        (["predict", str(fresh), "--data", str(cls_data["test"])], "no trained adapter"),
        (["predict", str(unmerged), "--merged", "--data", str(cls_data["test"])], "run 'lora-ft merge"),
    ]
    for args, needle in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_a_signal_while_predictions_are_written_keeps_the_earlier_file(cls_run, cls_data, tmp_path, monkeypatch,
                                                                        capsys):
    """SIGTERM with the first prediction row on disk in the file being written: one line, exit 143, the earlier
    predictions file byte for byte, no temporary file left."""
    from test_merge import sigterm_inside

    from lora_ft.shipping import infer

    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(cls_run), "--data", str(cls_data["test"]), "--out", str(out)]) == 0
    capsys.readouterr()
    before, written = out.read_bytes(), []
    real_rows = infer._predict_rows

    def signal_after_the_first_row(im, ds, need, batch_size, f):
        class Inside:  # the open predictions file, SIGTERM once its first row is on disk
            def write(self, text: str) -> int:
                n = f.write(text)
                f.flush()
                if not written:
                    sigterm_inside(written, Path(f.name))
                return n

        return real_rows(im, ds, need, batch_size, Inside())

    monkeypatch.setattr(infer, "_predict_rows", signal_after_the_first_row)
    assert main(["predict", str(cls_run), "--data", str(cls_data["test"]), "--out", str(out), "--batch-size",
                 "4"]) == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("lora-ft: interrupted (SIGTERM) during lora-ft predict; no predictions file was written (an "
                   "earlier one is as it was); run the command again to start over")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["pred.jsonl"]
    [(partial, size)] = written
    assert partial == tmp_path / ".pred.jsonl.tmp" and 0 < size < len(before)


def test_a_damaged_model_folder_given_instead_of_a_run_is_one_line(tiny_llama, tmp_path, capsys):
    """A merged model copied elsewhere and cut short: `generate FOLDER` names the file, not safetensors' error."""
    from test_errors import error_line

    folder = shutil.copytree(tiny_llama, tmp_path / "merged")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 3])
    assert main(["generate", str(folder), "--prompt", "hi"]) == 2
    assert error_line(capsys.readouterr().err) == (
        f"lora-ft: error: model folder: {folder / 'model.safetensors'} is cut short or corrupt (header: incomplete "
        "metadata, file not fully covered); download or save the model again")
