"""More than one training process: launching them for `train.nproc > 1`, and what each of them must know.

`run_training`/`resume_training` with `train.nproc = N > 1` (`finetui run --nproc N`, the TUI) prepare the
run directory in the calling process as for one process (bad input is reported once, there), then start
`python -m torch.distributed.run --standalone --nproc_per_node N -m engine.cli run --resume RUN_DIR
--detached-child` in its own process session, output to `run.log`, and follow its `events.jsonl` exactly as
`finetui attach` does. The HF Trainer in the workers does DDP (gloo on CPUs, NCCL on GPUs), or FSDP / DeepSpeed
when `train.fsdp` / `train.deepspeed` say so.

In the workers only rank 0 writes the run directory (events, summary, checkpoints, model); a stop request (the
`stop` file) is agreed on by all ranks at the same step (`any_rank`). The same worker code runs under `torchrun`
or `accelerate launch` started by hand: rank 0 then creates the run directory and tells the others its path.

This module imports nothing heavy at load time: the CLI's checks before torch loads use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from engine.config import ConfigError, RunConfig
from engine.events import RunFailed
from engine.runs import (
    EVENTS_FILE,
    LOG_FILE,
    STOP_FILE,
    load_run_config,
    read_summary,
    remove_pid,
    write_pid,
    write_summary,
)

if TYPE_CHECKING:
    import torch

    from engine.sinks import EventSink
    from engine.trainer import RunResult

LAUNCHED_ENV = "FINETUI_LAUNCHED"  # set for workers started by `start_workers`: the launcher owns the pid file
PROJECT_ROOT = Path(__file__).resolve().parent.parent
Sharding = Literal["none", "optimizer", "gradients", "full"]
_PR_SET_PDEATHSIG = 1


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process writes the run directory: the only process, or rank 0 of a launch."""
    return rank() == 0


def owns_pid_file() -> bool:
    """Rank 0 records its pid, unless `start_workers` launched it (then the pid file names the launcher)."""
    return is_main() and not os.environ.get(LAUNCHED_ENV)


def threads_per_process() -> int:
    """The CPU cores of this machine shared out among the processes of this launch on it."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    return max(1, len(os.sched_getaffinity(0)) // max(1, local))


def needs_launch(config: RunConfig) -> bool:
    """True in the process that must start `train.nproc` workers (not in a worker, which is one of them)."""
    return config.train.nproc > 1 and world_size() == 1


def check_parallel_config(config: RunConfig) -> None:
    """One-line ConfigErrors for multi-process settings, before anything heavy is imported."""
    train = config.train
    if train.nproc > 1 and config.strategy.kind == "feature":
        raise ConfigError("train.nproc: the feature strategy trains no network (one pass, then a regression); use 1")
    if train.deepspeed:
        deepspeed_config(train.deepspeed)
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("train.deepspeed: the deepspeed package is not installed (pip install deepspeed)")
    if (train.fsdp or train.deepspeed) and config.strategy.kind == "qlora":
        raise ConfigError("train.fsdp/deepspeed: sharding a 4-bit QLoRA base is not supported here; use plain DDP")


def deepspeed_config(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed: {path}: no such file; give a DeepSpeed JSON config") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"train.deepspeed: {path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"train.deepspeed: {path}: expected a JSON object")
    return data


def sharding(config: RunConfig) -> Sharding:
    """What each process holds only 1/nproc of: FSDP full_shard / ZeRO-3 everything, shard_grad_op / ZeRO-2
    gradients and optimizer states, ZeRO-1 optimizer states; plain DDP replicates all."""
    train = config.train
    if train.fsdp:
        return "gradients" if "shard_grad_op" in train.fsdp else "full"
    if train.deepspeed:
        try:
            stage = int(deepspeed_config(train.deepspeed).get("zero_optimization", {}).get("stage", 0))
        except (ConfigError, TypeError, ValueError, AttributeError):
            return "none"
        return {1: "optimizer", 2: "gradients", 3: "full"}.get(stage, "none")  # type: ignore[return-value]
    return "none"


# --- inside the workers -------------------------------------------------------------------------------

_UNPINNED: list[str | None] = []  # CUDA_VISIBLE_DEVICES as it was before `pin_cuda_device` changed it


def pin_cuda_device(setting: str) -> None:
    """Make one GPU the only one a single training process sees (`cuda:N`, else the first visible one).

    With several GPUs visible the Trainer would otherwise spread one process over all of them with
    nn.DataParallel. It must run before CUDA initialises in the process (it has no effect afterwards).
    Processes of a launch are left alone: the Trainer gives each the GPU of its LOCAL_RANK.
    """
    if world_size() > 1:
        return
    if not _UNPINNED:
        _UNPINNED.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
    visible = _UNPINNED[0]
    ids = [part.strip() for part in visible.split(",") if part.strip()] if visible is not None else None
    index = int(setting.partition(":")[2] or 0)
    if ids is not None and index >= len(ids):
        if setting == "auto" or setting == "cuda":
            return  # no GPU visible: auto falls back to the CPU, cuda is refused by the caller
        raise ConfigError(f"train.device: {setting}, but CUDA_VISIBLE_DEVICES={visible!r} shows {len(ids)} GPU(s)")
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[index] if ids is not None else str(index)


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """True on every rank when `flag` is true on any: all ranks take the same branch (a stop, say) together."""
    import torch
    import torch.distributed as dist

    if world_size() == 1 or not dist.is_available() or not dist.is_initialized():
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    import torch.distributed as dist

    if world_size() > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


def materialise_model(config: RunConfig) -> None:
    """Build a `builtin:` model into the cache once, before the workers start: rank > 0 alone would save an
    incomplete copy (transformers saves weights on the main process only). Failures are left to the workers,
    which report them in the run."""
    from engine.models import resolve_model

    with contextlib.suppress(Exception):
        resolve_model(config.model.id)


def prepare_shared_run_dir(config: RunConfig, output_dir: Path | None) -> tuple[RunConfig, Path]:
    """`prepare_run_dir` for a launch started by hand (`torchrun -m engine.cli run PRESET`): rank 0 checks the
    config and creates the run directory (recording `train.nproc` = the world size), the others learn its path.

    The process group is initialised here, as the Trainer would (gloo for CPU tensors, NCCL for CUDA ones);
    the Trainer then uses it.
    """
    import torch
    import torch.distributed as dist

    from engine.trainer import prepare_run_dir

    if not dist.is_initialized():
        if config.train.device != "cpu" and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group(backend="gloo")
    message: list[Any] = [None]
    if is_main():
        materialise_model(config)
        try:
            config = config.model_copy(update={"train": config.train.model_copy(update={"nproc": world_size()})})
            config, run_dir = prepare_run_dir(config, output_dir)
            message = [("ok", str(run_dir))]
        except ConfigError as exc:
            message = [("error", str(exc))]
    dist.broadcast_object_list(message, src=0)
    kind, value = message[0]
    if kind == "error":
        raise ConfigError(value)
    run_dir = Path(value)
    return (config if is_main() else load_run_config(run_dir)), run_dir


# --- the launching process -----------------------------------------------------------------------------


def launch_command(run_dir: Path, nproc: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "engine.cli", "run", "--resume", str(run_dir), "--detached-child",
    ]  # fmt: skip


def launch_env(nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    env[LAUNCHED_ENV] = "1"
    if _UNPINNED:  # an earlier one-process run in this process (the TUI) kept to one GPU; the workers need all
        env.pop("CUDA_VISIBLE_DEVICES", None)
        if _UNPINNED[0] is not None:
            env["CUDA_VISIBLE_DEVICES"] = _UNPINNED[0]
    return env


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (torchrun then ends the workers)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def start_workers(run_dir: Path, nproc: int, *, detached: bool) -> subprocess.Popen[bytes]:
    """Start torchrun with `nproc` workers that train `run_dir` (prepared or resumable), output to run.log.

    The pid file names torchrun (stops go through the `stop` file, which every rank sees). `detached`: it
    outlives this process; otherwise it ends with it (a second Ctrl-C, a kill), like a one-process run.
    """
    run_dir = run_dir.resolve()
    (run_dir / STOP_FILE).unlink(missing_ok=True)  # a request meant for an earlier session
    materialise_model(load_run_config(run_dir))
    with (run_dir / LOG_FILE).open("ab") as log:
        process = subprocess.Popen(
            launch_command(run_dir, nproc),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=launch_env(nproc),
            preexec_fn=None if detached else _die_with_parent,
        )
    write_pid(run_dir, process.pid)
    return process


def run_launched(run_dir: Path, nproc: int, sink: EventSink, *, stop_event: threading.Event | None = None) -> RunResult:
    """Train a prepared (or resumable) run in `nproc` worker processes and follow it on `sink` until it ends.

    Setting `stop_event` asks the workers to stop (checkpoint, `run_stopped`). Workers that end without
    recording an end (a crash, a kill) leave the run `failed`, naming run.log.
    """
    from engine.detach import ProcessVanished, follow_run
    from engine.sinks import FanoutSink, JsonlFileSink
    from engine.trainer import EXIT_FAILED, RunResult

    def stopping() -> bool:
        return stop_event is not None and stop_event.is_set()

    events_file = run_dir / EVENTS_FILE
    since = events_file.stat().st_size if events_file.exists() else 0  # show only the session started here
    process = start_workers(run_dir, nproc, detached=False)
    try:
        code = follow_run(run_dir, sink, should_stop=stopping, since=since)
    except ProcessVanished:
        code = None
    returncode = process.wait()
    remove_pid(run_dir, process.pid)
    summary = read_summary(run_dir) or {}
    if code is None:
        message = (
            f"the {nproc} training processes ended (torchrun exit code {returncode}) without recording an end; "
            f"see {run_dir / LOG_FILE}; continue with finetui run --resume {run_dir}"
        )
        summary.update(status="failed", error=message, reason="error")
        with contextlib.suppress(OSError):
            write_summary(run_dir, summary)
        file_sink = JsonlFileSink(run_dir / EVENTS_FILE)
        try:
            FanoutSink(file_sink, sink).emit(RunFailed(error=message, user_error=False, reason="error"))
        finally:
            file_sink.close()
        code = EXIT_FAILED
    status = summary.get("status", "failed")
    return RunResult(status if status in ("finished", "stopped") else "failed", run_dir, summary, code)
