"""One session of a run, from its prepared directory to `run_finished`, `run_stopped` or `run_failed`.

A session is a sequence of phases (torchtune's recipe shape): `_begin` (bookkeeping: what to resume from, the
pid file, the summary), `_announce` (run_started, device and precision), `_load` (tokenizer, data, model, the
strategy's preparation, the freeze map), `_train` (the HF Trainer, or the feature strategy's own loop),
`_finish` (final metrics, the model folder, the summary). A stop request ends any phase in `_stopped` (with a
checkpoint when one is due), an exception in `_failed` (a one-line message, the traceback in error.log).
Every step is an event on the caller's sink and in the run's events.jsonl.

Only `engine.api` starts sessions; the CLI and the TUI go through it.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_callback import TrainerState

from engine import cache as cache_lib
from engine import data as data_lib
from engine import models
from engine.config import ConfigError, RunConfig
from engine.data_report import check_data
from engine.devices import resolve_device, resolve_precision, set_training_threads
from engine.environment import record_environment
from engine.events import (
    EXIT_OK,
    EXIT_STOPPED,
    FreezeMapReady,
    Log,
    RunFailed,
    RunFinished,
    RunResult,
    RunStarted,
    RunStopped,
    exit_code_of,
)
from engine.freeze_map import compute_freeze_map
from engine.fsio import fsync_tree, replace_dir
from engine.library_logs import bridged_logs
from engine.model_card import model_card
from engine.notify import run_notify_command
from engine.parallel import barrier, is_main, owns_pid_file, rank, sharding, world_size
from engine.runs import (
    ERROR_FILE,
    EVENTS_FILE,
    MODEL_DIR,
    STOP_FILE,
    StopRequest,
    StopRequested,
    checkpoint_step,
    clean_partial_writes,
    latest_checkpoint,
    read_summary,
    remove_pid,
    write_pid,
    write_summary,
)
from engine.sinks import EventSink, FanoutSink, JsonlFileSink
from engine.strategies import Strategy, get_strategy
from engine.training import cpu_dropout, frozen_prefix, packed_attention
from engine.training.faults import (
    NonFiniteLoss,
    disk_full_message,
    is_disk_full,
    is_out_of_memory,
    nonfinite_loss_message,
    oom_message,
)
from engine.training.feature import train_feature
from engine.training.generation_probe import generation_probe
from engine.training.hf_trainer import FinetuiTrainer, build_trainer, final_metrics, training_done
from engine.training.memory import MemoryMeter, memory_record

ModelWriter = Callable[[Path], None]


@dataclass
class _Loaded:
    """What `_load` produced: the strategy, the tokenizer, the tokenised data and the prepared model."""

    strategy: Strategy
    tokenizer: Any
    prepared: data_lib.PreparedData
    model: torch.nn.Module


def execute(
    config: RunConfig,
    run_dir: Path,
    sink: EventSink,
    *,
    stop_event: threading.Event | None,
    resume: bool,
    signal_stop: bool = False,
) -> RunResult:
    """Run one session of a prepared run directory in this process (or as one worker of a launch)."""
    return RunSession(config, run_dir, sink, stop_event=stop_event, resume=resume, signal_stop=signal_stop).run()


class RunSession:
    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        sink: EventSink,
        *,
        stop_event: threading.Event | None,
        resume: bool,
        signal_stop: bool,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.task = config.model.task
        self.main = is_main()  # rank 0 (or the only process): the one that writes the run directory
        self.stop = StopRequest(run_dir, stop_event)
        self.device = "cpu"
        self.precision = "fp32"
        self.threads = 1
        self.model: torch.nn.Module | None = None
        self.strategy: Strategy | None = None
        self.trainer: FinetuiTrainer | None = None
        self.in_training = False
        self.memory: MemoryMeter | None = None  # measures from just before the model loads
        self.estimated_memory: int | None = None
        self._begin(resume, sink, signal_stop)

    # phases

    def _begin(self, resume: bool, sink: EventSink, signal_stop: bool) -> None:
        """Clean up after an interrupted session, find the checkpoint to resume from, open events.jsonl."""
        run_dir = self.run_dir
        if self.main:
            clean_partial_writes(run_dir)
        if owns_pid_file():
            (run_dir / STOP_FILE).unlink(missing_ok=True)  # meant for an earlier session (a launcher clears it)
        self.checkpoint = latest_checkpoint(run_dir) if resume else None
        self.resumed_from: int | None = None
        if self.checkpoint is not None:
            self.resumed_from = checkpoint_step(self.checkpoint)
        elif resume and _was_started(run_dir):
            self.resumed_from = 0
        self.previous = (read_summary(run_dir) or {}) if resume else {}
        self.file_sink = JsonlFileSink(run_dir / EVENTS_FILE) if self.main else None
        # ranks > 0 tell nothing
        self.events = FanoutSink(self.file_sink, sink) if self.file_sink is not None else FanoutSink()
        if owns_pid_file():
            write_pid(run_dir, signals=signal_stop)
        self.summary: dict[str, Any] = {
            "status": "running",
            "name": self.config.name,
            "run_dir": str(run_dir),
            "model": self.config.model.id,
            "task": self.task,
            "strategy": self.config.strategy.kind,
            "started_at": self.previous.get("started_at", time.time()),
            "processes": world_size(),
        }
        if self.resumed_from is not None:
            resumes = int(self.previous.get("resumes", 0)) + 1
            self.summary.update(resumed_from_step=self.resumed_from, resumes=resumes)
        # a checkpoint resumes with the dropout masks it trained with (runs older than BitDropout used torch's)
        resuming = self.checkpoint is not None
        self.summary["cpu_dropout"] = self.previous.get("cpu_dropout", "torch") if resuming else "bits"

    def run(self) -> RunResult:
        try:
            with bridged_logs(self.events) as self.library_logs:
                try:
                    self._announce()
                    loaded = self._load()
                    if loaded.strategy.trains_with_trainer:
                        metrics, write_model = self._train(loaded)
                    else:
                        metrics, write_model = self._train_feature(loaded)
                    return self._finish(metrics, write_model)
                except StopRequested:
                    return self._stopped()
                except Exception as exc:
                    return self._failed(exc)
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self.main:
            run_notify_command(self.config.train.notify_command, self.summary, self.events)
        if self.memory is not None:
            self.memory.stop()
        if self.file_sink is not None:
            self.file_sink.close()
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)
        remove_pid(self.run_dir)

    def _memory_record(self) -> dict[str, Any]:
        """summary.json's `memory` (the estimate against the measured peak), once the model began to load."""
        if self.memory is None:
            return {}
        return {"memory": memory_record(self.estimated_memory, self.memory.peak(), self.device)}

    def _check_stop(self) -> None:
        # Before training, rank 0 alone decides (it exits and torchrun ends the others); in training all agree.
        if self.main:
            self.stop.check()

    def _log(self, level: str, message: str) -> None:
        self.events.emit(Log(level=level, message=message))

    def _announce(self) -> None:
        """run_started, what is resumed, and the device and precision (with warnings about poor choices)."""
        config = self.config
        if self.main:
            write_summary(self.run_dir, self.summary)
        self.events.emit(
            RunStarted(
                run_dir=str(self.run_dir),
                name=config.name,
                model=config.model.id,
                strategy=config.strategy.kind,
                task=self.task,
                config=config.model_dump(mode="json"),
                resumed_from_step=self.resumed_from,
                processes=world_size(),
            )
        )
        if self.checkpoint is not None:
            self._log("info", f"resuming from {self.checkpoint.name}")
        elif self.resumed_from == 0:
            self._log("warning", "no complete checkpoint yet: training restarts from step 0")
        torch.manual_seed(config.train.seed)
        self.threads = set_training_threads()
        self.device = resolve_device(config.train.device)
        self.precision = resolve_precision(config.train.precision, self.device)
        if self.main:
            record_environment(self.run_dir, config, self.events)
        if self.device == "cpu" and self.precision == "bf16":
            self._log("warning", "bf16 on a CPU is often far slower than fp32 (train.precision=auto)")
        if self.device == "cpu" and (config.train.fsdp or config.train.deepspeed):
            self._log("warning", "FSDP and DeepSpeed need GPUs: on CPUs accelerate trains with plain DDP")
        if config.model.trust_remote_code:
            self._log("warning", "model.trust_remote_code is on: code from the model repo will run")

    def _load(self) -> _Loaded:
        """The strategy, tokenizer, tokenised data and prepared model; the freeze map as an event."""
        config = self.config
        strategy = self.strategy = get_strategy(config.strategy, self.task)
        strategy.quantization_config(on_cuda=self.device == "cuda")  # QLoRA: a missing bitsandbytes fails here
        self._check_stop()
        threads = f", {self.threads} CPU thread{'s' if self.threads > 1 else ''}" if self.device == "cpu" else ""
        self._log("info", f"loading tokenizer and data (device {self.device}, {self.precision}{threads})")
        tokenizer = models.load_tokenizer(config.model)
        prepared = data_lib.prepare_data(
            config.data, task=self.task, tokenizer=tokenizer, seed=config.train.seed, cache=True
        )
        if prepared.from_cache:
            self._log("info", f"tokenised data from the cache ({cache_lib.TOKENISED}/)")
        # the gate refuses data that cannot train honestly; a resumed run trained on it already: it warns
        self.summary["warnings"] = check_data(config.data, prepared.encoded, refuse=self.resumed_from is None)
        for warning in self.summary["warnings"]:
            self._log("warning", warning)
        self._check_stop()
        num_labels = config.model.num_labels or prepared.num_labels
        self._log("info", f"loading model {config.model.id}")
        self.memory = MemoryMeter(self.device)
        self.memory.start()  # the baseline: data and libraries are loaded, the model is not
        self.library_logs.restoring_from = self.checkpoint.name if self.checkpoint is not None else None
        model = strategy.load_model(
            config.model,
            num_labels=num_labels,
            label_names=prepared.label_names,
            device=self.device,
            precision=self.precision,
        )
        self.library_logs.restoring_from = None
        model = self.model = strategy.prepare(model)
        use_fast_training_paths(model, config, self.device, bit_dropout=self.summary["cpu_dropout"] == "bits")
        self._announce_freeze_map(model, prepared, num_labels, strategy)
        self._check_stop()
        return _Loaded(strategy, tokenizer, prepared, model)

    def _announce_freeze_map(
        self, model: torch.nn.Module, prepared: data_lib.PreparedData, num_labels: Any, strategy: Strategy
    ) -> None:
        config = self.config
        # batches are padded to their longest row; packed rows fill max_length
        seq_len = config.data.max_length if config.data.packing else data_lib.longest_row(prepared)
        freeze_map = compute_freeze_map(
            model,
            batch_size=config.train.batch_size,
            seq_len=seq_len,
            gradient_checkpointing=config.train.gradient_checkpointing,
            processes=world_size(),
            sharding=sharding(config),
            precision=self.precision,
            device=self.device,
            eval_batch_size=config.train.eval_batch_size,
            first_token_top=frozen_prefix.first_token_top_block(model, config, strategy),
        )
        self.estimated_memory = freeze_map.memory.total_bytes if freeze_map.memory is not None else None
        self.events.emit(FreezeMapReady(freeze_map=freeze_map.to_dict()))
        self.summary.update(
            trainable_params=freeze_map.trainable_params,
            total_params=freeze_map.total_params,
            trainable_percent=freeze_map.trainable_percent,
            label_names=prepared.label_names,
            num_labels=num_labels,
            train_examples=len(prepared.train),
            validation_examples=len(prepared.validation),
            test_examples=len(prepared.test) if prepared.test is not None else None,
            device=self.device,
            precision=self.precision,
        )

    def _train(self, loaded: _Loaded) -> tuple[dict[str, dict[str, float]], ModelWriter]:
        """Train with the HF Trainer (from the checkpoint when resuming), checkpoint the end, score the result."""
        config, prepared = self.config, loaded.prepared
        if config.train.cache_frozen and loaded.strategy.caches_frozen_prefix:
            prepared = frozen_prefix.cache_frozen_prefix(
                loaded.model,
                prepared,
                self.events,
                task=self.task,
                device=self.device,
                precision=self.precision,
                batch_size=config.train.eval_batch_size or 2 * config.train.batch_size,
                check_stop=self._check_stop,
            )
        trainer, bridge = build_trainer(
            config,
            loaded.model,
            prepared,
            self.events,
            self.stop,
            device=self.device,
            precision=self.precision,
            memory=self.memory,
            probe=generation_probe(config, loaded.tokenizer, loaded.prepared.encoded, self.events),
        )
        self.trainer = trainer
        runtime, samples_per_s = self._fit(trainer)
        self.summary.update(
            steps=trainer.state.global_step,
            epochs=float(trainer.state.epoch or 0.0),
            train_runtime_s=runtime,
            train_samples_per_second=samples_per_s,
        )
        if bridge.stopped_at is not None:
            raise StopRequested
        self._record_best(trainer.state)
        last = latest_checkpoint(self.run_dir)
        if last is None or checkpoint_step(last) != trainer.state.global_step:
            trainer._save_checkpoint(trainer.model, trial=None)  # evaluation and saving can resume from here
        metrics = final_metrics(trainer, bridge, prepared, self.task)

        def write_model(folder: Path) -> None:
            trainer.save_model(str(folder))
            if self.main:
                loaded.strategy.name_base(folder, models.portable_id(self.config.model))
                loaded.tokenizer.save_pretrained(str(folder))

        return metrics, write_model

    def _record_best(self, state: TrainerState) -> None:
        """With `train.metric_for_best_model`, the model the run ends with is its best checkpoint's: say which."""
        metric = self.config.train.metric_for_best_model
        if metric is None or not state.best_global_step:
            return
        self.summary["best"] = {"metric": metric, "value": state.best_metric, "step": state.best_global_step}
        best = f"step {state.best_global_step}'s (best {metric} {state.best_metric:.4g})"
        self._log("info", f"the run ends with the model of {best}")

    def _fit(self, trainer: FinetuiTrainer) -> tuple[float, float]:
        """trainer.train() from the session's checkpoint; (runtime s, samples/s) of the training."""
        checkpoint = self.checkpoint
        if checkpoint is not None and training_done(checkpoint):
            # Killed after the last step (while evaluating or saving): HF Trainer would run one step too
            # many when resumed at max_steps in mid-epoch, so load the final weights and go on from there.
            trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
            best = trainer.state.best_model_checkpoint if self.config.train.metric_for_best_model else None
            trainer._load_from_checkpoint(best if best and Path(best).is_dir() else str(checkpoint))
            previous = self.previous
            return float(previous.get("train_runtime_s") or 0.0), float(previous.get("train_samples_per_second") or 0.0)
        self.in_training = True
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        self.in_training = False
        return output.metrics["train_runtime"], output.metrics["train_samples_per_second"]

    def _train_feature(self, loaded: _Loaded) -> tuple[dict[str, dict[str, float]], ModelWriter]:
        strategy = loaded.strategy
        result = train_feature(self.config, strategy, loaded.model, loaded.prepared, self.events, self.stop)  # type: ignore[arg-type]
        self.summary.update(train_runtime_s=result.runtime_s, train_samples_per_second=result.samples_per_second)

        def write_model(folder: Path) -> None:
            strategy.save_classifier(result.classifier, loaded.prepared.label_names, folder)  # type: ignore[attr-defined]
            loaded.tokenizer.save_pretrained(str(folder))

        return result.metrics, write_model

    def _finish(self, metrics: dict[str, dict[str, float]], write_model: ModelWriter) -> RunResult:
        self.summary.update(validation=metrics.get("validation"), test=metrics.get("test"))
        model_dir = self._save_final(write_model)
        self.summary.update(
            status="finished", model_dir=str(model_dir), finished_at=time.time(), **self._memory_record()
        )
        if self.main:
            write_summary(self.run_dir, self.summary)
        self.events.emit(RunFinished(summary=self.summary))
        return RunResult("finished", self.run_dir, self.summary, EXIT_OK)

    def _save_final(self, write: ModelWriter) -> Path:
        """Write the final model folder beside the run (`.model.staging`), then rename it to `model/`.

        In a multi-process run every rank calls `write` (FSDP and DeepSpeed gather the weights together), rank 0
        stages and renames.
        """
        model_dir = self.run_dir / MODEL_DIR
        staging = self.run_dir / f".{MODEL_DIR}.staging"
        if self.main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        barrier()
        write(staging)
        barrier()
        if self.main:
            (staging / TRAINING_ARGS_NAME).unlink(missing_ok=True)
            base = models.portable_id(self.config.model)
            card = model_card(
                self.config, self.summary, base_model=base, adapter=bool(self.strategy and self.strategy.is_peft)
            )
            (staging / "README.md").write_text(card, encoding="utf-8")
            fsync_tree(staging)
            replace_dir(staging, model_dir)
        return model_dir

    # how a session ends early

    def _stopped(self) -> RunResult:
        """Record a requested stop; when it came between checkpoints (during an evaluation), checkpoint first."""
        trainer = self.trainer
        last = latest_checkpoint(self.run_dir)
        done = checkpoint_step(last) if last else 0
        if trainer is not None and trainer.state.global_step > (done or 0) and trainer.optimizer:
            trainer._save_checkpoint(trainer.model, trial=None)
            last = latest_checkpoint(self.run_dir)
        step = trainer.state.global_step if trainer is not None else (checkpoint_step(last) if last else 0) or 0
        self.summary.update(status="stopped", finished_at=time.time(), **self._memory_record())
        if trainer is not None:
            self.summary.update(steps=step, epochs=float(trainer.state.epoch or 0.0))
        if self.main:
            write_summary(self.run_dir, self.summary)
        self.events.emit(RunStopped(step=step, checkpoint=str(last) if last is not None else None))
        return RunResult("stopped", self.run_dir, self.summary, EXIT_STOPPED)

    def _failed(self, exc: Exception) -> RunResult:
        """Record a failure with a one-line message: bad input (exit 2) or a training fault (exit 1)."""
        user_error = isinstance(exc, ConfigError)
        last = latest_checkpoint(self.run_dir)
        kept = str(last) if last is not None else None
        reason, message, step = self._fault(exc, kept)
        message = " ".join(message.split())  # one line, whatever the exception text held
        self.summary.update(
            status="failed", error=message, reason=reason, finished_at=time.time(), **self._memory_record()
        )
        if step is not None:
            self.summary["steps"] = step
        failed = RunFailed(error=message, user_error=user_error, step=step, reason=reason, checkpoint=kept)
        code = exit_code_of(failed)
        if not self.main:  # rank > 0: its error goes to run.log; rank 0 records the run's end
            sys.stderr.write(f"rank {rank()}: {message}\n{traceback.format_exc()}")
            return RunResult("failed", self.run_dir, self.summary, code)
        with contextlib.suppress(OSError):  # a full disk must not hide the failure itself
            (self.run_dir / ERROR_FILE).write_text(traceback.format_exc(), encoding="utf-8")
        with contextlib.suppress(OSError):
            write_summary(self.run_dir, self.summary)
        self.events.emit(failed)
        return RunResult("failed", self.run_dir, self.summary, code)

    def _fault(self, exc: Exception, kept: str | None) -> tuple[str, str, int | None]:
        """(reason, message, step) of a failure: bad input, a non-finite loss, out of memory, a full disk."""
        step = self.trainer.state.global_step if self.trainer is not None else None
        if isinstance(exc, ConfigError):
            return "bad_input", str(exc), step
        if isinstance(exc, NonFiniteLoss):
            return "nan_loss", nonfinite_loss_message(exc, self.config, self.precision, kept), exc.step
        if is_out_of_memory(exc):
            failed_step = step + 1 if step is not None and self.in_training else None
            return "out_of_memory", oom_message(exc, self.config, self.model, self.device, failed_step), step
        if is_disk_full(exc):
            return "disk_full", disk_full_message(exc, str(self.run_dir)), step  # type: ignore[arg-type]
        return "error", f"{type(exc).__name__}: {exc}", step


def _was_started(run_dir: Path) -> bool:
    try:
        with (run_dir / EVENTS_FILE).open("rb") as handle:
            return b'"run_started"' in handle.readline()
    except FileNotFoundError:
        return False


def use_fast_training_paths(model: torch.nn.Module, config: RunConfig, device: str, bit_dropout: bool = True) -> None:
    """The same function, computed faster: packed examples attend alone (`data.packing`), and adapter dropout on
    a CPU draws cheaper masks (`bit_dropout`: a run resumed from a checkpoint keeps the masks it began with).
    `bench/causal.py` profiles the model as this leaves it."""
    if config.data.packing:
        data_lib.check_packing(getattr(model.config, "model_type", ""))
        packed_attention.use_packed_attention(model)
    if device == "cpu" and bit_dropout:
        cpu_dropout.use_bit_dropout(model)
