"""Following a run that another process trains, and asking it to stop.

`follow_run` replays and follows `events.jsonl` (the same events a foreground run shows) and `request_stop`
asks the run to stop (a `stop` file, and SIGINT to a CLI process): it checkpoints and records `run_stopped`.
`finetui attach`, the TUI and a `--nproc` launch all follow runs this way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from engine.config import ConfigError
from engine.events import EXIT_OK, Event, RunFailed, RunFinished, RunStarted, RunStopped, exit_code_of
from engine.runs import STOP_FILE, EventFollower, is_run_dir, live_pid, read_summary, stops_on_signal
from engine.sinks import EventSink


class ProcessVanished(Exception):
    """The run's process ended without recording how (killed, out of host memory, power loss)."""


def request_stop(run_dir: Path) -> bool:
    """Ask the process training `run_dir` to stop (checkpoint, `run_stopped`); False when none is running.

    The run notices a `stop` file in its directory at its next step (whatever process hosts it: the CLI, a
    detached child, the TUI); a CLI process is also sent SIGINT, which it turns into the same clean stop.
    """
    pid = live_pid(run_dir)
    if pid is None:
        return False
    (run_dir / STOP_FILE).touch()
    if stops_on_signal(run_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
    return True


def follow_run(
    run_dir: Path,
    sink: EventSink,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    on_stop_sent: Callable[[bool], None] = lambda sent: None,
    should_leave: Callable[[], bool] = lambda: False,
    since: int | None = None,
    poll_s: float = 0.2,
) -> int | None:
    """Show a run's current session (from its last `run_started`) on `sink` and follow it until it ends.

    Returns the run's exit code (0 finished, 1/2 failed, 130 stopped). When `should_stop()` turns true the
    run's process is asked to stop once (`on_stop_sent(sent)` reports it) and following goes on until it
    records `run_stopped`. When `should_leave()` turns true, following ends and None is returned (the run goes
    on). `since`: show only what was written after this offset of events.jsonl (a session the caller
    starts, whose `run_started` is not written yet). Raises ConfigError for a directory that is not a run,
    ProcessVanished when the process is gone without a final event.
    """
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise ConfigError(f"{run_dir}: not a finetui run directory (no config.toml)")
    follower = EventFollower(run_dir, since or 0)
    backlog = follower.poll()
    starts = [index for index, event in enumerate(backlog) if isinstance(event, RunStarted)]
    pending = backlog[starts[-1] :] if starts and since is None else backlog
    ended: Event | None = None
    stop_sent = False
    gone_polls = 0
    while True:
        ended = _show(pending, sink, ended)
        alive = live_pid(run_dir) is not None
        if ended is not None and not alive:
            return exit_code_of(ended)
        if should_stop() and not stop_sent and ended is None:
            stop_sent = True
            on_stop_sent(request_stop(run_dir))
        gone_polls = gone_polls + 1 if ended is None and not alive else 0
        if gone_polls > 2:  # the last events may land just after the pid file goes: look twice
            return _vanished(run_dir)
        if should_leave():
            return None
        time.sleep(poll_s)
        pending = follower.poll()


def _show(events: list[Event], sink: EventSink, ended: Event | None) -> Event | None:
    """Emit `events`; the session's end event so far (a new `run_started` starts a new session)."""
    for event in events:
        if isinstance(event, RunStarted):
            ended = None
        sink.emit(event)
        if isinstance(event, (RunFinished, RunFailed, RunStopped)):
            ended = event
    return ended


def _vanished(run_dir: Path) -> int:
    if (read_summary(run_dir) or {}).get("status") == "finished":
        return EXIT_OK
    raise ProcessVanished(
        f"{run_dir}: the run's process ended without recording an end (killed?); "
        f"continue it with finetui run --resume {run_dir}"
    )
