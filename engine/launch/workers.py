"""`train.nproc` > 1 from one command: start torchrun with N workers on a prepared run and follow it here.

The calling process prepares the run directory as for one process (bad input is reported once, there), then
starts the workers (`engine.launch.processes.spawn`) and follows their `events.jsonl` exactly as `finetui
attach` does. The HF Trainer in the workers does DDP (gloo on CPUs, NCCL on GPUs), or FSDP / DeepSpeed when
`train.fsdp` / `train.deepspeed` say so; only rank 0 writes the run directory.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from engine.events import EXIT_FAILED, RunFailed, RunResult
from engine.launch.follow import ProcessVanished, follow_run
from engine.launch.processes import spawn
from engine.runs import EVENTS_FILE, LOG_FILE, read_summary, remove_pid, write_summary
from engine.sinks import EventSink, FanoutSink, JsonlFileSink


def run_launched(run_dir: Path, nproc: int, sink: EventSink, *, stop_event: threading.Event | None = None) -> RunResult:
    """Train a prepared (or resumable) run in `nproc` worker processes and follow it on `sink` until it ends.

    Setting `stop_event` asks the workers to stop (checkpoint, `run_stopped`). Workers that end without
    recording an end (a crash, a kill) leave the run `failed`, naming run.log.
    """

    def stopping() -> bool:
        return stop_event is not None and stop_event.is_set()

    events_file = run_dir / EVENTS_FILE
    since = events_file.stat().st_size if events_file.exists() else 0  # show only the session started here
    process = spawn(run_dir, nproc, detached=False)
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
        _record_failure(run_dir, summary, message, sink)
        code = EXIT_FAILED
    status = summary.get("status", "failed")
    return RunResult(status if status in ("finished", "stopped") else "failed", run_dir, summary, code)


def _record_failure(run_dir: Path, summary: dict, message: str, sink: EventSink) -> None:
    summary.update(status="failed", error=message, reason="error")
    with contextlib.suppress(OSError):
        write_summary(run_dir, summary)
    file_sink = JsonlFileSink(run_dir / EVENTS_FILE)
    try:
        FanoutSink(file_sink, sink).emit(RunFailed(error=message, user_error=False, reason="error"))
    finally:
        file_sink.close()
