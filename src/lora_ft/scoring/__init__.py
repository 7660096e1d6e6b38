"""Scoring generated texts and predicted classes: metrics that work offline (see ``metrics``)."""

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
