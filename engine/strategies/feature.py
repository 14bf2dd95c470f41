"""Feature-based approach (Raschka): embed texts once with the frozen model, fit a logistic regression on them.

No gradient ever flows through the language model: every split is embedded a single time (one forward pass
per example, no backward), then scikit-learn fits a linear classifier on the pooled vectors. The cheapest
strategy by far and a solid baseline for embedding-focused encoders (BERT, MiniLM); usually the least accurate
one. Pick it to get a number in minutes on a CPU, or to check whether fine-tuning is worth it at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from datasets import Dataset
from safetensors.numpy import load_file, save_file
from sklearn.linear_model import LogisticRegression
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from engine import cache as cache_lib
from engine.architecture import unwrap
from engine.strategies.base import Strategy

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_META = "classifier.json"
_MODEL_INPUTS = ("input_ids", "attention_mask")


class FeatureStrategy(Strategy):
    kind: ClassVar[str] = "feature"
    trains_with_trainer: ClassVar[bool] = False

    def prepare(self, model: PreTrainedModel) -> nn.Module:
        return model.requires_grad_(False).eval()

    @staticmethod
    def resolve_pooling(model: nn.Module, pooling: str) -> str:
        """`auto` -> `mean` for encoders (masked-LM model types such as BERT), `last` for decoders."""
        if pooling != "auto":
            return pooling
        model_type = getattr(unwrap(model).config, "model_type", "")
        return "mean" if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "last"

    @staticmethod
    def embed(
        model: nn.Module,
        dataset: Dataset,
        collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
        *,
        batch_size: int,
        pooling: str,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """One pooled float32 vector per example of a tokenised dataset, in the dataset's order.

        Examples are batched longest first so that each batch pads only to similar lengths (about 4x faster
        than padding everything to the longest example). `progress(done, total)` is called after each batch.
        """
        base = unwrap(model)
        backbone = base.base_model
        pooling = FeatureStrategy.resolve_pooling(base, pooling)
        device = next(base.parameters()).device
        order = np.argsort([-len(ids) for ids in dataset["input_ids"]], kind="stable")
        pooled: list[np.ndarray] = []
        was_training = base.training
        base.eval()
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = [dataset[int(index)] for index in order[start : start + batch_size]]
                features = collator([{key: row[key] for key in _MODEL_INPUTS} for row in rows])
                batch = {key: value.to(device) for key, value in features.items()}
                hidden = backbone(**batch).last_hidden_state.float()
                pooled.append(_pool(hidden, batch["attention_mask"], pooling).cpu().numpy())
                if progress is not None:
                    progress(min(start + batch_size, len(order)), len(order))
        base.train(was_training)
        sorted_embeddings = np.concatenate(pooled)
        embeddings = np.empty_like(sorted_embeddings)
        embeddings[order] = sorted_embeddings
        return embeddings

    @staticmethod
    def embed_cached(
        model: nn.Module,
        dataset: Dataset,
        collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
        *,
        batch_size: int,
        pooling: str,
        model_key: str,
    ) -> tuple[np.ndarray, bool]:
        """`embed`, through the on-disk cache keyed by the model (`model_key`), the token ids and the pooling.

        Returns the embeddings and whether they came from the cache (then the model did not run).
        """
        base = unwrap(model)
        resolved = FeatureStrategy.resolve_pooling(base, pooling)
        dtype = str(next(base.parameters()).dtype)
        token_ids = cache_lib.token_ids_digest(dataset["input_ids"])
        path = cache_lib.features_path(cache_lib.digest("features", model_key, resolved, dtype, token_ids))
        cached = cache_lib.load_array(path)
        if cached is not None and cached.shape[0] == len(dataset):
            return cached, True
        embeddings = FeatureStrategy.embed(model, dataset, collator, batch_size=batch_size, pooling=resolved)
        cache_lib.save_array(path, embeddings)
        return embeddings, False

    @staticmethod
    def fit_classifier(train_x: np.ndarray, train_y: np.ndarray, c: float, seed: int) -> LogisticRegression:
        """A logistic regression (inverse regularisation `c`) fitted on the training embeddings."""
        return LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(train_x, train_y)

    @staticmethod
    def save_classifier(classifier: LogisticRegression, label_names: list[str] | None, out_dir: str | Path) -> None:
        """Write the fitted classifier as safetensors weights plus JSON (no pickle: loading runs no code)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {"coef": np.ascontiguousarray(classifier.coef_), "intercept": np.ascontiguousarray(classifier.intercept_)},
            str(out / CLASSIFIER_WEIGHTS),
        )
        meta = {
            "type": "sklearn.linear_model.LogisticRegression",
            "C": classifier.C,
            "max_iter": classifier.max_iter,
            "classes": classifier.classes_.tolist(),
            "label_names": label_names,
        }
        (out / CLASSIFIER_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @staticmethod
    def load_classifier(out_dir: str | Path) -> tuple[LogisticRegression, list[str] | None]:
        """The classifier written by `save_classifier`, ready to `predict`, and its label names."""
        out = Path(out_dir)
        meta = json.loads((out / CLASSIFIER_META).read_text(encoding="utf-8"))
        weights = load_file(str(out / CLASSIFIER_WEIGHTS))
        classifier = LogisticRegression(C=meta["C"], max_iter=meta["max_iter"])
        classifier.coef_ = weights["coef"]
        classifier.intercept_ = weights["intercept"]
        classifier.classes_ = np.array(meta["classes"])
        classifier.n_features_in_ = weights["coef"].shape[1]
        return classifier, meta["label_names"]


def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, seq, hidden) -> (batch, hidden): first real token, masked mean, or last real token."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "cls":
        return hidden[rows, attention_mask.argmax(dim=1)]
    if pooling == "last":
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        return hidden[rows, (attention_mask * positions).argmax(dim=1)]
    if pooling == "mean":
        mask = attention_mask.to(hidden.dtype)
        return (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    raise ValueError(f"unknown pooling {pooling!r}: expected auto, cls, mean or last")
