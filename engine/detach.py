"""Runs that outlive the terminal (or the TUI) that started them, and following them from another one.

`start_detached` prepares the run directory in this process (so mistakes in the config are reported here,
at once) and starts `python -m engine.cli run --resume RUN_DIR --detached-child` in a new session: no
controlling terminal, so a dropped SSH connection sends it no SIGHUP (it ignores SIGHUP as well), stdin
from /dev/null, stdout and stderr to `run.log` in the run directory. Its id is in the run's `pid` file.
`follow_run` replays and follows `events.jsonl` (the same events a foreground run shows) and
`request_stop` asks the run to stop (a `stop` file, and SIGINT to a CLI process): it checkpoints and records
`run_stopped`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from engine.config import ConfigError, RunConfig
from engine.events import Event, RunFailed, RunFinished, RunStarted, RunStopped
from engine.runs import (
    LOG_FILE,
    STOP_FILE,
    EventFollower,
    check_resumable,
    is_run_dir,
    live_pid,
    read_summary,
    stops_on_signal,
    write_pid,
)
from engine.sinks import EventSink

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 130


def _spawn(run_dir: Path, nproc: int = 1) -> int:
    if nproc > 1:  # torchrun and its workers (engine.distributed), in their own session as below
        from engine.distributed import start_workers

        process = start_workers(run_dir, nproc, detached=True)
        threading.Thread(target=process.wait, name=f"finetui-reap-{process.pid}", daemon=True).start()
        return process.pid
    run_dir = run_dir.resolve()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    command = [sys.executable, "-m", "engine.cli", "run", "--resume", str(run_dir), "--detached-child"]
    with (run_dir / LOG_FILE).open("ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=env,
        )
    write_pid(run_dir, process.pid, signals=True)
    # A long-lived caller (the TUI) reaps the child when it ends, so no zombie keeps its pid "alive".
    threading.Thread(target=process.wait, name=f"finetui-reap-{process.pid}", daemon=True).start()
    return process.pid


def start_detached(config: RunConfig, *, output_dir: Path | None = None) -> Path:
    """Start a run in its own process session and return its run directory at once.

    Raises ConfigError (nothing created) for the mistakes `run_training` would reject before its run
    directory exists; everything later is recorded in the run directory as usual.
    """
    from engine.trainer import prepare_run_dir

    config, run_dir = prepare_run_dir(config, output_dir)
    _spawn(run_dir, config.train.nproc)
    return run_dir.resolve()


def resume_detached(run_dir: Path) -> Path:
    """`finetui run --resume RUN_DIR --detach`: continue a run in its own process session."""
    config = check_resumable(run_dir)
    _spawn(run_dir, config.train.nproc)
    return run_dir.resolve()


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


def exit_code_of(event: Event) -> int:
    if isinstance(event, RunFinished):
        return EXIT_OK
    if isinstance(event, RunStopped):
        return EXIT_STOPPED
    if isinstance(event, RunFailed):
        return EXIT_BAD_INPUT if event.user_error else EXIT_FAILED
    raise ValueError(f"not a terminal event: {event.type}")


class ProcessVanished(Exception):
    """The run's process ended without recording how (killed, out of host memory, power loss)."""


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
        for event in pending:
            if isinstance(event, RunStarted):
                ended = None
            sink.emit(event)
            if isinstance(event, (RunFinished, RunFailed, RunStopped)):
                ended = event
        alive = live_pid(run_dir) is not None
        if ended is not None and not alive:
            return exit_code_of(ended)
        if should_stop() and not stop_sent and ended is None:
            stop_sent = True
            on_stop_sent(request_stop(run_dir))
        if ended is None and not alive:
            gone_polls += 1  # the last events may land just after the pid file goes: look twice
            if gone_polls > 2:
                summary = read_summary(run_dir) or {}
                if summary.get("status") == "finished":
                    return EXIT_OK
                raise ProcessVanished(
                    f"{run_dir}: the run's process ended without recording an end (killed?); "
                    f"continue it with finetui run --resume {run_dir}"
                )
        else:
            gone_polls = 0
        if should_leave():
            return None
        time.sleep(poll_s)
        pending = follower.poll()
