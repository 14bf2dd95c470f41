"""The app's live run as a plain object: start one, resume one, follow one that another process trains, stop it.

A run trains in a thread worker of the app (`engine.api.run_training`), or in a process of its own
(`engine.api.start_detached`), which a thread worker follows through its events.jsonl
(`engine.launch.follow.follow_run`); either way the events reach the app as `EngineEvents` messages
(`tui.sink.MessageSink`) and are folded into `history` here. The screens read `history` and are told of changes
by two signals: `run_signal` (a run started, ended or was asked to stop) and `events_signal` (new events).
Confirmations and notifications are the app's; nothing here draws. Torch, transformers and datasets are
imported only inside the workers, so the first screen paints before any of them loads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual.signal import Signal

from engine.config import ConfigError, RunConfig
from engine.events import Event, Log, Progress, RunStarted, Step
from engine.launch.follow import follow_run, request_stop
from engine.runs import check_resumable, live_pid, read_events
from tui.heavy import load_engine
from tui.history import RunHistory
from tui.messages import RunDetached, RunEnded
from tui.sink import MessageSink

if TYPE_CHECKING:
    from textual.app import App


@dataclass(frozen=True)
class _Handle:
    """What one run's worker needs: where its events go, its stop and leave requests, and which run it is."""

    sink: MessageSink
    stop: threading.Event
    leave: threading.Event
    run_id: int


class LiveRun:
    """The run the training screen shows; at most one is active at a time."""

    def __init__(self, app: App[Any]) -> None:
        self.app = app
        self.history: RunHistory | None = None
        self.detached = False
        """The current run trains in a process of its own (started detached, or attached from the runs screen)."""
        self.stop_event = threading.Event()
        self.run_signal: Signal[RunHistory] = Signal(app, "run")
        self.events_signal: Signal[list[Event]] = Signal(app, "events")
        self._run_id = 0
        self._leave_event = threading.Event()
        self._stopping_others: set[Path] = set()

    # state

    @property
    def active(self) -> bool:
        return self.history is not None and self.history.active

    @property
    def stopping(self) -> bool:
        """The active run was asked to stop and has not stopped yet."""
        return self.active and self.stop_event.is_set()

    def is_current(self, run_dir: Path) -> bool:
        """Whether `run_dir` is the active run."""
        history = self.history
        if not self.active or history is None or history.run_dir is None:
            return False
        return Path(history.run_dir).resolve() == run_dir.resolve()

    # starting

    def start(self, config: RunConfig, *, detached: bool) -> None:
        """Train `config` in a thread worker, or (`detached`) in a process of its own that outlives the app."""
        history = RunHistory(name=config.name, model=config.model.id, strategy=config.strategy.kind, status="starting")
        handle = self._begin(history, detached=detached)
        if detached:
            self._worker(lambda: self._run_detached(config, handle), "background run")
        else:
            self._worker(lambda: self._train(config, handle), "training")

    def resume(self, run_dir: Path) -> None:
        """Continue a stopped, failed or interrupted run in its own directory (ConfigError when it cannot be)."""
        check_resumable(run_dir)
        history = RunHistory(run_dir=str(run_dir))
        for event in read_events(run_dir):  # the curves so far; the resumed run appends to them
            history.apply(event)
        history.status, history.error, history.ended_at = "starting", None, None
        handle = self._begin(history, detached=False)
        self._worker(lambda: self._resume(run_dir, handle), "training")

    def attach(self, run_dir: Path) -> None:
        """Follow a run that another process trains, as `finetui attach` does (ConfigError when it is not
        running): stopping asks it to stop, closing the app leaves it running."""
        if live_pid(run_dir) is None:
            raise ConfigError(f"{run_dir.name} is not running (enter opens it)")
        history = RunHistory(run_dir=str(run_dir))
        events = read_events(run_dir)
        starts = [index for index, event in enumerate(events) if isinstance(event, RunStarted)]
        for event in events[: starts[-1] if starts else 0]:  # earlier sessions; following replays the last one
            history.apply(event)
        history.status, history.error, history.ended_at = "starting", None, None
        handle = self._begin(history, detached=True)
        self._worker(lambda: self._follow(run_dir, handle), "attached run")

    def _begin(self, history: RunHistory, *, detached: bool) -> _Handle:
        """`history` becomes the live run; returns what its worker needs."""
        self._run_id += 1
        self.stop_event = threading.Event()
        self._leave_event = threading.Event()
        self.detached = detached
        self.history = history
        self.run_signal.publish(history)
        sink = MessageSink(self.app, self._run_id)
        return _Handle(sink, self.stop_event, self._leave_event, self._run_id)

    def _worker(self, work: Callable[[], None], name: str) -> None:
        self.app.run_worker(work, thread=True, exclusive=True, exit_on_error=False, group="run", name=name)

    # the workers (threads): they talk to the app only through messages

    def _train(self, config: RunConfig, handle: _Handle) -> None:
        load_engine()
        from engine.api import run_training

        run_training(config, handle.sink, stop_event=handle.stop)
        self.app.post_message(RunEnded(handle.run_id))

    def _resume(self, run_dir: Path, handle: _Handle) -> None:
        load_engine()
        from engine.api import resume_training

        resume_training(run_dir, handle.sink, stop_event=handle.stop)
        self.app.post_message(RunEnded(handle.run_id))

    def _run_detached(self, config: RunConfig, handle: _Handle) -> None:
        load_engine()  # preparing the run directory resolves the task, with transformers
        from engine.api import start_detached

        run_dir = start_detached(config)
        self.app.post_message(RunDetached(handle.run_id, run_dir))
        self._follow(run_dir, handle)

    def _follow(self, run_dir: Path, handle: _Handle) -> None:
        """Follow the run's events.jsonl into the sink until it ends (or the app closes); stop asks it to stop."""
        ended = follow_run(run_dir, handle.sink, should_stop=handle.stop.is_set, should_leave=handle.leave.is_set)
        if ended is not None:
            self.app.post_message(RunEnded(handle.run_id))

    # what the workers' messages change

    def detached_to(self, message: RunDetached) -> None:
        if message.run_id == self._run_id and self.history is not None and self.history.run_dir is None:
            self.history.run_dir = str(message.run_dir)
            self.run_signal.publish(self.history)

    def apply(self, sink: MessageSink) -> list[Event]:
        """Fold the events waiting in `sink` into the live run and tell the screens; the events applied."""
        events = sink.drain()
        if sink.run_id != self._run_id or self.history is None or not events:
            return []
        for event in events:
            self.history.apply(event)
        self.events_signal.publish(events)
        return events

    def owns(self, message: RunEnded) -> bool:
        return message.run_id == self._run_id

    def worker_failed(self, message: str) -> None:
        """The run's worker raised (a ConfigError before the run directory existed, or a bug)."""
        if self.history is not None and self.history.active:
            self.history.fail(message)
            self.run_signal.publish(self.history)

    @staticmethod
    def only_progress(events: list[Event]) -> bool:
        return all(isinstance(event, Step | Progress | Log) for event in events)

    # stopping

    def stop(self) -> None:
        """Ask the live run to stop at its next step (with a checkpoint)."""
        self.stop_event.set()
        if self.history is not None:
            self.history.stop_requested = True
            self.run_signal.publish(self.history)

    def leave(self) -> None:
        """The app closes: its own run stops at its next step (a thread cannot be killed); a run of another process
        goes on, only following it ends."""
        if self.detached:
            self._leave_event.set()
        else:
            self.stop_event.set()

    def stop_other(self, run_dir: Path) -> bool:
        """Ask the process training `run_dir` to stop; False when it had ended meanwhile."""
        if not request_stop(run_dir):
            return False
        self._stopping_others.add(run_dir.resolve())
        return True

    def stopping_other(self, run_dir: Path) -> bool:
        """This app asked the process training `run_dir` to stop and it has not stopped yet."""
        resolved = run_dir.resolve()
        if resolved in self._stopping_others and live_pid(run_dir) is None:
            self._stopping_others.discard(resolved)
        return resolved in self._stopping_others

    def banner(self) -> str:
        """The run's state for the mode bars (short: the bar has ~25 columns at 80)."""
        history = self.history
        if history is None:
            return ""
        if self.stopping:
            return "[b $warning]● stopping…[/]"
        step = history.position
        progress = f" {step.step}/{step.max_steps}" if step is not None else ""
        where = " (bg)" if self.detached else ""
        return {
            "starting": f"[b $accent]● starting{where}[/]",
            "running": f"[b $accent]● training{progress}{where}[/]",
            "finished": "[b $success]✓ finished[/]",
            "stopped": "[b $warning]■ stopped[/]",
            "failed": "[b $error]✗ failed[/]",
        }.get(history.status, "")
