"""The feature strategy's own training: embed every split once with the frozen model, fit a logistic regression.

No Trainer and no gradient: one forward pass per example (cached on disk by `FeatureStrategy.embed_cached`),
then scikit-learn. Progress and scores are the same events a Trainer run emits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from engine import cache as cache_lib
from engine.config import RunConfig
from engine.data import PreparedData
from engine.events import Eval, Log
from engine.runs import StopRequest
from engine.sinks import EventSink
from engine.strategies.feature import FeatureStrategy
from engine.training.metrics import classification_scores


@dataclass(frozen=True)
class FeatureResult:
    classifier: LogisticRegression
    metrics: dict[str, dict[str, float]]  # validation (and test) scores
    runtime_s: float
    samples_per_second: float


def train_feature(
    config: RunConfig,
    strategy: FeatureStrategy,
    model: torch.nn.Module,
    prepared: PreparedData,
    sink: EventSink,
    stop: StopRequest,
) -> FeatureResult:
    """Embed train, validation and test with the frozen model, fit a logistic regression on train, score it."""
    started = time.monotonic()
    features = _embed_splits(config, strategy, model, prepared, sink, stop)
    stop.check()
    sink.emit(Log(level="info", message=f"fitting logistic regression on {features['train'][0].shape} features"))
    classifier = strategy.fit_classifier(*features["train"], c=config.strategy.classifier_c, seed=config.train.seed)
    runtime = time.monotonic() - started
    metrics: dict[str, dict[str, float]] = {}
    for split, (x, y) in features.items():
        if split == "train":
            continue
        metrics[split] = classification_scores(y, classifier.predict(x))
        sink.emit(Eval(step=0, epoch=1.0, split=split, metrics=metrics[split]))
    return FeatureResult(classifier, metrics, runtime, len(prepared.train) / runtime if runtime > 0 else 0.0)


def _embed_splits(
    config: RunConfig,
    strategy: FeatureStrategy,
    model: torch.nn.Module,
    prepared: PreparedData,
    sink: EventSink,
    stop: StopRequest,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(embeddings, labels) of every split, from the feature cache where it has them."""
    batch_size = config.train.eval_batch_size or 2 * config.train.batch_size
    model_key = cache_lib.model_fingerprint(config.model)

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        stop.check()  # once per batch: a stop requested while embedding a large split is noticed at once
        return prepared.collator(rows)

    features = {}
    for split, dataset in (("train", prepared.train), ("validation", prepared.validation), ("test", prepared.test)):
        if dataset is None:
            continue
        stop.check()
        sink.emit(Log(level="info", message=f"embedding {split} ({len(dataset)} examples)"))
        x, hit = strategy.embed_cached(
            model, dataset, collate, batch_size=batch_size, pooling=config.strategy.pooling, model_key=model_key
        )
        if hit:
            sink.emit(Log(level="info", message=f"{split} embeddings from the cache ({cache_lib.FEATURES}/)"))
        features[split] = (x, np.asarray(dataset["labels"]))
    return features
