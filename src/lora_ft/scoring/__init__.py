"""Scoring what a model produces: metrics that work offline (``metrics.py``), batched generation
(``generation.py``) and a run's generation evaluation (``suite.py``).

Below ``objectives`` (which take their metrics and the generation example type from here; the suite is handed an
objective, never imports one) and above ``data``/``recipe``: training and shipping judge the adapter, merged folders
and GGUF files with the same pieces.
"""

from .metrics import (
    BUILTIN_TEXT_METRICS,
    CLASSIFICATION_METRICS,
    ROUGE_TYPES,
    bleu_score,
    check_metric_names,
    classification_metrics,
    exact_match,
    json_valid,
    regex_match,
    rouge_scores,
    score_texts,
)

__all__ = ["BUILTIN_TEXT_METRICS", "CLASSIFICATION_METRICS", "ROUGE_TYPES", "bleu_score", "check_metric_names",
           "classification_metrics", "exact_match", "json_valid", "regex_match", "rouge_scores", "score_texts"]
