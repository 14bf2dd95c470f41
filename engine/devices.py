"""Which device and precision a run trains and infers on (`train.device`, `train.precision`).

fp32 on CPUs (bf16 matmuls are ~300x slower there), bf16 on GPUs that support it; one process keeps to one GPU.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from engine.config import ConfigError
from engine.parallel import pin_cuda_device, threads_per_process

_THREADS_AT_IMPORT = torch.get_num_threads()


def resolve_device(setting: str = "auto", *, one_gpu: bool = True) -> str:
    """`train.device` as "cpu" or "cuda". A training process keeps to one GPU (`one_gpu`: `cuda:N`, else the
    first), so that the Trainer never falls back to nn.DataParallel; processes of a launch each use their
    LOCAL_RANK's GPU."""
    if setting == "cpu":
        return "cpu"
    if one_gpu:
        pin_cuda_device(setting)
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


def set_training_threads() -> int:
    """Torch's threads for a training process; the number in use.

    Left as they are when the user chose them (OMP_NUM_THREADS, or `torch.set_num_threads` after finetui was
    imported); otherwise one per core of this process's share of the machine.
    """
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() == _THREADS_AT_IMPORT:
        torch.set_num_threads(threads_per_process())
    return torch.get_num_threads()


def planned_device(setting: str) -> str:
    """The device `train.device` will train on, for estimates made on another machine (`finetui inspect`): `cuda`
    when named, even without a GPU here; `auto` is a GPU when this machine has one."""
    if setting == "cpu":
        return "cpu"
    return "cuda" if setting.startswith("cuda") or torch.cuda.is_available() else "cpu"


def planned_precision(precision: str, device: str) -> str:
    """`train.precision` resolved as a run resolves it; `auto` on a GPU that is not here is assumed to have bf16."""
    if precision == "auto" and device == "cuda" and not torch.cuda.is_available():
        return "bf16"
    return resolve_precision(precision, device)
