"""The front door: what the CLI, the TUI and scripts call to start, resume and hand off runs.

`run_training` and `resume_training` train in this process (or start `train.nproc` workers and follow them);
`start_detached` and `resume_detached` hand a run to a process of its own and return at once. All of them
prepare and check the run directory the same way, so a mistake is reported identically wherever the run was
started from. Following and stopping a run that another process trains is `engine.launch.follow`; reading
run folders is `engine.runs`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import ConfigError, RunConfig
from engine.data import resolve_label_words
from engine.events import RunResult
from engine.launch.processes import materialise_model, spawn
from engine.launch.workers import run_launched
from engine.library_logs import quiet_library_output
from engine.models import resolve_task
from engine.parallel import is_main, needs_launch, world_size
from engine.preflight import check_run_config
from engine.runs import check_resumable, create_run_dir, load_run_config
from engine.sinks import EventSink
from engine.training.session import execute


def prepare_run_dir(config: RunConfig, output_dir: Path | None = None) -> tuple[RunConfig, Path]:
    """Check a config, resolve `model.task`, and create its run directory (with config.toml).

    Raises ConfigError (bad input, nothing created) for problems found before any data or weights load.
    """
    quiet_library_output()
    check_run_config(config, output_dir)
    config = config.with_task(resolve_task(config.model))
    if config.model.task == "causal":  # `data.label_words = true`: the words recorded in config.toml
        config = config.model_copy(update={"data": resolve_label_words(config.data)})
    elif config.train.sample_prompts or config.train.generation_metric:
        raise ConfigError(
            "train.sample_prompts and train.generation_metric: a classifier generates no text; they need a causal "
            "LM (a classification dataset trains one with data.label_words)"
        )
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
    file in the run directory (`engine.launch.follow.request_stop`). `signal_stop`: the caller turns SIGINT into
    `stop_event` (the CLI does), so other processes may stop it with SIGINT too.

    Raises ConfigError (and creates nothing) for mistakes found before the run directory exists: no or
    missing data files, a model that cannot be found (`model.task = "auto"` reads its config first), an
    output directory that cannot be written or is itself a run directory. Every later problem is recorded in
    the run directory (status `failed`) and returned.
    """
    if world_size() > 1:  # a torchrun / accelerate launch started by hand
        config, run_dir = _prepare_shared_run_dir(config, output_dir)
    else:
        config, run_dir = prepare_run_dir(config, output_dir)
    if needs_launch(config):
        return run_launched(run_dir, config.train.nproc, sink, stop_event=stop_event)
    return execute(config, run_dir, sink, stop_event=stop_event, resume=False, signal_stop=signal_stop)


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
    if needs_launch(config):
        return run_launched(run_dir, config.train.nproc, sink, stop_event=stop_event)
    return execute(config, run_dir, sink, stop_event=stop_event, resume=True, signal_stop=signal_stop)


def start_detached(config: RunConfig, *, output_dir: Path | None = None) -> Path:
    """Start a run in its own process session (`engine.launch.processes`) and return its run directory at once.

    Raises ConfigError (nothing created) for the mistakes `run_training` would reject before its run
    directory exists; everything later is recorded in the run directory as usual.
    """
    config, run_dir = prepare_run_dir(config, output_dir)
    spawn(run_dir, config.train.nproc, detached=True)
    return run_dir.resolve()


def resume_detached(run_dir: Path) -> Path:
    """`finetui run --resume RUN_DIR --detach`: continue a run in its own process session."""
    config = check_resumable(run_dir)
    spawn(run_dir, config.train.nproc, detached=True)
    return run_dir.resolve()


def _prepare_shared_run_dir(config: RunConfig, output_dir: Path | None) -> tuple[RunConfig, Path]:
    """`prepare_run_dir` for a launch started by hand (`torchrun -m engine.cli run PRESET`): rank 0 checks the
    config and creates the run directory (recording `train.nproc` = the world size), the others learn its path.

    The process group is initialised here, as the Trainer would (gloo for CPU tensors, NCCL for CUDA ones);
    the Trainer then uses it.
    """
    if not dist.is_initialized():
        if config.train.device != "cpu" and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group(backend="gloo")
    message: list[tuple[str, str] | None] = [None]
    if is_main():
        materialise_model(config)
        try:
            config = config.model_copy(update={"train": config.train.model_copy(update={"nproc": world_size()})})
            config, run_dir = prepare_run_dir(config, output_dir)
            message = [("ok", str(run_dir))]
        except ConfigError as exc:
            message = [("error", str(exc))]
    dist.broadcast_object_list(message, src=0)
    kind, value = message[0]  # type: ignore[misc]
    if kind == "error":
        raise ConfigError(value)
    run_dir = Path(value)
    return (config if is_main() else load_run_config(run_dir)), run_dir
