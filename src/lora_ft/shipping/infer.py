"""Quick inference on a run: ``lora-ft chat`` / ``generate`` (causal LMs) and ``predict`` (classifiers; reward models
score ``{prompt, completion}`` rows, or both sides of ``{prompt, chosen, rejected}`` pairs).

Each works with the adapter model (the base loaded as training loaded it, plus the adapter: exactly what was
evaluated) or with the merged model (``--merged``: ``RUN_DIR/merged`` or the latest passing ``merge --out DIR``,
or any merged folder given as RUN_DIR).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    TextStreamer,
)

from ..data.cells import Where, check_columns
from ..data.preference import encode_answer, read_answer, read_prompt
from ..data.reading import read_split
from ..errors import RunError, UsageError, first_line
from ..modeling.loading import check_folder, remote_code
from ..modeling.pooling import Pooling, read_pooling
from ..objectives import objective_for
from ..recipe import DataConfig
from ..run import RUN_CONFIG, default_device, load_adapter_model, load_run_tokenizer, merged_folder, open_run
from .embed import predict_embeddings
from .predict_tasks import check_task_columns, predict_rows, task_kind

log = logging.getLogger(__name__)

COMMANDS_HELP = "/reset clears the conversation, /exit (or end of input) quits"


@dataclass
class InferenceModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    causal: bool
    max_length: int | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    tokens_column: str = "tokens"
    pooling: Pooling | None = None
    """An embedding model's pooling (``predict`` embeds, see ``embed.py``); None for the others."""
    data: DataConfig | None = None
    """The run's data section (an embedding run's pair columns, a reward model's prompt and completion columns);
    None for a bare folder."""

    @property
    def reward(self) -> bool:
        """A reward model: one scalar per sequence (``model.task: reward``, or a merged one-label model that is not a
        regression: that one's config says ``problem_type: regression``)."""
        config = self.model.config
        return not self.causal and getattr(config, "num_labels", 0) == 1 and \
            getattr(config, "problem_type", None) != "regression"


def load_for_inference(path: str | Path, merged: bool = False, device: torch.device | str | None = None
                       ) -> InferenceModel:
    """A run folder (adapter model, or ``merged/`` with ``merged=True``) or a merged model folder."""
    path, device = Path(path), torch.device(device) if device else default_device()
    if (path / RUN_CONFIG).is_file():
        run = open_run(path)
        data = run.recipe.data
        cols = dict(max_length=data.max_length, text_column=data.text_column,
                    text_pair_column=data.text_pair_column, label_column=data.label_column,
                    tokens_column=data.tokens_column, data=data)
        if run.recipe.model.task == "embedding":
            cols["pooling"] = read_pooling(run.source(), run.recipe.model.revision)
        if not merged:
            tok = load_run_tokenizer(run)
            model = load_adapter_model(run, device, tok)
            if not run.causal:  # what the merge writes into config.json: problem type, thresholds
                objective = objective_for(run.recipe, tok)
                objective.restore(run.info.get("objective") or {})
                objective.configure(model.config)
            return InferenceModel(model, tok, run.causal, **cols)
        folder = written_merge(run)
        check_folder(folder, "the run's merged model", f"merge again (lora-ft merge {path})", RunError)
        return _load_plain(folder, device, cols, run.recipe.model.trust_remote_code)
    if (path / "config.json").is_file():
        check_folder(path, "model folder", "download or save the model again", RunError)
        return _load_plain(path, device, {})
    raise RunError(f"{path} is neither a lora_ft run (no {RUN_CONFIG}) nor a model folder (no config.json)")


def written_merge(run) -> Path:
    """The run's merged folder (``run.merged_folder``), or the error that says how to write one."""
    folder = merged_folder(run)
    if not (folder / "config.json").is_file():
        raise RunError(f"{folder} holds no merged model; run 'lora-ft merge {run.dir}' first "
                       "(or drop --merged to use the adapter)")
    return folder


def _load_plain(folder: Path, device: torch.device, cols: dict[str, Any], trust: bool = False) -> InferenceModel:
    """A merged folder opens with plain transformers: that is the point of merging. ``trust``: the run's
    ``model.trust_remote_code`` (a bare folder, with no recipe to say so, never runs its code)."""
    try:
        config = AutoConfig.from_pretrained(folder, **remote_code(trust, folder))
    except ValueError as e:  # transformers refuses custom code that was not trusted
        raise RunError(f"{folder}: cannot open the model without running its own code ({first_line(e)}); open it "
                       "through its run (lora-ft chat RUN_DIR --merged), whose recipe sets model.trust_remote_code"
                       ) from None
    if (folder / "modules.json").is_file():  # a sentence-transformers folder (a merged embedding run)
        cols = {**cols, "pooling": read_pooling(str(folder))}
    heads = ("ForSequenceClassification", "ForTokenClassification")
    causal = not any(a.endswith(heads) for a in config.architectures or []) and "pooling" not in cols
    cls = AutoModel if "pooling" in cols else AutoModelForCausalLM if causal \
        else AutoModelForTokenClassification if task_kind(config) == "tokens" else AutoModelForSequenceClassification
    model = cls.from_pretrained(folder, dtype="auto", **remote_code(trust, folder)).to(device).eval()
    return InferenceModel(model, AutoTokenizer.from_pretrained(folder, **remote_code(trust, folder)), causal, **cols)


# ------------------------------------------------------------------------------------------ generation
class _StreamTo(TextStreamer):
    """``TextStreamer`` writes to stdout with ``print``; this writes to any text stream (tests, pipes)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stream: IO[str]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()


def _encode(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], raw: bool) -> dict[str, torch.Tensor]:
    if tok.chat_template and not raw:
        return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    # No chat template (or --raw): the text as is, as a base model would continue it.
    return tok("\n".join(m["content"] for m in messages), return_tensors="pt")


@torch.no_grad()
def generate_reply(im: InferenceModel, messages: list[dict[str, str]], max_new_tokens: int = 256,
                   temperature: float = 0.0, top_p: float = 1.0, raw: bool = False,
                   stream: IO[str] | None = None) -> str:
    """The assistant's next reply to ``messages``; greedy when ``temperature`` is 0 (reproducible)."""
    if not im.causal:
        raise UsageError("this run is a classifier: use 'lora-ft predict RUN_DIR --data FILE'")
    device = next(im.model.parameters()).device
    inputs = {k: v.to(device) for k, v in _encode(im.tokenizer, messages, raw).items()}
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = im.model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=im.tokenizer.pad_token_id,
                            streamer=_StreamTo(im.tokenizer, stream) if stream else None, **sampling)
    return im.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _start(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []


def generate(im: InferenceModel, prompts: list[str], system: str | None = None, **kwargs: Any) -> list[str]:
    """One independent reply per prompt (no shared history)."""
    return [generate_reply(im, _start(system) + [{"role": "user", "content": p}], **kwargs) for p in prompts]


def chat(im: InferenceModel, stdin: IO[str], stdout: IO[str], system: str | None = None,
         interactive: bool = False, **kwargs: Any) -> list[dict[str, str]]:
    """Read user turns line by line, stream each reply, keep the conversation; returns it at the end."""
    if not im.tokenizer.chat_template:
        log.warning("the tokenizer has no chat template: turns are joined as plain text")
    messages = _start(system)
    if interactive:
        stdout.write(f"chat with the model ({COMMANDS_HELP})\n")
    while True:
        if interactive:
            stdout.write("\n>>> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = _start(system)
            continue
        messages.append({"role": "user", "content": text})
        reply = generate_reply(im, messages, stream=stdout, **kwargs)
        messages.append({"role": "assistant", "content": reply})
    return messages


# --------------------------------------------------------------------------------------- classification
def _write_json_rows(rows, out: str | Path, summary: dict[str, Any]) -> dict[str, Any]:
    """``rows`` as JSON lines in ``out`` (through ``_write_rows``); returns ``summary`` with the counts."""
    def write(f: IO[str]) -> int:
        n = 0
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            n += 1
        return n

    return {**summary, "examples": _write_rows(out, write), "predictions": str(out)}


@torch.no_grad()
def predict_file(im: InferenceModel, data_file: str, out: str | Path, batch_size: int = 32) -> dict[str, Any]:
    """Classify every row of ``data_file``; write it to ``out`` (jsonl) with ``prediction`` (the label name)
    and ``probabilities`` (label name → probability). Returns a summary (with accuracy when labels are given)."""
    if im.pooling is not None:
        return predict_embeddings(im, data_file, out, batch_size)
    if im.causal:
        raise UsageError("this run is a causal LM: use 'lora-ft generate' or 'lora-ft chat'")
    ds = read_split(data_file, "predict", "--data")
    kind = task_kind(im.model.config, im.model)
    if kind is not None:  # tags, several labels, scores (predict_tasks)
        check_task_columns(ds, kind, im, data_file, im.tokens_column)
        return _write_json_rows(predict_rows(im, ds, kind, batch_size, im.tokens_column), out, {"task": kind})
    if im.reward:
        return {**_write_rows(out, lambda f: score_rows(im, ds, data_file, batch_size, f)), "predictions": str(out)}
    need = [c for c in (im.text_column, im.text_pair_column) if c]
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise UsageError(f"--data {data_file}: column(s) {missing} not found; columns present: {ds.column_names}")
    check_columns(ds, {c: "text" for c in need}, Where("--data", data_file))
    n, correct, labelled = _write_rows(out, lambda f: _predict_rows(im, ds, need, batch_size, f))
    summary: dict[str, Any] = {"examples": n, "predictions": str(out)}
    if labelled:
        summary.update(labelled=labelled, accuracy=correct / labelled)
    return summary


def _write_rows(out: str | Path, write):
    """``write(f)`` into a file renamed to ``out`` at the end (never a half-written file); returns its result."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            result = write(f)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def _predict_rows(im: InferenceModel, ds, need: list[str], batch_size: int, f: IO[str]) -> tuple[int, int, int]:
    """Write one prediction per row of ``ds`` to ``f``; returns (rows, correct, rows with a label)."""
    id2label = {int(k): v for k, v in im.model.config.id2label.items()}
    device = next(im.model.parameters()).device
    n, correct, labelled = 0, 0, 0
    for start in range(0, len(ds), batch_size):
        rows = ds[start : start + batch_size]
        args = [[str(x) for x in rows[c]] for c in need]
        enc = im.tokenizer(*args, padding=True, truncation=True, max_length=im.max_length,
                           return_tensors="pt").to(device)
        probs = im.model(**enc).logits.float().softmax(-1).cpu()
        for i in range(len(probs)):
            row = {k: v[i] for k, v in rows.items()}
            pred = id2label[int(probs[i].argmax())]
            row.update(prediction=pred, probabilities={id2label[j]: round(float(p), 6)
                                                       for j, p in enumerate(probs[i])})
            if im.label_column in row and row[im.label_column] is not None:
                labelled += 1
                # Counted as rows stream to the file (no predictions kept in memory); the evaluation's metrics
                # (scoring.metrics.classification_metrics) are lora-ft eval's business.
                correct += str(row[im.label_column]) == pred
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            n += 1
    return n, correct, labelled


# --------------------------------------------------------------------------------------- reward models
def _conversations(im: InferenceModel, row: dict[str, Any], sides: list[str]) -> list[list[int]]:
    """The tokens of prompt + each side's answer, rendered as training rendered them (``encode_answer``)."""
    cfg = im.data or DataConfig()
    prompt = read_prompt(row, cfg)
    return [encode_answer(im.tokenizer, prompt, read_answer(row[c], c))["input_ids"] for c in sides]


@torch.no_grad()
def score_rows(im: InferenceModel, ds, data_file: str, batch_size: int, f: IO[str]) -> dict[str, Any]:
    """Write each row of ``ds`` with its ``reward`` (``{prompt, completion}`` rows) or ``reward_chosen`` and
    ``reward_rejected`` (``{prompt, chosen, rejected}`` pairs) to ``f``; returns the summary (mean reward, or the
    pairs' reward accuracy)."""
    cfg = im.data or DataConfig()
    paired = cfg.chosen_column in ds.column_names and cfg.rejected_column in ds.column_names
    sides = [cfg.chosen_column, cfg.rejected_column] if paired else [cfg.completion_column]
    missing = [c for c in (cfg.prompt_column, *sides) if c not in ds.column_names]
    if missing:
        raise UsageError(f"--data {data_file}: a reward model scores {cfg.prompt_column!r} with "
                         f"{cfg.completion_column!r} (or {cfg.chosen_column!r} and {cfg.rejected_column!r}); "
                         f"column(s) {missing} not found; columns present: {ds.column_names}")
    device, pad = next(im.model.parameters()).device, im.tokenizer.pad_token_id
    names = ["reward_chosen", "reward_rejected"] if paired else ["reward"]
    total, wins, n = 0.0, 0, 0
    for start in range(0, len(ds), batch_size):
        rows = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        seqs = [ids for r in rows for ids in _conversations(im, r, sides)]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        scores = im.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().view(len(rows), -1).cpu()
        for row, score in zip(rows, scores.tolist(), strict=True):
            row.update({k: round(v, 6) for k, v in zip(names, score, strict=True)})
            total, wins, n = total + score[0], wins + (paired and score[0] > score[1]), n + 1
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    out: dict[str, Any] = {"examples": n}
    out.update({"reward_accuracy": wins / max(n, 1)} if paired else {"mean_reward": total / max(n, 1)})
    return out
