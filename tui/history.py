"""What a view of one run knows: the engine events of the run folded into curves, status and a log.

`RunHistory.apply` takes the same events whether they come live from a training worker or are read back from
a run directory's `events.jsonl` (`engine.runs.EventFollower`), so the training screen and the runs screen show
a run the same way. Plain Python, no Textual: the tests drive it directly.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.events import (
    Checkpoint,
    Eval,
    Event,
    FreezeMapReady,
    Log,
    Progress,
    RunFailed,
    RunFinished,
    RunStarted,
    RunStopped,
    Samples,
    Step,
)
from engine.generation_metrics import COST_KEY, METRIC_PREFIX

MAX_LOG_LINES = 2000


@dataclass
class RunHistory:
    run_dir: str | None = None
    name: str = ""
    model: str = ""
    strategy: str = ""
    task: str = ""
    status: str = "idle"  # idle | starting | running | finished | stopped | failed
    error: str | None = None
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    evals: list[Eval] = field(default_factory=list)
    last_step: Step | None = None
    """The last logged step (loss, learning rate)."""
    position: Step | Progress | None = None
    """Where training is: the last `step` or `progress` event (step, speed, ETA, memory)."""
    journal: deque[Event] = field(default_factory=lambda: deque(maxlen=MAX_LOG_LINES))
    """What the log pane shows, in order: log lines, evaluations, checkpoints, start and end."""
    freeze_map: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    checkpoint: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    config: dict[str, Any] | None = None
    stop_requested: bool = False
    """Someone asked the run to stop; it stops at its next step."""
    samples: list[Samples] = field(default_factory=list)
    """The answers to `train.sample_prompts` at each evaluation, in order."""

    @property
    def active(self) -> bool:
        return self.status in ("starting", "running")

    @property
    def label(self) -> str:
        return Path(self.run_dir).name if self.run_dir else self.name or "run"

    def apply(self, event: Event) -> None:
        if isinstance(event, Log | Eval | Checkpoint | RunStarted | RunFinished | RunStopped | RunFailed):
            self.journal.append(event)
        match event:
            case RunStarted():
                self._started(event)
            case Step():
                self.steps.append(event.step)
                self.losses.append(event.loss)
                self.lrs.append(event.lr)
                self.last_step = self.position = event
            case Progress():
                self.position = event
            case Eval():
                self.evals.append(event)
            case Samples():
                self.samples.append(event)
            case FreezeMapReady():
                self.freeze_map = event.freeze_map
            case Checkpoint():
                self.checkpoint = event.path
            case RunFinished() | RunStopped() | RunFailed():
                self._ended(event)

    def _ended(self, event: RunFinished | RunStopped | RunFailed) -> None:
        self.ended_at = event.time
        if isinstance(event, RunFinished):
            self.status, self.summary = "finished", event.summary
        elif isinstance(event, RunStopped):
            self.status, self.checkpoint = "stopped", event.checkpoint
        else:
            self.status, self.error = "failed", event.error

    def _started(self, event: RunStarted) -> None:
        self.run_dir, self.name, self.model = event.run_dir, event.name, event.model
        self.strategy, self.task, self.config = event.strategy, event.task, event.config
        self.status, self.started_at = "running", event.time
        self.error = self.ended_at = self.summary = None
        self.stop_requested = False
        if event.resumed_from_step is not None:  # steps after the checkpoint run again
            self._truncate(event.resumed_from_step)

    def _truncate(self, step: int) -> None:
        keep = [index for index, logged in enumerate(self.steps) if logged <= step]
        self.steps = [self.steps[index] for index in keep]
        self.losses = [self.losses[index] for index in keep]
        self.lrs = [self.lrs[index] for index in keep]
        self.evals = [event for event in self.evals if event.step <= step]
        self.samples = [event for event in self.samples if event.step <= step]

    def fail(self, error: str) -> None:
        """The run ended without a `run_failed` event (it failed before its run directory existed)."""
        self.status, self.error, self.ended_at = "failed", error, time.time()
        self.journal.append(Log(level="error", message=error))

    def eval_curve(self, metric: str = "loss", split: str = "validation") -> tuple[list[int], list[float]]:
        points = [(e.step, e.metrics[metric]) for e in self.evals if e.split == split and metric in e.metrics]
        return [step for step, _ in points], [value for _, value in points]

    def latest_samples(self) -> list[Samples]:
        """The sample answers of the last evaluation that had any."""
        last = self.samples[-1].step if self.samples else None
        return [sample for sample in self.samples if sample.step == last]

    def generation_curve(self) -> tuple[str, list[int], list[float]] | None:
        """The validation curve of `train.generation_metric` (`generation_<metric>`), if the run has one."""
        for event in self.evals:
            name = next((key for key in event.metrics if key.startswith(METRIC_PREFIX) and key != COST_KEY), None)
            if name is not None:
                return (name, *self.eval_curve(name))
        return None

    def latest_metrics(self, split: str = "validation") -> dict[str, float]:
        if split == "validation" and self.summary and self.summary.get("validation"):
            return dict(self.summary["validation"])
        for event in reversed(self.evals):
            if event.split == split:
                return dict(event.metrics)
        return {}

    @property
    def max_steps(self) -> int | None:
        return self.position.max_steps if self.position else None

    def elapsed(self, now: float | None = None) -> float | None:
        """Seconds since the run started: up to its end once ended, up to `now` while it runs."""
        if self.started_at is None:
            return None
        end = self.ended_at if self.ended_at is not None else (now if now is not None else time.time())
        return max(0.0, end - self.started_at)


def best_metric(summary: dict[str, Any] | None) -> tuple[str, float] | None:
    """The headline validation metric of a finished run: accuracy when there is one, else loss."""
    metrics = (summary or {}).get("validation") or {}
    for name in ("accuracy", "f1", "loss", "perplexity"):
        if name in metrics:
            return name, float(metrics[name])
    return None
