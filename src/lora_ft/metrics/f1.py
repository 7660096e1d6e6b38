"""F1 as an ``evaluate`` module shipped with lora_ft (see accuracy.py for why it is shipped)."""

import datasets
import evaluate
from sklearn.metrics import f1_score


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="F1 score; average='macro' weighs every class equally.",
            citation="",
            inputs_description="predictions, references: lists of class ids; average: sklearn's average",
            features=datasets.Features({"predictions": datasets.Value("int32"),
                                        "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, average="macro", labels=None):
        return {"f1": float(f1_score(references, predictions, average=average, labels=labels, zero_division=0))}
