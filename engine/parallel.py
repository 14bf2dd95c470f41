"""What each training process of a run must know about the others: its rank, the process count, agreement.

One process or N workers started by torchrun / accelerate (`train.nproc`, a launch by hand): only rank 0
writes the run directory, all ranks stop at the same step (`any_rank`), and one process keeps to one GPU
(`pin_cuda_device`). Also the one-line checks of multi-process settings made before anything heavy loads.
Starting the workers is `engine.launch`'s job.

This module imports nothing heavy at load time: the CLI's checks before torch loads use it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from engine.config import ConfigError, RunConfig

if TYPE_CHECKING:
    import torch

LAUNCHED_ENV = "FINETUI_LAUNCHED"  # set for workers started by `engine.launch`: the launcher owns the pid file
Sharding = Literal["none", "optimizer", "gradients", "full"]


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


def unpinned_cuda_devices() -> tuple[bool, str | None]:
    """(whether `pin_cuda_device` changed CUDA_VISIBLE_DEVICES in this process, its value before), so that workers
    started from here (the TUI after a one-process run) see every GPU again."""
    return (True, _UNPINNED[0]) if _UNPINNED else (False, None)


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
