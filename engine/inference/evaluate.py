"""`finetui eval`: score a run's model (full model, adapter, or feature classifier) on any data file.

The run is loaded once (`engine.inference.loading`), the file tokenised as the run's training data was, and
scored as training scored its validation set: accuracy, macro-F1 and loss for classifiers, loss and perplexity for
causal LMs, plus the number of examples.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PrinterCallback, Trainer, TrainingArguments

from engine import data as data_lib
from engine.inference.loading import LoadedRun, load_run
from engine.training.metrics import classification_metrics, classification_scores, predicted_class, split_metrics


def evaluate_run(run_dir: Path, data_source: str, overrides: list[str] | None = None) -> dict[str, float | int]:
    """Score a run's trained model on a data file: its metrics and `examples` (the number of rows scored)."""
    loaded = load_run(Path(run_dir), overrides=overrides)
    config = loaded.config
    dataset, collator = data_lib.prepare_eval_split(
        config.data,
        data_source,
        task=loaded.task,
        tokenizer=loaded.tokenizer,
        label_names=loaded.label_names,
        num_labels=loaded.num_labels,
    )
    batch_size = config.train.eval_batch_size or 2 * config.train.batch_size
    if loaded.classifier is not None:
        features = loaded.strategy.embed(  # type: ignore[attr-defined]
            loaded.model, dataset, collator, batch_size=batch_size, pooling=config.strategy.pooling
        )
        metrics: dict[str, float | int] = classification_scores(dataset["labels"], loaded.classifier.predict(features))
    else:
        metrics = dict(_trainer_metrics(loaded, dataset, collator, batch_size))
    return {**metrics, "examples": len(dataset)}


def _trainer_metrics(loaded: LoadedRun, dataset: Dataset, collator: Any, batch_size: int) -> dict[str, float]:
    """Loss (and accuracy/F1 for classifiers) of the run's model on `dataset`, through the Trainer's evaluation."""
    classification = loaded.task == "classification"
    with tempfile.TemporaryDirectory(prefix="finetui-eval-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            per_device_eval_batch_size=batch_size,
            report_to="none",
            disable_tqdm=True,
            use_cpu=loaded.device == "cpu",
            bf16=loaded.precision == "bf16",
            remove_unused_columns=False,
        )
        trainer = Trainer(
            model=loaded.model,
            args=args,
            data_collator=collator,
            compute_metrics=classification_metrics if classification else None,
            preprocess_logits_for_metrics=predicted_class if classification else None,
        )
        trainer.remove_callback(PrinterCallback)
        return split_metrics(trainer.evaluate(dataset, metric_key_prefix="eval"), "eval", loaded.task)
