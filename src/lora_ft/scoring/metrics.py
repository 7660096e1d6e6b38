"""Text and classification metrics that work offline and give the values of the ``evaluate`` metric of the same name.

``evaluate.load("rouge")`` and friends fetch their metric script from the Hugging Face Hub at run time, which fails
offline and on many training clusters. The built-in metrics here call the libraries those scripts wrap
(rouge-score, sacrebleu, scikit-learn) with the scripts' defaults, so the numbers are the ones ``evaluate`` would
report. Any other ``evaluate`` metric is used by name when ``evaluate.load`` can load it (cached, or a local
script), and a user's own function by its import path (``pkg.module:func`` or ``pkg.module.func``).

This module imports nothing of ours but ``errors``.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import numbers
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from ..errors import RecipeError, did_you_mean, first_line

logger = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
"""What ``evaluate``'s 'rouge' reports by default; the name ``rouge`` gives all four."""

BUILTIN_TEXT_METRICS: tuple[str, ...] = ("rouge", *ROUGE_TYPES, "bleu", "sacrebleu", "chrf", "exact_match",
                                         "json_valid", "regex_match")

CLASSIFICATION_METRICS = ("accuracy", "f1_macro", "f1_micro", "precision_macro", "recall_macro")

MetricFunction = Callable[[list[str], list[str]], Any]


def rouge_scores(types: Sequence[str], predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE F-measure per type, as ``evaluate``'s 'rouge' (rouge-score's default tokenizer, no stemmer).

    ``evaluate`` reports ``BootstrapAggregator().aggregate()[type].mid.fmeasure``: the median of 1000 means of
    unseeded bootstrap resamples, an estimate of the mean that moves between calls (by up to 0.008 on 6 example
    pairs, measured with seeds 0-2). The mean it estimates is reported here instead, so a score is reproducible.

    Args:
        types: rouge-score type names (``rouge1``, ``rougeL``, …).
        predictions: generated texts.
        references: one reference per prediction.
    """
    from rouge_score import rouge_scorer  # heavy (imports nltk, about 2 s): only when a ROUGE metric is asked for

    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=False)
    per_type: dict[str, list[float]] = {t: [] for t in types}
    for prediction, reference in zip(predictions, references, strict=True):
        for name, score in scorer.score(reference, prediction).items():  # rouge-score takes (target, prediction)
            per_type[name].append(score.fmeasure)
    return {name: math.fsum(values) / len(values) for name, values in per_type.items()}


def _ngrams(tokens: list[str], max_order: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def bleu_score(predictions: list[str], references: list[str], max_order: int = 4) -> float:
    """Corpus BLEU in 0..1 as ``evaluate``'s 'bleu' computes it (Papineni et al. 2002, no smoothing).

    Implemented here because ``evaluate``'s 'bleu' runs its own copy of tensorflow/nmt's ``compute_bleu``, which no
    trusted package ships (sacrebleu's BLEU differs: it smooths zero counts and, with several references, takes the
    closest reference length rather than the shortest). The one PyPI port (bleuscore 0.2.0, Rust) splits tokens
    differently from sacrebleu's 13a tokenizer (``"x\\x1cy"`` is one token there, three here and in ``evaluate``),
    so tokens come from sacrebleu's ``Tokenizer13a``, the code ``evaluate``'s tokenizer was taken from. Clipped
    n-gram matches and possible n-grams are summed over the corpus; the score is their geometric mean (0 when any
    order has no match) times the brevity penalty ``exp(1 - 1/ratio)`` for a corpus shorter than its references.
    The floating-point operations follow the reference order so the value is the same to the last bit.

    Args:
        predictions: generated texts.
        references: one reference per prediction.
        max_order: the longest n-gram counted.
    """
    tokenize = Tokenizer13a()
    matches, possible = [0] * max_order, [0] * max_order
    prediction_length = reference_length = 0
    for prediction, reference in zip(predictions, references, strict=True):
        hyp, ref = tokenize(prediction).split(), tokenize(reference).split()
        prediction_length, reference_length = prediction_length + len(hyp), reference_length + len(ref)
        for gram, count in (_ngrams(hyp, max_order) & _ngrams(ref, max_order)).items():
            matches[len(gram) - 1] += count
        for n in range(1, max_order + 1):
            possible[n - 1] += max(len(hyp) - n + 1, 0)
    if min(matches) == 0 or reference_length == 0:  # a zero precision makes the geometric mean 0
        return 0.0
    log_precisions = (math.log(float(m) / p) for m, p in zip(matches, possible, strict=True))
    geometric_mean = math.exp(sum((1.0 / max_order) * log_p for log_p in log_precisions))
    ratio = float(prediction_length) / reference_length
    return geometric_mean * (1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio))


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference, as ``evaluate``'s 'exact_match' with its defaults (no case,
    punctuation or number folding, nothing ignored). That module compares numpy string arrays, which drop
    trailing NUL characters; ``rstrip`` keeps that without building fixed-width arrays of the longest text."""
    same = sum(p.rstrip("\0") == r.rstrip("\0") for p, r in zip(predictions, references, strict=True))
    return same / len(predictions)


def json_valid(predictions: list[str]) -> float:
    """Share of predictions that ``json.loads`` parses to an object or an array (a bare number or string is not
    structured output)."""
    def ok(text: str) -> bool:
        try:
            return isinstance(json.loads(text), dict | list)
        except ValueError:  # json.JSONDecodeError, and UnicodeDecodeError on lone surrogates, are ValueErrors
            return False
    return sum(ok(p) for p in predictions) / len(predictions)


def regex_match(predictions: list[str], regex: str) -> float:
    """Share of predictions that ``re.fullmatch(regex, prediction.strip())`` matches."""
    pattern = re.compile(regex)
    return sum(pattern.fullmatch(p.strip()) is not None for p in predictions) / len(predictions)


def _close(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for a name that differs from a choice only in case or is close to one, else ''."""
    same_but_case = [c for c in choices if c.lower() == word.lower()]
    hint = f" (did you mean '{same_but_case[0]}'?)" if same_but_case else did_you_mean(word, list(choices))
    return hint if hint.startswith(" (did") else ""


def is_function_path(name: str) -> bool:
    """``pkg.module:func`` or ``pkg.module.func``; a name with a ``/`` or ending in ``.py`` is an ``evaluate``
    module (a Hub id or a local script) instead."""
    return ":" in name or ("." in name and "/" not in name and not name.endswith(".py"))


def load_function(name: str) -> MetricFunction:
    """The callable a function path names.

    Args:
        name: ``pkg.module:func`` or ``pkg.module.func``.

    Raises:
        RecipeError: the module does not import, lacks the attribute, or it is not callable.
    """
    module_name, _, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
    if not module_name or not attr:
        raise RecipeError(f"metric '{name}': write a function path as 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:  # ModuleNotFoundError, or an import inside the user's module failing
        raise RecipeError(f"metric '{name}': cannot import module '{module_name}' ({first_line(err)}); install it "
                          "or put its folder on PYTHONPATH") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise RecipeError(f"metric '{name}': module '{module_name}' has no function '{attr}'"
                          f"{_close(attr, [n for n in dir(module) if not n.startswith('_')])}")
    return func


def load_evaluate_module(name: str) -> Any:
    """``evaluate.load(name)``, offline where the Hub is unreachable.

    Raises:
        RecipeError: it cannot be loaded; the message says why and lists the built-in metrics.
    """
    import evaluate  # heavy (imports datasets): only for a metric that is neither built in nor a function path

    try:
        return evaluate.load(name)
    except ImportError as err:  # the module's script imports a package that is not installed
        raise RecipeError(f"metric '{name}': evaluate's module needs a package that is not installed "
                          f"({first_line(err)}); pip install it") from None
    except (FileNotFoundError, ConnectionError):
        # evaluate's own message says the module "doesn't exist on the Hugging Face Hub", also when the Hub was
        # never reached: not repeated
        raise RecipeError(
            f"metric '{name}' is not built in{_close(name, BUILTIN_TEXT_METRICS)}, and evaluate.load('{name}') "
            "found it neither in its module cache nor on the Hugging Face Hub (offline, or no such module); use a "
            f"built-in metric ({', '.join(BUILTIN_TEXT_METRICS)}), a function path 'package.module:function', or "
            "load it once online so that it is cached") from None


def check_metric_names(names: Sequence[str], regex: str | None) -> list[str]:
    """One problem per unusable metric name (and one for a regex that does not compile); ``[]`` if all are fine.

    Built-in names cost nothing; a function path is imported; any other name is loaded with ``evaluate.load``
    (the module only: no metric model is loaded before ``compute``).

    Args:
        names: metric names from the recipe.
        regex: the recipe's pattern for ``regex_match``, if any.
    """
    problems: list[str] = []
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as err:
            problems.append(f"regex {regex!r} does not compile: {err}")
    for name, count in Counter(names).items():
        if count > 1:
            problems.append(f"metric '{name}' is listed {count} times")
    for name in dict.fromkeys(names):
        try:
            if name == "regex_match" and regex is None:
                problems.append("metric 'regex_match' needs a regex to match; give one or drop the metric")
            elif name in BUILTIN_TEXT_METRICS:
                continue
            elif is_function_path(name):
                load_function(name)
            else:
                load_evaluate_module(name)
        except RecipeError as err:
            problems.append(str(err))
    return problems


def _numbers(name: str, result: Any) -> dict[str, float]:
    """A metric's numeric results keyed for reporting: a number is ``name``; a dict's numbers are ``name/key``
    (just ``name`` where the key is the name, as ``evaluate``'s 'meteor' returns ``{"meteor": …}``). Other
    values (lists of per-example scores, strings) are left out with a warning."""
    def number(value: Any) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    if number(result):
        return {name: float(result)}
    if isinstance(result, dict):
        found = {(name if key == name else f"{name}/{key}"): float(v) for key, v in result.items() if number(v)}
        skipped = [str(k) for k, v in result.items() if not number(v)]
        if skipped:
            logger.warning("metric '%s': left out %s (not single numbers)", name, ", ".join(skipped))
        if found:
            return found
    raise RecipeError(f"metric '{name}' returned {type(result).__name__} without a number: a metric returns a float "
                      "or a dict of floats")


def _score_builtin(name: str, predictions: list[str], references: list[str], regex: str | None) -> float:
    if name == "bleu":
        return bleu_score(predictions, references)
    if name == "sacrebleu":
        return BLEU().corpus_score(predictions, [references]).score
    if name == "chrf":
        return CHRF().corpus_score(predictions, [references]).score
    if name == "exact_match":
        return exact_match(predictions, references)
    if name == "json_valid":
        return json_valid(predictions)
    if regex is None:
        raise RecipeError("metric 'regex_match' needs a regex to match; give one or drop the metric")
    return regex_match(predictions, regex)


def score_texts(names: Sequence[str], predictions: list[str], references: list[str],
                regex: str | None = None) -> dict[str, float]:
    """Corpus-level values of the named metrics, in the order named.

    Built-ins: ``rouge1``/``rouge2``/``rougeL``/``rougeLsum`` the mean F-measure in 0..1 (``rouge`` gives all
    four); ``bleu`` 0..1 as ``evaluate``'s 'bleu'; ``sacrebleu`` and ``chrf`` the 0..100 ``score`` of
    ``evaluate``'s modules of those names (sacrebleu's defaults: 13a tokens, exp smoothing; chrF: 6 character
    n-grams, no word n-grams, beta 2); ``exact_match`` 0..1; ``json_valid`` the share of predictions that parse
    to a JSON object or array; ``regex_match`` the share that ``regex`` fully matches (surrounding whitespace
    stripped). A function path is called as ``func(predictions, references)`` and an ``evaluate`` module as
    ``.compute(predictions=…, references=…)``; a number they return is keyed by the metric's name, a dict's
    numbers by ``name/key`` (``name`` alone where the key equals it).

    Args:
        names: metric names (see ``check_metric_names``).
        predictions: generated texts.
        references: one reference per prediction.
        regex: the pattern for ``regex_match``.

    Raises:
        ValueError: no predictions, or not one reference per prediction (a caller's bug).
        RecipeError: a name cannot be used, or a metric returned no number.
    """
    if not predictions or len(predictions) != len(references):
        raise ValueError(f"score_texts needs one reference per prediction and at least one prediction; got "
                         f"{len(predictions)} predictions, {len(references)} references")
    wanted = list(dict.fromkeys(names))
    rouge_types = [t for t in ROUGE_TYPES if t in wanted or "rouge" in wanted]
    rouge = rouge_scores(rouge_types, predictions, references) if rouge_types else {}
    results: dict[str, float] = {}
    for name in wanted:
        if name == "rouge":
            results.update(rouge)
        elif name in ROUGE_TYPES:
            results[name] = rouge[name]
        elif name in BUILTIN_TEXT_METRICS:
            results[name] = float(_score_builtin(name, predictions, references, regex))
        elif is_function_path(name):
            results.update(_numbers(name, load_function(name)(predictions, references)))
        else:
            results.update(_numbers(name, load_evaluate_module(name).compute(predictions=predictions,
                                                                             references=references)))
    return results


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy, macro and micro F1, macro precision and recall, from scikit-learn (``zero_division=0``).

    Macro averages run over the classes that occur in ``labels`` or ``predictions`` (scikit-learn's and
    ``evaluate``'s 'f1' default), not over all ``num_labels``: a class absent from a small evaluation split and
    never predicted has no F1, and counting it as 0 would score a perfect classifier of 3 of 4 classes at 0.75.
    A class that is predicted but absent from ``labels`` still counts (its F1 is 0).

    Args:
        predictions: predicted class ids.
        labels: true class ids.
        num_labels: the number of classes; ids outside ``0..num_labels-1`` are a caller's bug.

    Raises:
        ValueError: empty or unequal inputs, or an id outside the label range.
    """
    if not labels or len(predictions) != len(labels):
        raise ValueError(f"classification_metrics needs one prediction per label and at least one label; got "
                         f"{len(predictions)} predictions, {len(labels)} labels")
    outside = sorted({int(v) for v in (*predictions, *labels)} - set(range(num_labels)))
    if outside:
        raise ValueError(f"classification_metrics: class ids {outside[:10]} outside 0..{num_labels - 1}")
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, average="macro", zero_division=0)
    _, _, f1_micro, _ = precision_recall_fscore_support(labels, predictions, average="micro", zero_division=0)
    return {"accuracy": float(accuracy_score(labels, predictions)), "f1_macro": float(f1),
            "f1_micro": float(f1_micro), "precision_macro": float(precision), "recall_macro": float(recall)}
