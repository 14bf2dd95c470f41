"""The hand-written recipe finetui is measured against: a plain Hugging Face Trainer, as the seed scripts do it.

Like Raschka's DistilBERT scripts (seed-notes.md): the whole split is tokenised with `padding=True` in one map
batch, so every example is padded to the longest in the dataset; the frozen layers of `head`/`last_layers` are
recomputed at every step of every epoch (in train mode, as in the recipe); plain Trainer, default optimizer,
no length grouping. `feature` embeds the padded dataset and fits the same logistic regression as finetui.

Run by `bench/run_bench.py` (one JSON object on stdout); not a test and not part of the package.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from datasets import load_dataset
from peft import LoraConfig, TaskType, get_peft_model
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    EvalPrediction,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


class Timeline(TrainerCallback):
    """Wall-clock end time and epoch of every optimizer step (for per-epoch times and the first step)."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, float]] = []  # (time, epoch)

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.steps.append((time.time(), float(state.epoch or 0.0)))


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float(accuracy_score(prediction.label_ids, np.argmax(logits, axis=-1)))}


def freeze(model: torch.nn.Module, kind: str, layers: int) -> torch.nn.Module:
    """The recipe's freezing: everything off, then the output layers (and the last blocks) back on."""
    if kind in ("head", "last_layers"):
        model.requires_grad_(False)
        model.bert.pooler.requires_grad_(True)
        model.classifier.requires_grad_(True)
        if kind == "last_layers":
            for block in model.bert.encoder.layer[-layers:]:
                block.requires_grad_(True)
    if kind == "lora":
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=8,
            lora_alpha=16,
            lora_dropout=0.05,
            target_modules=["query", "value"],
            modules_to_save=["bert.pooler", "classifier"],
        )
        model = get_peft_model(model, config)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--train", required=True)
    parser.add_argument("--validation", required=True)
    parser.add_argument("--strategy", required=True, choices=["full", "head", "last_layers", "lora", "feature"])
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args()
    torch.manual_seed(42)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    raw = load_dataset("json", data_files={"train": args.train, "validation": args.validation})

    def tokenise(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], truncation=True, max_length=args.max_length, padding=True)

    data = raw.map(tokenise, batched=True, batch_size=None).rename_column("label", "labels")
    data.set_format("torch", columns=["input_ids", "attention_mask", "labels"])
    real_tokens = int(sum(int(mask.sum()) for mask in data["train"]["attention_mask"]))
    padded_length = int(data["train"][0]["input_ids"].shape[0])

    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    result: dict = {"padded_length": padded_length, "real_tokens_per_epoch": real_tokens}
    if args.strategy == "feature":
        started = time.time()
        features = {}
        model.eval()
        with torch.no_grad():
            for split in ("train", "validation"):
                chunks = []
                for start in range(0, len(data[split]), 2 * args.batch_size):
                    batch = data[split][start : start + 2 * args.batch_size]
                    hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
                    mask = batch["attention_mask"].unsqueeze(-1).float()
                    chunks.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
                features[split] = np.concatenate(chunks)
        classifier = LogisticRegression(C=1.0, max_iter=1000, random_state=42)
        classifier.fit(features["train"], np.asarray(data["train"]["labels"]))
        runtime = time.time() - started
        predicted = classifier.predict(features["validation"])
        result.update(
            runtime_s=runtime,
            samples_per_second=len(data["train"]) / runtime,
            accuracy=float(accuracy_score(np.asarray(data["validation"]["labels"]), predicted)),
        )
        print(json.dumps(result))
        return

    model = freeze(model, args.strategy, args.layers)
    timeline = Timeline()
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=2 * args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        logging_steps=10,
        report_to="none",
        use_cpu=True,
        seed=42,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        compute_metrics=accuracy,
        callbacks=[timeline],
    )
    trainer.remove_callback(PrinterCallback)
    output = trainer.train()
    metrics = trainer.evaluate()
    result.update(
        runtime_s=output.metrics["train_runtime"],
        samples_per_second=output.metrics["train_samples_per_second"],
        accuracy=metrics["eval_accuracy"],
        first_step_time=timeline.steps[0][0],
        steps=timeline.steps,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
