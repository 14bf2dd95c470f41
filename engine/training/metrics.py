"""The metrics a run reports: accuracy and macro-F1 for classifiers, loss and perplexity for causal LMs.

Training, `finetui eval` and the feature strategy all score through `classification_scores`, and all read the
Trainer's metric dicts through `split_metrics`, so a number means the same thing wherever it is shown.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from transformers import EvalPrediction

_BOOKKEEPING = ("runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time")


def classification_scores(labels: Any, predicted: Any) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted class ids against the true ones."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "f1": float(f1_score(labels, predicted, average="macro")),
    }


def classification_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """The Trainer's `compute_metrics` for classifiers (predictions are class ids: see `predicted_class`)."""
    return classification_scores(prediction.label_ids, prediction.predictions)


def predicted_class(logits: Any, labels: torch.Tensor) -> torch.Tensor:
    """The Trainer's `preprocess_logits_for_metrics`: keep class ids, not the logits, across batches."""
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)


def split_metrics(metrics: dict[str, float], prefix: str, task: str) -> dict[str, float]:
    """Trainer's `eval_loss`-style keys without prefix or bookkeeping, plus perplexity for causal LMs."""
    clean = {k.removeprefix(f"{prefix}_"): float(v) for k, v in metrics.items() if k.startswith(f"{prefix}_")}
    clean = {k: v for k, v in clean.items() if k not in _BOOKKEEPING}
    if task == "causal" and "loss" in clean:
        clean["perplexity"] = math.exp(min(clean["loss"], 700.0))
    return clean
