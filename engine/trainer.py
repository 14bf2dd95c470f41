"""Training and evaluation: one call from a RunConfig to a finished run directory.

Training runs on the Hugging Face `Trainer` so that multi-GPU launches (torchrun/accelerate: DDP,
FSDP, DeepSpeed) work without code of our own. `EventBridge`, a `TrainerCallback`, turns the
Trainer's logs, evaluations and checkpoints into engine events and stops training when asked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import sys
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
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import is_torch_tf32_available

from engine import cache as cache_lib
from engine import data as data_lib
from engine import distributed, frozen_prefix, models
from engine.config import ConfigError, RunConfig
from engine.environment import record_environment
from engine.events import Checkpoint, Eval, FreezeMapReady, Log, RunFailed, RunFinished, RunStarted, RunStopped, Step
from engine.faults import (
    NonFiniteLoss,
    disk_full_message,
    is_disk_full,
    is_out_of_memory,
    nonfinite_loss_message,
    oom_message,
)
from engine.freeze_map import compute_freeze_map
from engine.notify import run_notify_command
from engine.preflight import check_run_config
from engine.runs import (
    CHECKPOINTS_DIR,
    ERROR_FILE,
    EVENTS_FILE,
    MODEL_DIR,
    STAGING_DIR,
    STOP_FILE,
    check_resumable,
    checkpoint_step,
    clean_partial_writes,
    create_run_dir,
    fsync_tree,
    latest_checkpoint,
    load_run_config,
    read_summary,
    remove_pid,
    replace_dir,
    rotate_checkpoints,
    write_pid,
    write_summary,
)
from engine.sinks import EventSink, FanoutSink, JsonlFileSink
from engine.strategies import Strategy, get_strategy
from engine.training.memory import MemoryMeter, memory_record
from engine.training.trackers import point_trackers_at

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 130
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
LOAD_REPORT = "LOAD REPORT"
LOAD_REPORT_STATUSES = {
    "MISSING": "new weights, initialised for this task",
    "UNEXPECTED": "checkpoint weights this model does not use",
    "MISMATCH": "reinitialised (shape differs from the checkpoint)",
}
LOGGERS_BRIDGED = ("transformers", "peft", "accelerate", "engine")


@dataclass(frozen=True)
class RunResult:
    status: Literal["finished", "stopped", "failed"]
    run_dir: Path
    summary: dict[str, Any]
    exit_code: int


def resolve_device(setting: str = "auto", *, one_gpu: bool = True) -> str:
    """`train.device` as "cpu" or "cuda". A training process keeps to one GPU (`one_gpu`: `cuda:N`, else the
    first), so that the Trainer never falls back to nn.DataParallel; processes of a launch each use their
    LOCAL_RANK's GPU."""
    if setting == "cpu":
        return "cpu"
    if one_gpu:
        distributed.pin_cuda_device(setting)
    if torch.cuda.is_available():
        return "cuda"
    if setting != "auto":
        raise ConfigError(f"train.device: {setting}, but no CUDA GPU is visible (torch {torch.__version__}); use auto")
    return "cpu"


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


class StopRequested(Exception):
    """Raised inside evaluation when a stop is requested (training itself stops at the next step instead)."""


class EventBridge(TrainerCallback):
    """Turns Trainer callbacks into engine events; sets `should_training_stop` when a stop is requested."""

    def __init__(
        self,
        sink: EventSink,
        task: str,
        stop_event: threading.Event | None,
        samples_per_step: int,
        stop_file: Path | None = None,
        memory: MemoryMeter | None = None,
    ) -> None:
        self.sink = sink
        self.memory = memory
        self.task = task
        self.stop_event = stop_event
        self.stop_file = stop_file
        self.samples_per_step = samples_per_step
        self.stopped_at: int | None = None
        self.last_validation: tuple[int, dict[str, float]] | None = None  # (step, metrics)
        self._started = time.monotonic()
        self._first_step = 0
        self._first_tokens = 0
        self._process = psutil.Process()

    def stop_requested(self) -> bool:
        if self.stop_event is not None and self.stop_event.is_set():
            return True
        return self.stop_file is not None and self.stop_file.exists()

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._started = time.monotonic()
        self._first_step = state.global_step
        self._first_tokens = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        # Every rank of a multi-process run stops at the same step, whichever of them saw the request.
        if distributed.any_rank(self.stop_requested(), args.device) and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_training_stop = True
            control.should_save = True
            control.should_evaluate = False

    def on_epoch_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.stopped_at is not None:
            control.should_evaluate = False

    def on_prediction_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if distributed.any_rank(self.stop_requested(), args.device):
            raise StopRequested

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if not logs or "loss" not in logs:
            return
        elapsed = time.monotonic() - self._started
        steps_done = state.global_step - self._first_step
        rate = steps_done / elapsed if elapsed > 0 else 0.0
        remaining = state.max_steps - state.global_step
        cuda = torch.cuda.is_available()
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
                gpu_memory_mb=torch.cuda.memory_allocated() / 2**20 if cuda else None,
                gpu_reserved_mb=torch.cuda.memory_reserved() / 2**20 if cuda else None,
                gpu_peak_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                **(self.memory.peak().step_fields() if self.memory is not None else {}),
            )
        )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # type: ignore[no-untyped-def]
        metrics = metrics or {}
        prefix = "test" if any(k.startswith("test_") for k in metrics) else "eval"
        split = "test" if prefix == "test" else "validation"
        values = _split_metrics(metrics, prefix, self.task)
        if split == "validation":
            self.last_validation = (state.global_step, values)
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
        if LOAD_REPORT in message:
            level, message = "info", summarise_load_report(message)
        self.sink.emit(Log(level=level, message=f"{record.name}: {message}"))


def summarise_load_report(report: str) -> str:
    """transformers' multi-line LOAD REPORT table as one line: which weights are new, unused or reinitialised."""
    title = report.split("\n", 1)[0].replace(f" {LOAD_REPORT} from:", " from")
    keys: dict[str, list[str]] = {status: [] for status in LOAD_REPORT_STATUSES}
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) > 1 and cells[1] in keys:
            keys[cells[1]].append(cells[0])
    parts = [f"{LOAD_REPORT_STATUSES[status]}: {', '.join(names)}" for status, names in keys.items() if names]
    return f"{title}: " + "; ".join(parts) if parts else title


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
    # Across processes the Trainer scales each rank's loss by the process count, right for losses that divide by
    # the global token count (causal LMs), twice too large for classifiers, whose loss is a per-batch mean.
    parallel: dict[str, Any] = {"average_tokens_across_devices": config.model.task == "causal"}
    if distributed.world_size() > 1 and device == "cpu":
        parallel["ddp_backend"] = "gloo"
    if train.fsdp:  # FSDP2 through fsdp_config (the option string is deprecated in transformers 5)
        words = train.fsdp.split()
        sharded = {"reshard_after_forward": "shard_grad_op" not in words, "cpu_offload": "offload" in words}
        parallel.update(fsdp=True, fsdp_config=sharded)
    if train.deepspeed:
        parallel["deepspeed"] = train.deepspeed
    if train.optim != "auto":
        parallel["optim"] = _optimizer_name(train.optim, device)
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
        save_total_limit=train.save_total_limit or None,
        logging_strategy="steps",
        logging_steps=train.logging_steps,
        report_to=train.report_to or "none",
        disable_tqdm=True,
        bf16=precision == "bf16",
        use_cpu=device == "cpu",
        activation_checkpointing=train.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="group_by_length",
        remove_unused_columns=False,
        dataloader_pin_memory=device == "cuda",
        # GPU: collate in worker processes while the GPU computes; CPU: every core computes, collation is cheap.
        dataloader_num_workers=min(4, distributed.threads_per_process() // 2) if device == "cuda" else 0,
        tf32=True if device == "cuda" and is_torch_tf32_available() else None,  # Ampere+: fp32 matmuls on tensor cores
        **parallel,
    )


def _optimizer_name(name: str, device: str) -> str:
    """`train.optim` checked against the Trainer's optimizer names (bitsandbytes' 8-bit and paged ones need CUDA)."""
    from transformers.training_args import OptimizerNames

    known = {option.value for option in OptimizerNames}
    if name not in known:
        raise ConfigError(f"train.optim: unknown optimizer {name!r}; e.g. auto, adamw_torch, paged_adamw_8bit")
    if device != "cuda" and ("8bit" in name or name.startswith("paged_")):
        raise ConfigError(f"train.optim: {name} needs a CUDA GPU (bitsandbytes); use auto on a CPU")
    return name


def _load_for_strategy(
    config: RunConfig,
    strategy: Strategy,
    *,
    num_labels: int | None,
    label_names: list[str] | None,
    device: str,
    precision: str,
    device_map: str | None = None,
) -> torch.nn.Module:
    """Load the model the way the strategy needs it (4-bit for QLoRA, bf16 frozen base for adapters on GPUs)."""
    on_cuda = device == "cuda"
    return models.load_model(
        config.model,
        num_labels=num_labels if config.model.task == "classification" else None,
        label_names=label_names,
        quantization_config=strategy.quantization_config(on_cuda=on_cuda),
        dtype=strategy.load_dtype(precision),
        device_map=device_map,
    )


def _train_feature(
    config: RunConfig,
    strategy: Any,
    model: torch.nn.Module,
    prepared: data_lib.PreparedData,
    sink: EventSink,
    staged: dict[str, Any],
    check_stop: Any,
) -> tuple[dict[str, dict[str, float]], float, float]:
    """Feature-based: embed every split once with the frozen model, fit a logistic regression on train.

    The fitted classifier goes into `staged["classifier"]`; the caller saves it with the final model.
    """
    batch_size = config.train.eval_batch_size or 2 * config.train.batch_size
    started = time.monotonic()
    model_key = cache_lib.model_fingerprint(config.model)

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        check_stop()  # once per batch: a stop requested while embedding a large split is noticed at once
        return prepared.collator(rows)

    features = {}
    for split, dataset in (("train", prepared.train), ("validation", prepared.validation), ("test", prepared.test)):
        if dataset is None:
            continue
        check_stop()
        sink.emit(Log(level="info", message=f"embedding {split} ({len(dataset)} examples)"))
        x, hit = strategy.embed_cached(
            model,
            dataset,
            collate,
            batch_size=batch_size,
            pooling=config.strategy.pooling,
            model_key=model_key,
        )
        if hit:
            sink.emit(Log(level="info", message=f"{split} embeddings from the cache ({cache_lib.FEATURES}/)"))
        features[split] = (x, np.asarray(dataset["labels"]))
    check_stop()
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
    staged["classifier"] = classifier
    return metrics, runtime, len(prepared.train) / runtime if runtime > 0 else 0.0


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """HF's length-grouped sampler with an order that depends only on (seed, epoch), not on the global RNG.

    The stock sampler draws from the global torch RNG when an epoch starts, whose state depends on every
    dropout mask drawn before; a run resumed in the middle of epoch 2 would then see a different order than
    the uninterrupted run. Seeding each epoch from `seed + epoch` makes the order reproducible on resume.
    `FinetuiTrainer` sets the epoch itself: accelerate's `set_epoch` does not reach the sampler through the batch
    skipper of a resumed epoch when the batches are also sharded over processes.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # type: ignore[no-untyped-def]
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class FinetuiTrainer(Trainer):
    """The HF Trainer with what finetui promises on top: atomic checkpoints, a resumable data order,
    and a stop at the first non-finite loss.

    Checkpoints: Trainer writes `checkpoint-<step>/` file by file into its output directory. Here it writes
    into `checkpoints/.staging/` instead; the finished folder is fsynced and renamed into place, then older
    ones beyond `save_total_limit` are renamed aside and deleted. A `checkpoint-<step>` folder is therefore
    always complete, whenever the process is killed. The pickled `training_args.bin` is not kept.
    """

    def __init__(self, *args: Any, data_seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._data_seed = data_seed
        self._staging_root: Path | None = None
        self._epoch_sampler: EpochSeededLengthGroupedSampler | None = None

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            self._epoch_sampler = EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, self._data_seed)
            return self._epoch_sampler
        return sampler

    def _run_epoch(self, *, epoch: int, **kwargs: Any) -> Any:
        if self._epoch_sampler is not None:
            self._epoch_sampler.set_epoch(epoch)
        return super()._run_epoch(epoch=epoch, **kwargs)

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        if "attention_mask" in inputs or "position_ids" not in inputs:
            return super()._track_num_input_tokens(inputs)
        # Packed batches (`data.packing`) have no padding and no attention mask: every token is real.
        tokens = torch.as_tensor(inputs["input_ids"].numel(), device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None):  # type: ignore[no-untyped-def]
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss).all()):
            raise NonFiniteLoss(self.state.global_step + 1, float(loss.detach().float().mean()))
        return loss

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """Evaluation leaves the RNG as it found it (its dataloader draws a seed from the global generator).

        Otherwise a checkpoint saved at the end of an epoch, just before the epoch's evaluation, would hold an
        RNG state that the uninterrupted run no longer has when the next epoch starts, and a run resumed from
        it would draw different dropout masks.
        """
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return super().evaluate(*args, **kwargs)

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging_root is not None:
            return str(self._staging_root)
        return super()._get_output_dir(trial)

    def _check_weights_finite(self) -> None:
        for parameter in self.model.parameters():
            if parameter.requires_grad and not bool(torch.isfinite(parameter).all()):
                raise NonFiniteLoss(self.state.global_step, float("nan"), what="weights")

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        self._check_weights_finite()  # never replace a good checkpoint by a diverged one
        final_root = Path(super()._get_output_dir(trial))
        staging_root = final_root / STAGING_DIR
        main = self.args.should_save
        distributed = self.args.world_size > 1
        if main:
            shutil.rmtree(staging_root, ignore_errors=True)
        if distributed:
            self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        if distributed:
            self.accelerator.wait_for_everyone()
        if main:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            staged = staging_root / name
            (staged / TRAINING_ARGS_NAME).unlink(missing_ok=True)
            fsync_tree(staged)
            replace_dir(staged, final_root / name)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(final_root.parent, self.args.save_total_limit)
        if distributed:
            self.accelerator.wait_for_everyone()


def _build_trainer(
    config: RunConfig,
    model: torch.nn.Module,
    prepared: data_lib.PreparedData,
    sink: EventSink,
    run_dir: Path,
    *,
    device: str,
    precision: str,
    stop_event: threading.Event | None,
    memory: MemoryMeter | None = None,
) -> tuple[FinetuiTrainer, EventBridge]:
    task = config.model.task
    args = training_arguments(config, run_dir / CHECKPOINTS_DIR, device=device, precision=precision)
    bridge = EventBridge(
        sink,
        task,
        stop_event,
        samples_per_step=args.train_batch_size * args.gradient_accumulation_steps * args.world_size,
        stop_file=run_dir / STOP_FILE,
        memory=memory,
    )
    classification = task == "classification"
    trainer = FinetuiTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.validation,
        data_collator=prepared.collator,
        compute_metrics=classification_metrics if classification else None,
        preprocess_logits_for_metrics=_predicted_class if classification else None,
        callbacks=[bridge],
        data_seed=config.train.seed,
    )
    trainer.remove_callback(PrinterCallback)  # the bridge reports logs as events; stdout stays clean
    point_trackers_at(trainer, run_dir)
    return trainer, bridge


def _final_metrics(
    trainer: Trainer, bridge: EventBridge, prepared: data_lib.PreparedData, task: str
) -> dict[str, dict[str, float]]:
    """Validation (reusing an evaluation of the final weights made during training) and test metrics."""
    step = trainer.state.global_step
    if bridge.last_validation is not None and bridge.last_validation[0] == step:
        validation = bridge.last_validation[1]
    else:
        validation = _split_metrics(trainer.evaluate(prepared.validation, metric_key_prefix="eval"), "eval", task)
    metrics = {"validation": validation}
    if prepared.test is not None:
        metrics["test"] = _split_metrics(trainer.evaluate(prepared.test, metric_key_prefix="test"), "test", task)
    return metrics


def _save_final(run_dir: Path, write: Any) -> Path:
    """Write the final model folder beside the run (`.model.staging`), then rename it to `model/`.

    In a multi-process run every rank calls `write` (FSDP and DeepSpeed gather the weights together), rank 0
    stages and renames.
    """
    model_dir = run_dir / MODEL_DIR
    staging = run_dir / f".{MODEL_DIR}.staging"
    main = distributed.is_main()
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    distributed.barrier()
    write(staging)
    distributed.barrier()
    if main:
        (staging / TRAINING_ARGS_NAME).unlink(missing_ok=True)
        fsync_tree(staging)
        replace_dir(staging, model_dir)
    return model_dir


def prepare_run_dir(config: RunConfig, output_dir: Path | None = None) -> tuple[RunConfig, Path]:
    """Check a config, resolve `model.task`, and create its run directory (with config.toml).

    Raises ConfigError (bad input, nothing created) for problems found before any data or weights load.
    """
    quiet_library_output()
    check_run_config(config, output_dir)
    config = config.with_task(models.resolve_task(config.model))
    return config, create_run_dir(config, output_dir)


def run_training(
    config: RunConfig,
    sink: EventSink,
    *,
    output_dir: Path | None = None,
    stop_event: threading.Event | None = None,
    signal_stop: bool = False,
) -> RunResult:
    """Train, evaluate and save one run; every step of the way is an event on `sink` and in events.jsonl.

    Setting `stop_event` stops the run at the next step with a checkpoint (`run_stopped`); so does a `stop`
    file in the run directory (`engine.detach.request_stop`). `signal_stop`: the caller turns SIGINT into
    `stop_event` (the CLI does), so other processes may stop it with SIGINT too.

    Raises ConfigError (and creates nothing) for mistakes found before the run directory exists: no or
    missing data files, a model that cannot be found (`model.task = "auto"` reads its config first), an
    output directory that cannot be written or is itself a run directory. Every later problem is recorded in
    the run directory (status `failed`) and returned.
    """
    if distributed.world_size() > 1:  # a torchrun / accelerate launch started by hand
        config, run_dir = distributed.prepare_shared_run_dir(config, output_dir)
    else:
        config, run_dir = prepare_run_dir(config, output_dir)
    if distributed.needs_launch(config):
        return distributed.run_launched(run_dir, config.train.nproc, sink, stop_event=stop_event)
    return _execute(config, run_dir, sink, stop_event=stop_event, resume=False, signal_stop=signal_stop)


def resume_training(
    run_dir: Path, sink: EventSink, *, stop_event: threading.Event | None = None, signal_stop: bool = False
) -> RunResult:
    """Continue a stopped, failed or interrupted run in its own directory from its last complete checkpoint.

    Model or adapter weights, optimizer, scheduler, RNG states, data order and step counter come back from
    the checkpoint (HF Trainer's `resume_from_checkpoint`); events append to the same events.jsonl, starting
    with a `run_started` whose `resumed_from_step` is the checkpoint's step (0: no checkpoint yet, training
    restarts; None: the directory was prepared but never started, as `start_detached` does).
    Raises ConfigError when the directory is not a run, the run finished, or another process runs it.
    """
    quiet_library_output()
    run_dir = Path(run_dir)
    config = check_resumable(run_dir)
    if distributed.needs_launch(config):
        return distributed.run_launched(run_dir, config.train.nproc, sink, stop_event=stop_event)
    return _execute(config, run_dir, sink, stop_event=stop_event, resume=True, signal_stop=signal_stop)


def _training_done(checkpoint: Path) -> bool:
    """Whether a checkpoint was written at the run's last optimizer step."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return 0 < int(state.get("max_steps") or 0) <= int(state.get("global_step") or 0)


def _was_started(run_dir: Path) -> bool:
    try:
        with (run_dir / EVENTS_FILE).open("rb") as handle:
            return b'"run_started"' in handle.readline()
    except FileNotFoundError:
        return False


@dataclass
class _Session:
    """What the failure paths of `_execute` need to know about how far a run got."""

    device: str = "cpu"
    precision: str = "fp32"
    model: torch.nn.Module | None = None
    trainer: FinetuiTrainer | None = None
    in_training: bool = False
    main: bool = True  # rank 0 (or the only process): the one that writes the run directory
    memory: MemoryMeter | None = None
    estimated_memory: int | None = None

    def step(self) -> int | None:
        return self.trainer.state.global_step if self.trainer is not None else None

    def memory_record(self) -> dict[str, Any]:
        """summary.json's `memory` (estimate against the measured peak); nothing before the model began to load."""
        if self.memory is None:
            return {}
        return {"memory": memory_record(self.estimated_memory, self.memory.peak(), self.device)}


def _execute(
    config: RunConfig,
    run_dir: Path,
    sink: EventSink,
    *,
    stop_event: threading.Event | None,
    resume: bool,
    signal_stop: bool = False,
) -> RunResult:
    main = distributed.is_main()
    if main:
        clean_partial_writes(run_dir)
    stop_file = run_dir / STOP_FILE
    if distributed.owns_pid_file():
        stop_file.unlink(missing_ok=True)  # a request meant for an earlier session (a launcher clears it itself)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    resumed_from: int | None = None
    if checkpoint is not None:
        resumed_from = checkpoint_step(checkpoint)
    elif resume and _was_started(run_dir):
        resumed_from = 0
    previous = (read_summary(run_dir) or {}) if resume else {}
    file_sink = JsonlFileSink(run_dir / EVENTS_FILE) if main else None
    events = FanoutSink(file_sink, sink) if file_sink is not None else FanoutSink()  # ranks > 0 tell nothing
    log_bridge = _LogBridge(events)
    for name in LOGGERS_BRIDGED:
        logging.getLogger(name).addHandler(log_bridge)
    if distributed.owns_pid_file():
        write_pid(run_dir, signals=signal_stop)
    task = config.model.task
    summary: dict[str, Any] = {
        "status": "running",
        "name": config.name,
        "run_dir": str(run_dir),
        "model": config.model.id,
        "task": task,
        "strategy": config.strategy.kind,
        "started_at": previous.get("started_at", time.time()),
        "processes": distributed.world_size(),
    }
    if resumed_from is not None:
        summary.update(resumed_from_step=resumed_from, resumes=int(previous.get("resumes", 0)) + 1)
    session = _Session(main=main)

    def check_stop() -> None:
        # Before training, rank 0 alone decides (it exits and torchrun ends the others); in training all agree.
        if main and ((stop_event is not None and stop_event.is_set()) or stop_file.exists()):
            raise StopRequested

    try:
        if main:
            write_summary(run_dir, summary)
        events.emit(
            RunStarted(
                run_dir=str(run_dir),
                name=config.name,
                model=config.model.id,
                strategy=config.strategy.kind,
                task=task,
                config=config.model_dump(mode="json"),
                resumed_from_step=resumed_from,
                processes=distributed.world_size(),
            )
        )
        if checkpoint is not None:
            events.emit(Log(level="info", message=f"resuming from {checkpoint.name}"))
        elif resumed_from == 0:
            events.emit(Log(level="warning", message="no complete checkpoint yet: training restarts from step 0"))
        torch.manual_seed(config.train.seed)
        torch.set_num_threads(distributed.threads_per_process())
        device = session.device = resolve_device(config.train.device)
        precision = session.precision = resolve_precision(config.train.precision, device)
        if main:
            record_environment(run_dir, config, events)
        if device == "cpu" and precision == "bf16":
            events.emit(
                Log(level="warning", message="bf16 on a CPU is often far slower than fp32 (train.precision=auto)")
            )
        if device == "cpu" and (config.train.fsdp or config.train.deepspeed):
            events.emit(
                Log(level="warning", message="FSDP and DeepSpeed need GPUs: on CPUs accelerate trains with plain DDP")
            )
        if config.model.trust_remote_code:
            events.emit(
                Log(level="warning", message="model.trust_remote_code is on: code from the model repo will run")
            )
        strategy = get_strategy(config.strategy, task)
        strategy.quantization_config(on_cuda=device == "cuda")  # QLoRA: a missing bitsandbytes fails here, early
        check_stop()
        events.emit(Log(level="info", message=f"loading tokenizer and data (device {device}, {precision})"))
        tokenizer = models.load_tokenizer(config.model)
        prepared = data_lib.prepare_data(
            config.data, task=task, tokenizer=tokenizer, seed=config.train.seed, cache=True
        )
        if prepared.from_cache:
            events.emit(Log(level="info", message=f"tokenised data from the cache ({cache_lib.TOKENISED}/)"))
        for warning in prepared.warnings:
            events.emit(Log(level="warning", message=warning))
        check_stop()
        num_labels = config.model.num_labels or prepared.num_labels
        events.emit(Log(level="info", message=f"loading model {config.model.id}"))
        session.memory = MemoryMeter(device)
        session.memory.start()  # the baseline: data and libraries are loaded, the model is not
        model = _load_for_strategy(
            config,
            strategy,
            num_labels=num_labels,
            label_names=prepared.label_names,
            device=device,
            precision=precision,
        )
        model = session.model = strategy.prepare(model)
        if config.data.packing:
            data_lib.check_packing(getattr(model.config, "model_type", ""))
        freeze_map = compute_freeze_map(
            model,
            batch_size=config.train.batch_size,
            seq_len=config.data.max_length,
            gradient_checkpointing=config.train.gradient_checkpointing,
            processes=distributed.world_size(),
            sharding=distributed.sharding(config),
            precision=precision,
            device=device,
            eval_batch_size=config.train.eval_batch_size,
            first_token_top=frozen_prefix.first_token_top_block(model, config),
        )
        session.estimated_memory = freeze_map.memory.total_bytes if freeze_map.memory is not None else None
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
        check_stop()
        if strategy.trains_with_trainer:
            if config.train.cache_frozen and config.strategy.kind in frozen_prefix.CACHED_KINDS:
                prepared = frozen_prefix.cache_frozen_prefix(
                    model,
                    prepared,
                    events,
                    task=task,
                    device=device,
                    precision=precision,
                    batch_size=config.train.eval_batch_size or 2 * config.train.batch_size,
                    check_stop=check_stop,
                )
            trainer, bridge = _build_trainer(
                config,
                model,
                prepared,
                events,
                run_dir,
                device=device,
                precision=precision,
                stop_event=stop_event,
                memory=session.memory,
            )
            session.trainer = trainer
            if checkpoint is not None and _training_done(checkpoint):
                # Killed after the last step (while evaluating or saving): HF Trainer would run one step too
                # many when resumed at max_steps in mid-epoch, so load the final weights and go on from there.
                trainer._load_from_checkpoint(str(checkpoint))
                trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
                runtime = float(previous.get("train_runtime_s") or 0.0)
                samples_per_s = float(previous.get("train_samples_per_second") or 0.0)
            else:
                session.in_training = True
                output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
                session.in_training = False
                runtime = output.metrics["train_runtime"]
                samples_per_s = output.metrics["train_samples_per_second"]
            summary.update(
                steps=trainer.state.global_step,
                epochs=float(trainer.state.epoch or 0.0),
                train_runtime_s=runtime,
                train_samples_per_second=samples_per_s,
            )
            if bridge.stopped_at is not None:
                raise StopRequested
            last = latest_checkpoint(run_dir)
            if last is None or checkpoint_step(last) != trainer.state.global_step:
                trainer._save_checkpoint(trainer.model, trial=None)  # evaluation and saving can resume from here
            metrics = _final_metrics(trainer, bridge, prepared, task)

            def write_model(folder: Path) -> None:
                trainer.save_model(str(folder))
                if main:
                    tokenizer.save_pretrained(str(folder))

        else:
            staged_classifier: dict[str, Any] = {}
            metrics, runtime, samples_per_s = _train_feature(
                config, strategy, model, prepared, events, staged_classifier, check_stop
            )
            metrics.pop("train", None)
            summary.update(train_runtime_s=runtime, train_samples_per_second=samples_per_s)

            def write_model(folder: Path) -> None:
                strategy.save_classifier(staged_classifier["classifier"], prepared.label_names, folder)
                tokenizer.save_pretrained(str(folder))

        model_dir = _save_final(run_dir, write_model)
        summary.update(
            status="finished",
            validation=metrics.get("validation"),
            test=metrics.get("test"),
            model_dir=str(model_dir),
            finished_at=time.time(),
            **session.memory_record(),
        )
        if main:
            write_summary(run_dir, summary)
        events.emit(RunFinished(summary=summary))
        return RunResult("finished", run_dir, summary, EXIT_OK)
    except StopRequested:
        return _stopped(run_dir, summary, events, session)
    except Exception as exc:
        return _failed(exc, config, run_dir, summary, events, session)
    finally:
        if main:
            run_notify_command(config.train.notify_command, summary, events)
        if session.memory is not None:
            session.memory.stop()
        for name in LOGGERS_BRIDGED:
            logging.getLogger(name).removeHandler(log_bridge)
        if file_sink is not None:
            file_sink.close()
            stop_file.unlink(missing_ok=True)
        remove_pid(run_dir)


def _stopped(run_dir: Path, summary: dict[str, Any], events: EventSink, session: _Session) -> RunResult:
    """Record a requested stop; when it came between checkpoints (during an evaluation), checkpoint first."""
    trainer = session.trainer
    last = latest_checkpoint(run_dir)
    if trainer is not None and trainer.state.global_step > (checkpoint_step(last) if last else 0) and trainer.optimizer:
        trainer._save_checkpoint(trainer.model, trial=None)
        last = latest_checkpoint(run_dir)
    step = trainer.state.global_step if trainer is not None else (checkpoint_step(last) if last else 0) or 0
    summary.update(status="stopped", finished_at=time.time(), **session.memory_record())
    if trainer is not None:
        summary.update(steps=step, epochs=float(trainer.state.epoch or 0.0))
    if session.main:
        write_summary(run_dir, summary)
    events.emit(RunStopped(step=step, checkpoint=str(last) if last is not None else None))
    return RunResult("stopped", run_dir, summary, EXIT_STOPPED)


def _failed(
    exc: Exception, config: RunConfig, run_dir: Path, summary: dict[str, Any], events: EventSink, session: _Session
) -> RunResult:
    """Record a failure with a one-line message: bad input (exit 2) or a training fault (exit 1)."""
    user_error = isinstance(exc, ConfigError)
    last = latest_checkpoint(run_dir)
    kept = str(last) if last is not None else None
    step = session.step()
    if user_error:
        reason, message = "bad_input", str(exc)
    elif isinstance(exc, NonFiniteLoss):
        reason, message, step = "nan_loss", nonfinite_loss_message(exc, config, session.precision, kept), exc.step
    elif is_out_of_memory(exc):
        failed_step = step + 1 if step is not None and session.in_training else None
        reason, message = "out_of_memory", oom_message(exc, config, session.model, session.device, failed_step)
    elif is_disk_full(exc):
        reason, message = "disk_full", disk_full_message(exc, str(run_dir))  # type: ignore[arg-type]
    else:
        reason, message = "error", f"{type(exc).__name__}: {exc}"
    message = " ".join(message.split())  # one line, whatever the exception text held
    summary.update(status="failed", error=message, reason=reason, finished_at=time.time(), **session.memory_record())
    if step is not None:
        summary["steps"] = step
    if not session.main:  # rank > 0: its error goes to run.log; rank 0 records the run's end
        sys.stderr.write(f"rank {distributed.rank()}: {message}\n{traceback.format_exc()}")
        return RunResult("failed", run_dir, summary, EXIT_BAD_INPUT if user_error else EXIT_FAILED)
    with contextlib.suppress(OSError):  # a full disk must not hide the failure itself
        (run_dir / ERROR_FILE).write_text(traceback.format_exc(), encoding="utf-8")
    with contextlib.suppress(OSError):
        write_summary(run_dir, summary)
    events.emit(RunFailed(error=message, user_error=user_error, step=step, reason=reason, checkpoint=kept))
    return RunResult("failed", run_dir, summary, EXIT_BAD_INPUT if user_error else EXIT_FAILED)


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
    device = resolve_device("cpu" if config.train.device == "cpu" else "auto", one_gpu=False)
    precision = resolve_precision(config.train.precision, device)
    # Inference may use every GPU: "sequential" fills the first and spills onto the next only what does not fit.
    device_map = "sequential" if device == "cuda" and torch.cuda.device_count() > 1 else None
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
        device_map=device_map,
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
            device_map=device_map,
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
