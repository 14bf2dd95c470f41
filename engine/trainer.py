"""Training and evaluation: one call from a RunConfig to a finished run directory.

Training runs on the Hugging Face `Trainer` so that multi-GPU launches (torchrun/accelerate: DDP,
FSDP, DeepSpeed) work without code of our own. `EventBridge`, a `TrainerCallback`, turns the
Trainer's logs, evaluations and checkpoints into engine events and stops training when asked.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import psutil
import torch
import transformers
from peft import PeftModel
from sklearn.metrics import accuracy_score, f1_score
from transformers import EvalPrediction, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from engine import data as data_lib
from engine import models
from engine.config import ConfigError, RunConfig
from engine.events import Checkpoint, Eval, FreezeMapReady, Log, RunFailed, RunFinished, RunStarted, RunStopped, Step
from engine.freeze_map import compute_freeze_map
from engine.runs import (
    CHECKPOINTS_DIR,
    ERROR_FILE,
    EVENTS_FILE,
    MODEL_DIR,
    create_run_dir,
    load_run_config,
    read_summary,
    write_summary,
)
from engine.sinks import EventSink, FanoutSink, JsonlFileSink
from engine.strategies import Strategy, get_strategy

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 130
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
LOGGERS_BRIDGED = ("transformers", "peft", "accelerate", "engine")


@dataclass(frozen=True)
class RunResult:
    status: Literal["finished", "stopped", "failed"]
    run_dir: Path
    summary: dict[str, Any]
    exit_code: int


def resolve_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: str, device: str) -> Literal["fp32", "bf16"]:
    """`auto` is bf16 on GPUs that have it and fp32 elsewhere (bf16 matmuls are ~300x slower on CPUs)."""
    if precision == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if precision == "bf16" else "fp32"


def classification_metrics(prediction: EvalPrediction) -> dict[str, float]:
    predicted, labels = np.asarray(prediction.predictions), np.asarray(prediction.label_ids)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "f1": float(f1_score(labels, predicted, average="macro")),
    }


def _predicted_class(logits: Any, labels: torch.Tensor) -> torch.Tensor:
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)


def _split_metrics(metrics: dict[str, float], prefix: str, task: str) -> dict[str, float]:
    """Trainer's `eval_loss`-style keys without prefix or bookkeeping, plus perplexity for causal LMs."""
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time")
    clean = {k.removeprefix(f"{prefix}_"): float(v) for k, v in metrics.items() if k.startswith(f"{prefix}_")}
    clean = {k: v for k, v in clean.items() if k not in skip}
    if task == "causal" and "loss" in clean:
        clean["perplexity"] = math.exp(min(clean["loss"], 700.0))
    return clean


class EventBridge(TrainerCallback):
    """Turns Trainer callbacks into engine events; sets `should_training_stop` when a stop is requested."""

    def __init__(self, sink: EventSink, task: str, stop_event: threading.Event | None, samples_per_step: int) -> None:
        self.sink = sink
        self.task = task
        self.stop_event = stop_event
        self.samples_per_step = samples_per_step
        self.stopped_at: int | None = None
        self._started = time.monotonic()
        self._first_step = 0
        self._first_tokens = 0
        self._process = psutil.Process()

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._started = time.monotonic()
        self._first_step = state.global_step
        self._first_tokens = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.stop_event is not None and self.stop_event.is_set() and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_training_stop = True
            control.should_save = True

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if not logs or "loss" not in logs:
            return
        elapsed = time.monotonic() - self._started
        steps_done = state.global_step - self._first_step
        rate = steps_done / elapsed if elapsed > 0 else 0.0
        remaining = state.max_steps - state.global_step
        gpu_mb = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None
        self.sink.emit(
            Step(
                step=state.global_step,
                max_steps=state.max_steps,
                epoch=float(state.epoch or 0.0),
                loss=float(logs["loss"]),
                lr=float(logs.get("learning_rate", 0.0)),
                grad_norm=float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
                samples_per_second=steps_done * self.samples_per_step / elapsed if elapsed > 0 else 0.0,
                tokens_per_second=(state.num_input_tokens_seen - self._first_tokens) / elapsed if elapsed > 0 else 0.0,
                elapsed_s=elapsed,
                eta_s=remaining / rate if rate > 0 else None,
                memory_rss_mb=self._process.memory_info().rss / 2**20,
                gpu_memory_mb=gpu_mb,
            )
        )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # type: ignore[no-untyped-def]
        metrics = metrics or {}
        prefix = "test" if any(k.startswith("test_") for k in metrics) else "eval"
        split = "test" if prefix == "test" else "validation"
        values = _split_metrics(metrics, prefix, self.task)
        self.sink.emit(Eval(step=state.global_step, epoch=float(state.epoch or 0.0), split=split, metrics=values))

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.sink.emit(Checkpoint(step=state.global_step, path=str(path)))


class _LogBridge(logging.Handler):
    """Library warnings (transformers, peft, ...) become `log` events while a run is active."""

    def __init__(self, sink: EventSink) -> None:
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        level = "error" if record.levelno >= logging.ERROR else "warning"
        message = ANSI_ESCAPE.sub("", record.getMessage()).strip()
        self.sink.emit(Log(level=level, message=f"{record.name}: {message}"))


def quiet_library_output() -> None:
    """Library progress bars and log lines would interleave with the CLI's view and the JSON on stdout.

    Warnings still reach the user: `_LogBridge` turns them into `log` events during a run.
    """
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_default_handler()


def training_arguments(config: RunConfig, output_dir: Path, *, device: str, precision: str) -> TrainingArguments:
    """The HF TrainingArguments for a run config (checkpoints go to `output_dir`)."""
    train = config.train
    per_epoch = "steps" if train.eval_steps else "epoch"
    save_per = "steps" if train.save_steps else "epoch"
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size or 2 * train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        learning_rate=train.lr,
        lr_scheduler_type=train.scheduler,
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        data_seed=train.seed,
        eval_strategy=per_epoch,
        eval_steps=train.eval_steps,
        save_strategy=save_per,
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        logging_strategy="steps",
        logging_steps=train.logging_steps,
        report_to="none",
        disable_tqdm=True,
        bf16=precision == "bf16",
        use_cpu=device == "cpu",
        activation_checkpointing=train.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="group_by_length",
        remove_unused_columns=False,
        dataloader_pin_memory=device == "cuda",
    )


def _load_for_strategy(
    config: RunConfig,
    strategy: Strategy,
    *,
    num_labels: int | None,
    label_names: list[str] | None,
    device: str,
    precision: str,
) -> torch.nn.Module:
    """Load the model the way the strategy needs it (4-bit for QLoRA, bf16 frozen base for adapters on GPUs)."""
    on_cuda = device == "cuda"
    dtype = torch.bfloat16 if precision == "bf16" and strategy.is_peft else torch.float32
    return models.load_model(
        config.model,
        num_labels=num_labels if config.model.task == "classification" else None,
        label_names=label_names,
        quantization_config=strategy.quantization_config(on_cuda=on_cuda),
        dtype=dtype,
    )


def _train_feature(
    config: RunConfig,
    strategy: Any,
    model: torch.nn.Module,
    prepared: data_lib.PreparedData,
    sink: EventSink,
    model_dir: Path,
) -> tuple[dict[str, dict[str, float]], float, float]:
    """Feature-based: embed every split once with the frozen model, fit a logistic regression on train."""
    batch_size = config.train.eval_batch_size or 2 * config.train.batch_size
    started = time.monotonic()
    features = {}
    for split, dataset in (("train", prepared.train), ("validation", prepared.validation), ("test", prepared.test)):
        if dataset is None:
            continue
        sink.emit(Log(level="info", message=f"embedding {split} ({len(dataset)} examples)"))
        x = strategy.embed(model, dataset, prepared.collator, batch_size=batch_size, pooling=config.strategy.pooling)
        features[split] = (x, np.asarray(dataset["labels"]))
    sink.emit(Log(level="info", message=f"fitting logistic regression on {features['train'][0].shape} features"))
    classifier = strategy.fit_classifier(*features["train"], c=config.strategy.classifier_c, seed=config.train.seed)
    runtime = time.monotonic() - started
    metrics: dict[str, dict[str, float]] = {}
    for split, (x, y) in features.items():
        predicted = classifier.predict(x)
        metrics[split] = {
            "accuracy": float(accuracy_score(y, predicted)),
            "f1": float(f1_score(y, predicted, average="macro")),
        }
        if split != "train":
            sink.emit(Eval(step=0, epoch=1.0, split=split, metrics=metrics[split]))
    strategy.save_classifier(classifier, prepared.label_names, model_dir)
    return metrics, runtime, len(prepared.train) / runtime if runtime > 0 else 0.0


def _train_with_trainer(
    config: RunConfig,
    model: torch.nn.Module,
    prepared: data_lib.PreparedData,
    sink: EventSink,
    run_dir: Path,
    *,
    device: str,
    precision: str,
    stop_event: threading.Event | None,
) -> tuple[dict[str, dict[str, float]], float, float, EventBridge, Trainer]:
    task = config.model.task
    args = training_arguments(config, run_dir / CHECKPOINTS_DIR, device=device, precision=precision)
    bridge = EventBridge(
        sink,
        task,
        stop_event,
        samples_per_step=args.train_batch_size * args.gradient_accumulation_steps * args.world_size,
    )
    classification = task == "classification"
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.validation,
        data_collator=prepared.collator,
        compute_metrics=classification_metrics if classification else None,
        preprocess_logits_for_metrics=_predicted_class if classification else None,
        callbacks=[bridge],
    )
    trainer.remove_callback(PrinterCallback)  # the bridge reports logs as events; stdout stays clean
    output = trainer.train()
    metrics: dict[str, dict[str, float]] = {}
    if bridge.stopped_at is None:
        metrics["validation"] = _split_metrics(
            trainer.evaluate(prepared.validation, metric_key_prefix="eval"), "eval", task
        )
        if prepared.test is not None:
            metrics["test"] = _split_metrics(trainer.evaluate(prepared.test, metric_key_prefix="test"), "test", task)
    return metrics, output.metrics["train_runtime"], output.metrics["train_samples_per_second"], bridge, trainer


def run_training(
    config: RunConfig,
    sink: EventSink,
    *,
    output_dir: Path | None = None,
    stop_event: threading.Event | None = None,
) -> RunResult:
    """Train, evaluate and save one run; every step of the way is an event on `sink` and in events.jsonl.

    Raises ConfigError only when there is no training data, the model is not found (`model.task = "auto"`
    reads its config first) or the run directory cannot be created;
    every later problem is recorded in the run directory (status `failed`) and returned.
    """
    quiet_library_output()
    if not config.data.train:
        raise ConfigError("data.train: no training data; set it in the preset or with --set data.train=FILE")
    config = config.with_task(models.resolve_task(config.model))
    run_dir = create_run_dir(config, output_dir)
    file_sink = JsonlFileSink(run_dir / EVENTS_FILE)
    events = FanoutSink(file_sink, sink)
    log_bridge = _LogBridge(events)
    for name in LOGGERS_BRIDGED:
        logging.getLogger(name).addHandler(log_bridge)
    task = config.model.task
    summary: dict[str, Any] = {
        "status": "running",
        "name": config.name,
        "run_dir": str(run_dir),
        "model": config.model.id,
        "task": task,
        "strategy": config.strategy.kind,
        "started_at": time.time(),
    }
    try:
        events.emit(
            RunStarted(
                run_dir=str(run_dir),
                name=config.name,
                model=config.model.id,
                strategy=config.strategy.kind,
                task=task,
                config=config.model_dump(mode="json"),
            )
        )
        torch.manual_seed(config.train.seed)
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        device = resolve_device()
        precision = resolve_precision(config.train.precision, device)
        if device == "cpu" and precision == "bf16":
            events.emit(
                Log(level="warning", message="bf16 on a CPU is often far slower than fp32 (train.precision=auto)")
            )
        if config.model.trust_remote_code:
            events.emit(
                Log(level="warning", message="model.trust_remote_code is on: code from the model repo will run")
            )
        strategy = get_strategy(config.strategy, task)
        events.emit(Log(level="info", message=f"loading tokenizer and data (device {device}, {precision})"))
        tokenizer = models.load_tokenizer(config.model)
        prepared = data_lib.prepare_data(config.data, task=task, tokenizer=tokenizer, seed=config.train.seed)
        for warning in prepared.warnings:
            events.emit(Log(level="warning", message=warning))
        num_labels = config.model.num_labels or prepared.num_labels
        events.emit(Log(level="info", message=f"loading model {config.model.id}"))
        model = _load_for_strategy(
            config,
            strategy,
            num_labels=num_labels,
            label_names=prepared.label_names,
            device=device,
            precision=precision,
        )
        model = strategy.prepare(model)
        freeze_map = compute_freeze_map(
            model,
            batch_size=config.train.batch_size,
            seq_len=config.data.max_length,
            gradient_checkpointing=config.train.gradient_checkpointing,
        )
        events.emit(FreezeMapReady(freeze_map=freeze_map.to_dict()))
        summary.update(
            trainable_params=freeze_map.trainable_params,
            total_params=freeze_map.total_params,
            trainable_percent=freeze_map.trainable_percent,
            label_names=prepared.label_names,
            num_labels=num_labels,
            train_examples=len(prepared.train),
            device=device,
            precision=precision,
        )
        model_dir = run_dir / MODEL_DIR
        if strategy.trains_with_trainer:
            metrics, runtime, samples_per_s, bridge, trainer = _train_with_trainer(
                config, model, prepared, events, run_dir, device=device, precision=precision, stop_event=stop_event
            )
            summary.update(steps=trainer.state.global_step, epochs=float(trainer.state.epoch or 0.0))
            if bridge.stopped_at is not None:
                checkpoint = run_dir / CHECKPOINTS_DIR / f"checkpoint-{bridge.stopped_at}"
                summary.update(status="stopped", train_runtime_s=runtime, train_samples_per_second=samples_per_s)
                summary["finished_at"] = time.time()
                write_summary(run_dir, summary)
                events.emit(
                    RunStopped(step=bridge.stopped_at, checkpoint=str(checkpoint) if checkpoint.exists() else None)
                )
                return RunResult("stopped", run_dir, summary, EXIT_STOPPED)
            trainer.save_model(str(model_dir))
        else:
            metrics, runtime, samples_per_s = _train_feature(config, strategy, model, prepared, events, model_dir)
            metrics.pop("train", None)
        tokenizer.save_pretrained(str(model_dir))
        summary.update(
            status="finished",
            train_runtime_s=runtime,
            train_samples_per_second=samples_per_s,
            validation=metrics.get("validation"),
            test=metrics.get("test"),
            model_dir=str(model_dir),
            finished_at=time.time(),
        )
        write_summary(run_dir, summary)
        events.emit(RunFinished(summary=summary))
        return RunResult("finished", run_dir, summary, EXIT_OK)
    except Exception as exc:
        user_error = isinstance(exc, ConfigError)
        message = str(exc) if user_error else f"{type(exc).__name__}: {exc}"
        (run_dir / ERROR_FILE).write_text(traceback.format_exc(), encoding="utf-8")
        summary.update(status="failed", error=message, finished_at=time.time())
        write_summary(run_dir, summary)
        events.emit(RunFailed(error=message, user_error=user_error))
        return RunResult("failed", run_dir, summary, EXIT_BAD_INPUT if user_error else EXIT_FAILED)
    finally:
        for name in LOGGERS_BRIDGED:
            logging.getLogger(name).removeHandler(log_bridge)
        file_sink.close()


def evaluate_run(run_dir: Path, data_source: str, overrides: list[str] | None = None) -> dict[str, float]:
    """Score a finished run's final model (or adapter, or feature classifier) on any data file."""
    quiet_library_output()
    config = load_run_config(run_dir, overrides)
    summary = read_summary(run_dir) or {}
    model_dir = run_dir / MODEL_DIR
    if summary.get("status") != "finished" or not model_dir.is_dir():
        status = summary.get("status", "unknown")
        raise ConfigError(f"{run_dir}: no final model to evaluate (run status: {status}); eval needs a finished run")
    task = config.model.task
    strategy = get_strategy(config.strategy, task)
    label_names = summary.get("label_names")
    device = resolve_device()
    precision = resolve_precision(config.train.precision, device)
    tokenizer = models.load_tokenizer(config.model)
    dataset, collator = data_lib.prepare_eval_split(
        config.data,
        data_source,
        task=task,
        tokenizer=tokenizer,
        label_names=label_names,
        num_labels=summary.get("num_labels"),
    )
    base = _load_for_strategy(
        config,
        strategy,
        num_labels=summary.get("num_labels"),
        label_names=label_names,
        device=device,
        precision=precision,
    )
    batch_size = config.train.eval_batch_size or 2 * config.train.batch_size
    if not strategy.trains_with_trainer:
        classifier, _ = strategy.load_classifier(model_dir)
        features = strategy.embed(base, dataset, collator, batch_size=batch_size, pooling=config.strategy.pooling)
        labels, predicted = np.asarray(dataset["labels"]), classifier.predict(features)
        return {
            "accuracy": float(accuracy_score(labels, predicted)),
            "f1": float(f1_score(labels, predicted, average="macro")),
            "examples": float(len(dataset)),
        }
    if strategy.is_peft:
        model = PeftModel.from_pretrained(base, str(model_dir))
    else:
        model = models.load_model(
            config.model.model_copy(update={"id": str(model_dir)}),
            num_labels=summary.get("num_labels") if task == "classification" else None,
            label_names=label_names,
        )
    classification = task == "classification"
    with tempfile.TemporaryDirectory(prefix="finetui-eval-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            per_device_eval_batch_size=batch_size,
            report_to="none",
            disable_tqdm=True,
            use_cpu=device == "cpu",
            bf16=precision == "bf16",
            remove_unused_columns=False,
        )
        trainer = Trainer(
            model=model,
            args=args,
            data_collator=collator,
            compute_metrics=classification_metrics if classification else None,
            preprocess_logits_for_metrics=_predicted_class if classification else None,
        )
        trainer.remove_callback(PrinterCallback)
        metrics = _split_metrics(trainer.evaluate(dataset, metric_key_prefix="eval"), "eval", task)
    return {**metrics, "examples": float(len(dataset))}
