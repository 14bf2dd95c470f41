"""Training faults turned into one-line messages that say what happened and what to change.

A run that diverges (NaN/inf loss), runs out of memory (CUDA or host) or fills the disk fails with a
message naming the step and concrete next settings; the run directory keeps its last complete checkpoint.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import psutil
import torch

from engine.config import RunConfig
from engine.freeze_map import compute_freeze_map

GIB = 2**30
# A device is "big enough" for an estimate when the estimate stays under this share of its memory
# (allocator overhead, fragmentation and the framework itself take the rest).
HEADROOM = 0.8
CPU_OOM_MARKERS = ("can't allocate memory", "not enough memory", "out of memory", "cannot allocate memory")


class NonFiniteLoss(RuntimeError):
    """The training loss (or, found before a checkpoint is written, a weight) became NaN or infinite at `step`."""

    def __init__(self, step: int, value: float, *, what: str = "loss") -> None:
        super().__init__(f"{what} became {value} at step {step}")
        self.step = step
        self.value = value
        self.what = what


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, Python's MemoryError, or PyTorch's CPU allocator failing (a RuntimeError)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in CPU_OOM_MARKERS)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def nonfinite_loss_message(error: NonFiniteLoss, config: RunConfig, precision: str, last_checkpoint: str | None) -> str:
    """Which step, what the likely causes are for this config, and what is kept."""
    train = config.train
    causes = [f"a learning rate too high for this model and strategy (train.lr={train.lr:g}; try {train.lr / 10:g})"]
    if train.warmup_ratio == 0:
        causes.append("no warmup (try --set train.warmup_ratio=0.05)")
    if train.max_grad_norm == 0:
        causes.append("gradient clipping off (train.max_grad_norm=0; try 1.0)")
    if precision == "bf16":
        causes.append("bf16 precision overflowing (try --set train.precision=fp32)")
    kept = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was saved before it"
    return f"training diverged: {error}; likely causes: {'; '.join(causes)}; {kept}"


def available_memory(device: str) -> int | None:
    """Bytes the run could use: total GPU memory of this device, or the host's total RAM."""
    try:
        if device == "cuda" and torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[1])
        return int(psutil.virtual_memory().total)
    except Exception:
        return None


def _estimate(model: Any, batch_size: int, seq_len: int, gradient_checkpointing: bool, frozen_4bit: str | None) -> int:
    freeze_map = compute_freeze_map(
        model,
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        frozen_linear_4bit=frozen_4bit,
    )
    assert freeze_map.memory is not None
    return freeze_map.memory.total_bytes


def oom_suggestions(config: RunConfig, model: Any | None, device: str) -> tuple[str, list[str]]:
    """(what the estimate says, next settings to try), each setting with its own estimate when a model is known.

    Settings: a smaller batch with gradient accumulation keeping the effective batch, gradient checkpointing,
    QLoRA (4-bit base) for adapter strategies, LoRA for strategies that train whole layers, shorter max_length.
    """
    batch, seq = config.train.batch_size, config.data.max_length
    if model is None:  # the weights themselves did not fit
        qlora = (
            []
            if config.strategy.kind == "qlora"
            else ["--strategy qlora (the base model's linear weights load in 4 bits)"]
        )
        return f"loading {config.model.id}", [*qlora, "a smaller model"]
    limit = available_memory(device)

    def estimate(b: int = batch, s: int = seq, gc: bool | None = None, quant: str | None = None) -> int | None:
        try:
            checkpointing = config.train.gradient_checkpointing if gc is None else gc
            return _estimate(model, b, s, checkpointing, quant)
        except Exception:
            return None

    suggestions = _settings_to_try(config, estimate, int(limit * HEADROOM) if limit else None)
    current = estimate()
    where = "GPU" if device == "cuda" else "host RAM"
    have = f"{where} {_gib(limit)}" if limit else where
    need = f"estimated need ~{_gib(current)} for batch {batch} x {seq} tokens" if current else f"batch {batch} x {seq}"
    return f"{need}, {have}", suggestions


def _settings_to_try(config: RunConfig, estimate: Callable[..., int | None], budget: int | None) -> list[str]:
    def with_estimate(setting: str, value: int | None) -> str:
        return f"{setting} (~{_gib(value)})" if value is not None else setting

    train, kind, seq = config.train, config.strategy.kind, config.data.max_length
    suggestions: list[str] = []
    if train.batch_size > 1:
        smaller = train.batch_size // 2
        while smaller > 1 and budget is not None and (estimate(b=smaller) or 0) > budget:
            smaller //= 2
        accum = train.grad_accum * (train.batch_size // smaller)
        suggestions.append(
            with_estimate(f"--set train.batch_size={smaller} --set train.grad_accum={accum}", estimate(b=smaller))
        )
    if not train.gradient_checkpointing and kind != "feature":
        suggestions.append(with_estimate("--set train.gradient_checkpointing=true", estimate(gc=True)))
    if kind in ("lora", "dora"):
        suggestions.append(with_estimate("--strategy qlora", estimate(quant=config.strategy.quant_type)))
    elif kind in ("full", "last_layers"):
        suggestions.append("--strategy lora (or qlora): adapters need no gradients or AdamW states for the base")
    if seq > 64:
        suggestions.append(with_estimate(f"--set data.max_length={seq // 2}", estimate(s=seq // 2)))
    return suggestions


def oom_message(exc: BaseException, config: RunConfig, model: Any | None, device: str, step: int | None) -> str:
    where = f" at step {step}" if step else (" while loading" if model is None else "")
    summary, suggestions = oom_suggestions(config, model, device)
    kind = "GPU" if isinstance(exc, torch.OutOfMemoryError) and device == "cuda" else "host"
    tried = "; ".join(suggestions) if suggestions else "a smaller model"
    return f"out of {kind} memory{where} ({summary}); start a new run with: {tried}"


def disk_full_message(exc: OSError, run_dir: str) -> str:
    return (
        f"disk full while writing the run ({exc.strerror}: {exc.filename or run_dir}); free space or lower "
        "train.save_total_limit, then resume: the last complete checkpoint is intact"
    )
