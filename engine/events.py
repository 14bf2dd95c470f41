"""Typed engine events: the only thing the engine tells the outside world while it works.

Every event is a frozen, JSON-serialisable dataclass with a `type` tag and a wall-clock `time`.
The TUI, the CLI and the tests are sinks of the same stream, and `events.jsonl` in a run
directory is that stream written down, so any view of a run can be rebuilt from it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 130
"""Exit codes of `finetui` and of a run: done, training failed, bad input, stopped (SIGINT; 143/129 for
SIGTERM/SIGHUP are 128 + the signal)."""
BUSY_CPU_PERCENT = 30.0
"""Other processes taking this share of the machine's CPU (`cpu_others_percent`) slow training down: views say so."""


@dataclass(frozen=True, kw_only=True)
class Event:
    type: ClassVar[str] = "event"
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}


@dataclass(frozen=True, kw_only=True)
class RunStarted(Event):
    type: ClassVar[str] = "run_started"
    run_dir: str
    name: str
    model: str
    strategy: str
    task: str
    config: dict[str, Any]
    resumed_from_step: int | None = None
    processes: int = 1  # training processes (`train.nproc`); rank 0 writes the events


@dataclass(frozen=True, kw_only=True)
class Log(Event):
    type: ClassVar[str] = "log"
    level: str  # "info" | "warning" | "error"
    message: str


@dataclass(frozen=True, kw_only=True)
class FreezeMapReady(Event):
    type: ClassVar[str] = "freeze_map"
    freeze_map: dict[str, Any]  # FreezeMap.to_dict(): totals, layers, memory


@dataclass(frozen=True, kw_only=True)
class Step(Event):
    type: ClassVar[str] = "step"
    step: int
    max_steps: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float | None
    samples_per_second: float
    tokens_per_second: float
    elapsed_s: float
    eta_s: float | None
    memory_rss_mb: float | None = None
    gpu_memory_mb: float | None = None  # CUDA memory of rank 0's GPU: allocated now, reserved by the allocator,
    gpu_reserved_mb: float | None = None  # and the peak allocated since the model loaded (this session)
    gpu_peak_mb: float | None = None
    cpu_others_percent: float | None = None  # the machine's CPU other processes took since the last event
    # Measured peaks of this process since just before its model loaded (engine.training.memory), in bytes:
    memory_peak_bytes: int | None = None  # the figure set beside the estimate: CUDA reserved (largest device), or host
    host_peak_bytes: int | None = None  # resident memory above the baseline
    cuda_max_allocated_bytes: list[int] | None = None  # per visible CUDA device
    cuda_max_reserved_bytes: list[int] | None = None


@dataclass(frozen=True, kw_only=True)
class Progress(Event):
    """Where training is between two logged steps (`step` events come every `train.logging_steps`): sent after the
    first step and then at most about once a second, so that progress, speed and ETA move from the first step."""

    type: ClassVar[str] = "progress"
    step: int
    max_steps: int
    epoch: float
    samples_per_second: float
    tokens_per_second: float
    elapsed_s: float
    eta_s: float | None
    memory_rss_mb: float | None = None
    cpu_others_percent: float | None = None


@dataclass(frozen=True, kw_only=True)
class Eval(Event):
    type: ClassVar[str] = "eval"
    step: int
    epoch: float
    split: str  # "validation" | "test"
    metrics: dict[str, float]


@dataclass(frozen=True, kw_only=True)
class Checkpoint(Event):
    type: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass(frozen=True, kw_only=True)
class RunFinished(Event):
    type: ClassVar[str] = "run_finished"
    summary: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class RunFailed(Event):
    type: ClassVar[str] = "run_failed"
    error: str
    user_error: bool  # True: bad input (exit code 2); False: training failed (exit code 1)
    step: int | None = None
    reason: str | None = None  # bad_input, nan_loss, out_of_memory, disk_full or error
    checkpoint: str | None = None  # the last complete checkpoint, which `--resume` continues from


@dataclass(frozen=True, kw_only=True)
class RunStopped(Event):
    type: ClassVar[str] = "run_stopped"
    step: int
    checkpoint: str | None


@dataclass(frozen=True, kw_only=True)
class TokensGenerated(Event):
    """New text of an answer being generated, sent as its tokens come (`engine.generation`)."""

    type: ClassVar[str] = "tokens"
    index: int  # which prompt of the request the answer is for
    text: str  # the text added since the previous event of this answer
    tokens: int  # tokens of the answer so far
    tokens_per_second: float  # since the request started
    model: str = "fine-tuned"  # or "base": which model answers


@dataclass(frozen=True, kw_only=True)
class GenerationDone(Event):
    """An answer is complete."""

    type: ClassVar[str] = "generation_done"
    index: int
    text: str  # the whole answer
    tokens: int
    tokens_per_second: float
    elapsed_s: float
    stop_reason: str  # "end" (an end-of-sequence or end-of-turn token), "length" (max_new_tokens) or "stopped"
    model: str = "fine-tuned"


@dataclass(frozen=True, kw_only=True)
class ExportProgress(Event):
    """Where `finetui export` is: stage `step` of `steps` (load, merge, save, check, publish)."""

    type: ClassVar[str] = "export_progress"
    step: int
    steps: int
    stage: str
    message: str


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        RunStarted,
        Log,
        FreezeMapReady,
        Step,
        Progress,
        Eval,
        Checkpoint,
        RunFinished,
        RunFailed,
        RunStopped,
        TokensGenerated,
        GenerationDone,
        ExportProgress,
    )
}


def event_from_dict(data: dict[str, Any]) -> Event:
    """Rebuild an event from its `to_dict()` form (unknown keys from newer versions are dropped)."""
    cls = EVENT_TYPES[data["type"]]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def exit_code_of(event: Event) -> int:
    """The exit code a run ending with `event` (run_finished, run_stopped or run_failed) has."""
    if isinstance(event, RunFinished):
        return EXIT_OK
    if isinstance(event, RunStopped):
        return EXIT_STOPPED
    if isinstance(event, RunFailed):
        return EXIT_BAD_INPUT if event.user_error else EXIT_FAILED
    raise ValueError(f"not a terminal event: {event.type}")


@dataclass(frozen=True)
class RunResult:
    """How a run (or a session of it) ended: what `run_training` and `resume_training` return."""

    status: Literal["finished", "stopped", "failed"]
    run_dir: Path
    summary: dict[str, Any]
    exit_code: int
