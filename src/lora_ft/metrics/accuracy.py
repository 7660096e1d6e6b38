"""Accuracy as an ``evaluate`` module shipped with lora_ft.

``evaluate.load("accuracy")`` fetches its script from the Hugging Face Hub at run time; shipping the module
keeps evaluation working offline and pinned. Same inputs and outputs as the Hub's ``accuracy``.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to the references.",
            citation="",
            inputs_description="predictions, references: lists of class ids",
            features=datasets.Features({"predictions": datasets.Value("int32"),
                                        "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": float(accuracy_score(references, predictions))}
