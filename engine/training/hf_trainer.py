"""The Hugging Face Trainer as finetui runs it: arguments from the run config, checkpoints that are always
complete, a data order that survives a resume, and `EventBridge`, the callback that turns the Trainer's logs,
evaluations and checkpoints into engine events and stops training when asked.

Multi-GPU launches (torchrun/accelerate: DDP, FSDP, DeepSpeed) go through the Trainer itself; finetui adds only
what every rank must agree on (`engine.parallel`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.training_args import OptimizerNames
from transformers.utils import is_torch_tf32_available

from engine.config import ConfigError, RunConfig
from engine.data import PreparedData
from engine.events import BUSY_CPU_PERCENT, Checkpoint, Eval, Log, Progress, Step
from engine.fsio import fsync_tree, replace_dir
from engine.parallel import any_rank, threads_per_process, world_size
from engine.runs import CHECKPOINTS_DIR, STAGING_DIR, StopRequest, StopRequested, rotate_checkpoints
from engine.sinks import EventSink
from engine.training.faults import NonFiniteLoss
from engine.training.memory import MemoryMeter
from engine.training.metrics import classification_metrics, predicted_class, split_metrics
from engine.training.trackers import point_trackers_at

PROGRESS_INTERVAL_S = 1.0  # a `progress` event between logged steps at most this often
BUSY_WARNING_INTERVAL_S = 60.0


class TrainingPace:
    """Speed, ETA and resources of this session's training so far: the numbers `step` and `progress` carry."""

    def __init__(self, samples_per_step: int) -> None:
        self.samples_per_step = samples_per_step
        self.started = time.monotonic()
        self.first_step = 0
        self.first_tokens = 0
        self._process = psutil.Process()
        self._cores = psutil.cpu_count() or 1

    def start(self, state: TrainerState) -> None:
        self.started = time.monotonic()
        self.first_step = state.global_step
        self.first_tokens = state.num_input_tokens_seen
        psutil.cpu_percent(None)  # both CPU counters measure from here
        self._process.cpu_percent(None)

    def cpu_others_percent(self) -> float:
        """The share of the machine's CPU that other processes took since the last call."""
        machine = psutil.cpu_percent(None) * self._cores
        ours = self._process.cpu_percent(None)
        return max(0.0, min(100.0, (machine - ours) / self._cores))

    def position(self, state: TrainerState) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        steps_done = state.global_step - self.first_step
        rate = steps_done / elapsed if elapsed > 0 else 0.0
        tokens = state.num_input_tokens_seen - self.first_tokens
        return {
            "step": state.global_step,
            "max_steps": state.max_steps,
            "epoch": float(state.epoch or 0.0),
            "samples_per_second": steps_done * self.samples_per_step / elapsed if elapsed > 0 else 0.0,
            "tokens_per_second": tokens / elapsed if elapsed > 0 else 0.0,
            "elapsed_s": elapsed,
            "eta_s": (state.max_steps - state.global_step) / rate if rate > 0 else None,
            "memory_rss_mb": self._process.memory_info().rss / 2**20,
            "cpu_others_percent": self.cpu_others_percent(),
        }


class EventBridge(TrainerCallback):
    """Turns Trainer callbacks into engine events; sets `should_training_stop` when a stop is requested.

    A `step` event carries each logged loss (every `train.logging_steps`, and always the last step's); between
    them a `progress` event after the first step and about once a second keeps progress and ETA moving.
    """

    def __init__(
        self, sink: EventSink, task: str, stop: StopRequest, samples_per_step: int, memory: MemoryMeter | None = None
    ) -> None:
        self.sink = sink
        self.task = task
        self.stop = stop
        self.memory = memory
        self.pace = TrainingPace(samples_per_step)
        self.stopped_at: int | None = None
        self.last_validation: tuple[int, dict[str, float]] | None = None  # (step, metrics)
        self._last_event = 0.0
        self._busy_warned = -BUSY_WARNING_INTERVAL_S

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.pace.start(state)  # the CUDA peak counts from just before the model loaded (engine.training.memory)

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        # Every rank of a multi-process run stops at the same step, whichever of them saw the request.
        if any_rank(self.stop(), args.device) and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_training_stop = True
            control.should_save = True
            control.should_evaluate = False
        if state.global_step >= state.max_steps:
            control.should_log = True  # the last step's loss is always recorded
        first = state.global_step == self.pace.first_step + 1
        if not control.should_log and (first or time.monotonic() - self._last_event >= PROGRESS_INTERVAL_S):
            self._emit_position(Progress(**self.pace.position(state)))

    def on_epoch_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.stopped_at is not None:  # the stop's checkpoint is written already: no second one, no evaluation
            control.should_evaluate = False
            control.should_save = False

    def on_prediction_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if any_rank(self.stop(), args.device):
            raise StopRequested

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if not logs or "loss" not in logs:
            return
        cuda = torch.cuda.is_available()
        step = Step(
            loss=float(logs["loss"]),
            lr=float(logs.get("learning_rate", 0.0)),
            grad_norm=float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
            gpu_memory_mb=torch.cuda.memory_allocated() / 2**20 if cuda else None,
            gpu_reserved_mb=torch.cuda.memory_reserved() / 2**20 if cuda else None,
            gpu_peak_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            **(self.memory.peak().step_fields() if self.memory is not None else {}),
            **self.pace.position(state),
        )
        self._emit_position(step)

    def _emit_position(self, event: Step | Progress) -> None:
        self._last_event = time.monotonic()
        self.sink.emit(event)
        others = event.cpu_others_percent
        if (
            others is not None
            and others >= BUSY_CPU_PERCENT
            and self._last_event - self._busy_warned >= BUSY_WARNING_INTERVAL_S
        ):
            self._busy_warned = self._last_event
            message = f"other processes are using {others:.0f} % of the CPU: training runs slower (samples/s fall)"
            self.sink.emit(Log(level="warning", message=message))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # type: ignore[no-untyped-def]
        metrics = metrics or {}
        prefix = "test" if any(k.startswith("test_") for k in metrics) else "eval"
        split = "test" if prefix == "test" else "validation"
        values = split_metrics(metrics, prefix, self.task)
        if split == "validation":
            self.last_validation = (state.global_step, values)
        self.sink.emit(Eval(step=state.global_step, epoch=float(state.epoch or 0.0), split=split, metrics=values))

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.sink.emit(Checkpoint(step=state.global_step, path=str(path)))


def training_arguments(config: RunConfig, output_dir: Path, *, device: str, precision: str) -> TrainingArguments:
    """The HF TrainingArguments for a run config (checkpoints go to `output_dir`)."""
    train = config.train
    per_epoch = "steps" if train.eval_steps else "epoch"
    save_per = "steps" if train.save_steps else "epoch"
    # Across processes the Trainer scales each rank's loss by the process count, right for losses that divide by
    # the global token count (causal LMs), twice too large for classifiers, whose loss is a per-batch mean.
    options: dict[str, Any] = {"average_tokens_across_devices": config.model.task == "causal"}
    if world_size() > 1 and device == "cpu":
        options["ddp_backend"] = "gloo"
    if train.fsdp:  # FSDP2 through fsdp_config (the option string is deprecated in transformers 5)
        words = train.fsdp.split()
        sharded = {"reshard_after_forward": "shard_grad_op" not in words, "cpu_offload": "offload" in words}
        options.update(fsdp=True, fsdp_config=sharded)
    if train.deepspeed:
        options["deepspeed"] = train.deepspeed
    if train.optim != "auto":
        options["optim"] = _optimizer_name(train.optim, device)
    if train.metric_for_best_model:
        best = train.metric_for_best_model
        options.update(metric_for_best_model=best, greater_is_better=best != "loss", load_best_model_at_end=True)
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
        dataloader_num_workers=min(4, threads_per_process() // 2) if device == "cuda" else 0,
        tf32=True if device == "cuda" and is_torch_tf32_available() else None,  # Ampere+: fp32 matmuls on tensor cores
        **options,
    )


def _optimizer_name(name: str, device: str) -> str:
    """`train.optim` checked against the Trainer's optimizer names (bitsandbytes' 8-bit and paged ones need CUDA)."""
    known = {option.value for option in OptimizerNames}
    if name not in known:
        raise ConfigError(f"train.optim: unknown optimizer {name!r}; e.g. auto, adamw_torch, paged_adamw_8bit")
    if device != "cuda" and ("8bit" in name or name.startswith("paged_")):
        raise ConfigError(f"train.optim: {name} needs a CUDA GPU (bitsandbytes); use auto on a CPU")
    return name


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

    def _best_checkpoint(self, final_root: Path) -> Path | None:
        """With `train.metric_for_best_model`: the best checkpoint so far. The Trainer recorded it where it was
        written (the staging folder); it lives in `final_root`."""
        if not self.state.best_global_step:
            return None
        best = final_root / f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
        self.state.best_model_checkpoint = str(best)
        return best

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
        best = self._best_checkpoint(final_root)
        if main:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            staged = staging_root / name
            (staged / TRAINING_ARGS_NAME).unlink(missing_ok=True)
            if best is not None:  # the state as a resumed run reads it, with the best checkpoint's final path
                self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
            fsync_tree(staged)
            replace_dir(staged, final_root / name)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(final_root.parent, self.args.save_total_limit, best=best)
        if distributed:
            self.accelerator.wait_for_everyone()


def build_trainer(
    config: RunConfig,
    model: torch.nn.Module,
    prepared: PreparedData,
    sink: EventSink,
    stop: StopRequest,
    *,
    device: str,
    precision: str,
    memory: MemoryMeter | None = None,
    probe: TrainerCallback | None = None,
) -> tuple[FinetuiTrainer, EventBridge]:
    """The Trainer for a prepared model and data, checkpointing into the run's `checkpoints/`, with its bridge
    (after `probe`, the generation at each evaluation, whose metrics the bridge's `eval` events then carry)."""
    task = config.model.task
    args = training_arguments(config, stop.run_dir / CHECKPOINTS_DIR, device=device, precision=precision)
    samples_per_step = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    bridge = EventBridge(sink, task, stop, samples_per_step, memory)
    classification = task == "classification"
    trainer = FinetuiTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.validation,
        data_collator=prepared.collator,
        compute_metrics=classification_metrics if classification else None,
        preprocess_logits_for_metrics=predicted_class if classification else None,
        callbacks=[probe, bridge] if probe is not None else [bridge],
        data_seed=config.train.seed,
    )
    trainer.remove_callback(PrinterCallback)  # the bridge reports logs as events; stdout stays clean
    point_trackers_at(trainer, stop.run_dir)
    return trainer, bridge


def final_metrics(
    trainer: Trainer, bridge: EventBridge, prepared: PreparedData, task: str
) -> dict[str, dict[str, float]]:
    """Validation (reusing an evaluation of the final weights made during training) and test metrics."""
    step = trainer.state.global_step
    if bridge.last_validation is not None and bridge.last_validation[0] == step:
        validation = bridge.last_validation[1]
    else:
        validation = split_metrics(trainer.evaluate(prepared.validation, metric_key_prefix="eval"), "eval", task)
    metrics = {"validation": validation}
    if prepared.test is not None:
        metrics["test"] = split_metrics(trainer.evaluate(prepared.test, metric_key_prefix="test"), "test", task)
    return metrics


def training_done(checkpoint: Path) -> bool:
    """Whether a checkpoint was written at the run's last optimizer step."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return 0 < int(state.get("max_steps") or 0) <= int(state.get("global_step") or 0)
