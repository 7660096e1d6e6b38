"""lora-ft compare: two real runs side by side (the recipe difference, how far each trained, every metric before and
after, samples of the same prompts next to each other, both runs' curves in one figure), printed and written as
Markdown; an unfinished run or one being written is compared as it is and said so; bad input is one line."""

import json
import os
import re
import shutil
import struct

import pytest
from conftest import make_recipe

from lora_ft.cli import main
from lora_ft.lock import RunLock, read_holder
from lora_ft.run import LOCK, RESULTS, RUN_INFO, SAMPLES
from lora_ft.shipping.compare import build_figure, compare_runs, loss_curves, split_results


def _samples(name: str, prompts: list[tuple[str, str]]) -> str:
    return "".join(json.dumps({"prompt": p, "reference": r, "before": f"base answer {i}",
                               "after": f"{name} answer {i}"}) + "\n" for i, (p, r) in enumerate(prompts))


@pytest.fixture(scope="module")
def runs(tiny_llama, chat_data, tmp_path_factory):
    """Two 6-step runs of the tiny Llama that differ only in train.lr, each with a samples.jsonl of the first
    validation prompts (the same prompts, each run's own answers)."""
    from lora_ft.training.trainer import train

    root = tmp_path_factory.mktemp("compare")
    rows = [json.loads(x) for x in chat_data["validation"].read_text().splitlines()]
    prompts = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows[:4]]
    for name, lr in (("fast", 1e-2), ("slow", 1e-3)):
        train(make_recipe(tiny_llama, chat_data, root / name, train={"max_steps": 6, "lr": lr, "eval_every": 2}))
        (root / name / SAMPLES).write_text(_samples(name, prompts))
    return {"fast": root / "fast", "slow": root / "slow", "prompts": prompts}


def _copy(runs, name, tmp_path):
    return shutil.copytree(runs[name], tmp_path / name)


def _row(text: str, *first: str) -> list[str]:
    """The cells of the printed table row that starts with ``first`` (columns are 2+ spaces apart)."""
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[:len(first)] == list(first):
            return cells
    raise AssertionError(f"no row {first} in:\n{text}")


def _compare(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main(["compare", *map(str, argv)])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_the_printed_tables_hold_the_recipe_difference_steps_and_every_metric_before_and_after(runs, tmp_path,
                                                                                             capsys):
    rc, out, _ = _compare(capsys, runs["fast"], runs["slow"], "--out", tmp_path / "cmp")
    assert rc == 0
    # The only recipe differences: the learning rate and the head's, which follows it (output_dir, which every run
    # has its own of, is left out).
    assert _row(out, "train.lr") == ["train.lr", "0.01", "0.001"]
    assert "slow against fast: train.head_lr 0.01 → 0.001, train.lr 0.01 → 0.001" in out
    table = out.split("recipe differences\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in table[2:-1]] == ["train.head_lr", "train.lr"]
    info = {n: json.loads((runs[n] / RUN_INFO).read_text()) for n in ("fast", "slow")}
    assert _row(out, "best step") == ["best step", str(info["fast"]["best_step"]), str(info["slow"]["best_step"])]
    assert _row(out, "steps done") == ["steps done", "6", "6"]
    assert _row(out, "status") == ["status", "finished", "finished"]
    results = {n: json.loads((runs[n] / RESULTS).read_text()) for n in ("fast", "slow")}
    assert results["fast"]["after"]["validation"]["loss"] != results["slow"]["after"]["validation"]["loss"]
    shown = 0
    for split in ("validation", "test"):
        for metric in results["fast"]["after"][split]:
            cells = [f"{results[n]['before'][split][metric]:.5g} → {results[n]['after'][split][metric]:.5g}"
                     for n in ("fast", "slow")]
            assert _row(out, split, metric) == [split, metric, *cells]
            shown += 1
    assert shown >= 4  # loss and perplexity of both splits at least


def test_samples_of_the_same_prompt_stand_side_by_side_and_are_matched_by_prompt_not_position(runs, tmp_path,
                                                                                            capsys):
    slow = _copy(runs, "slow", tmp_path)
    prompts = runs["prompts"]
    # slow's samples in another order, its first prompt missing: fast's first prompt is not slow's first row
    rows = [json.loads(x) for x in (slow / SAMPLES).read_text().splitlines()]
    (slow / SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in reversed(rows[1:])))
    rc, out, _ = _compare(capsys, runs["fast"], slow, "--out", tmp_path / "cmp", "--samples", "2")
    assert rc == 0
    lines = out.splitlines()
    start = lines.index(next(x for x in lines if x.startswith("[1] prompt:")))
    block = [re.split(r":\s+", x.strip(), maxsplit=1) for x in lines[start:start + 10]]
    assert block == [["[1] prompt", prompts[1][0]], ["reference", prompts[1][1]],
                     ["before training", "base answer 1"], ["fast", "fast answer 1"], ["slow", "slow answer 1"],
                     ["[2] prompt", prompts[2][0]], ["reference", prompts[2][1]],
                     ["before training", "base answer 2"], ["fast", "fast answer 2"], ["slow", "slow answer 2"]]
    assert "the runs' first prompts differ: shown are the first 2 prompts they all have" in out
    # samples from other data: said, and nothing set side by side
    other = [("What is red?", "A tomato.")]
    (slow / SAMPLES).write_text(_samples("slow", other))
    rc, out, _ = _compare(capsys, runs["fast"], slow, "--out", tmp_path / "cmp")
    assert rc == 0 and "share no prompt" in out and "prompt:" not in out


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_the_report_holds_what_was_printed_and_the_figure_overlays_both_runs_curves(runs, tmp_path, capsys,
                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _compare(capsys, runs["fast"], runs["slow"])  # default --out: ./compare-fast-vs-slow
    folder = tmp_path / "compare-fast-vs-slow"
    assert rc == 0 and "report written to compare-fast-vs-slow/compare.md" in out
    md = (folder / "compare.md").read_text()
    comparison = compare_runs([runs["fast"], runs["slow"]], None)
    assert comparison.markdown() == md and comparison.text() in out
    for table in comparison.tables:  # every printed row, as a Markdown row
        for row in table.rows:
            assert _row(out, *row[:2]) == row
            assert "| " + " | ".join(row) + " |" in md
    assert "| fast | fast answer 0 |" in md and "| before training | base answer 0 |" in md
    assert "![training and validation loss of every run](curves.png)" in md
    assert _png_size(folder / "curves.png") == (1210, 440)  # 11 x 4 inches at 110 dpi

    fig = build_figure(comparison.runs)
    train_ax, val_ax = fig.axes
    assert [line.get_label() for line in train_ax.lines] == ["fast", "slow"]
    assert [line.get_label() for line in val_ax.lines] == ["fast", "slow"]
    for name, train_line, val_line in zip(("fast", "slow"), train_ax.lines, val_ax.lines, strict=True):
        rows = [json.loads(x) for x in (runs[name] / "metrics.jsonl").read_text().splitlines()]
        train = [(r["step"], r["loss"]) for r in rows if "split" not in r and "loss" in r]
        val = [(r["step"], r["loss"]) for r in rows if r.get("split") == "validation" and not r.get("final")]
        assert len(train) == 6 and len(val) >= 3  # steps 1..6; validation at 0, 2, 4, 6
        assert list(zip(train_line.get_xdata(), train_line.get_ydata(), strict=True)) == train
        assert list(zip(val_line.get_xdata(), val_line.get_ydata(), strict=True)) == val
    # A restored best adapter's final validation row, logged at the last step, is no point of the curve.
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "split": "validation", "loss": 2.0},
            {"step": 4, "split": "validation", "loss": 2.5}, {"step": 4, "split": "validation", "final": True,
                                                                "loss": 2.0}, {"step": 4, "split": "test", "loss": 2.2}]
    assert loss_curves(rows) == ([(1, 3.0)], [(2, 2.0), (4, 2.5)])


def test_every_metric_any_run_has_is_shown_and_blank_where_a_run_lacks_it(runs, tmp_path, capsys):
    fast, slow = _copy(runs, "fast", tmp_path), _copy(runs, "slow", tmp_path)
    results = json.loads((fast / RESULTS).read_text())
    results["before"]["validation"]["rougeL"], results["after"]["validation"]["rougeL"] = 0.25, 0.5
    (fast / RESULTS).write_text(json.dumps(results))
    results = json.loads((slow / RESULTS).read_text())
    results["after"]["test"]["chrf"] = 41.5  # only after: the before cell says it is missing
    (slow / RESULTS).write_text(json.dumps(results))
    comparison = compare_runs([fast, slow], tmp_path / "cmp")
    rows = {(r[0], r[1]): r[2:] for r in comparison.tables[2].rows}
    assert rows[("validation", "rougeL")] == ["0.25 → 0.5", ""]
    assert rows[("test", "chrf")] == ["", "- → 41.5"]
    union = {(split, m) for run in (fast, slow)
             for split, (b, a) in split_results(json.loads((run / RESULTS).read_text())).items() for m in [*b, *a]}
    assert set(rows) == union and len(union) == 2 * 4 + 2  # loss, examples, perplexity, tokens; rougeL, chrf
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| validation | rougeL | 0.25 → 0.5 |  |" in md and "| test | chrf |  | - → 41.5 |" in md


def test_an_unfinished_run_is_compared_as_far_as_it_got_and_said_so(runs, tmp_path, capsys):
    slow = _copy(runs, "slow", tmp_path)
    (slow / RESULTS).unlink()
    info = json.loads((slow / RUN_INFO).read_text())
    for key in ("best_step", "steps_done", "stopped"):  # written only at the end of training
        info.pop(key)
    (slow / RUN_INFO).write_text(json.dumps(info))
    rc, out, _ = _compare(capsys, runs["fast"], slow, "--out", tmp_path / "cmp")
    assert rc == 0
    assert "note: slow has no eval_results.json (training has not finished)" in out
    assert _row(out, "status") == ["status", "finished", "unfinished"]
    assert _row(out, "steps done") == ["steps done", "6", "6 (logged so far)"]
    fast = json.loads((runs["fast"] / RESULTS).read_text())
    loss = f"{fast['before']['validation']['loss']:.5g} → {fast['after']['validation']['loss']:.5g}"
    assert _row(out, "validation", "loss") == ["validation", "loss", loss]  # slow's cell blank


def test_a_run_being_written_is_named_in_a_warning_and_its_lock_is_left_alone(runs, tmp_path, capsys):
    slow = _copy(runs, "slow", tmp_path)
    with RunLock(slow / LOCK, "output_dir slow"):  # this process stands in for a training writing into slow
        with (slow / "metrics.jsonl").open("a") as f:
            f.write('{"step": 7, "lo')  # a row half-appended at this moment
        rc, out, err = _compare(capsys, runs["fast"], slow, "--out", tmp_path / "cmp")
        assert rc == 0
        assert f"is being written now by pid {os.getpid()}" in err
        assert _row(out, "status") == ["status", "finished", "being written"]
        assert read_holder(slow / LOCK)["pid"] == os.getpid()  # still ours: compare took no lock
    assert not (runs["fast"] / LOCK).exists()  # nor created a lock file in a run nobody writes


@pytest.mark.parametrize("argv, needle", [
    (["{fast}"], "give at least two run folders to compare (got 1: "),
    (["{fast}", "{tmp}"], "is not a lora_ft run (no run_config.yaml)"),
    (["{fast}", "{fast}"], "is given twice; give each run once"),
    (["{fast}", "{fast}/../fast"], "are the same folder; give each run once"),
    (["{fast}", "{slow}", "--out", "{fast}/adapter/cmp"], "lies among the outputs of run"),
    (["{fast}", "{slow}", "--out", "{fast}"], "is a run folder, whose curves.png is the run's own"),
    (["{fast}", "{slow}", "--out", "{tmp}/file"], "is a file; give a folder"),
    (["{fast}", "{slow}", "--samples", "-1"], "argument --samples: must be at least 0 (got -1)"),
    (["{fast}", "{bad}"], "samples.jsonl line 2 is not valid JSON"),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, needle, runs, tmp_path, capsys, monkeypatch):
    bad = _copy(runs, "slow", tmp_path)
    (bad / SAMPLES).write_text('{"prompt": "a", "after": "b"}\n{"prompt": \n{"prompt": "c"}\n')
    (tmp_path / "file").write_text("x")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, err = _compare(capsys, *(a.format(fast=runs["fast"], slow=runs["slow"], tmp=tmp_path, bad=bad)
                                      for a in argv))
    assert rc == 2 and out == ""
    assert needle in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (runs["fast"] / "adapter" / "cmp").exists()
