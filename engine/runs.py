"""Run directories: everything a run produces lives in one folder that any view can be rebuilt from.

Layout of `<output_dir>/<name>-<YYYYmmdd-HHMMSS>/`:
    config.toml     the resolved run config (written atomically, before training starts)
    events.jsonl    one event per line, flushed whole; a resumed run appends to it
    checkpoints/    Trainer checkpoints `checkpoint-<step>/` (the last `train.save_total_limit`), each written
                    into `checkpoints/.staging/` and renamed into place, so every `checkpoint-<step>` is complete
    model/          the final model or adapter, with its tokenizer (written beside, then renamed)
    summary.json    status, metrics and speed (written atomically at the start and the end)
    environment.json  versions, hardware, data file hashes, seeds (engine.environment), from the first session
    pid             the id of the process training the run, while it runs ("signals" on a second line when
                    SIGINT stops it cleanly, as for the CLI)
    stop            created by `finetui attach` (engine.launch.follow.request_stop) to ask the run to stop
    run.log         stdout and stderr of a detached run (`finetui run --detach`)
    error.log       the traceback of a failed run
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import tomli_w

from engine.config import ConfigError, RunConfig, build_config, config_to_dict, parse_override, read_preset_file
from engine.events import Event, event_from_dict
from engine.fsio import write_atomic
from engine.parallel import owns_pid_file

CONFIG_FILE = "config.toml"
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"
ENVIRONMENT_FILE = "environment.json"
ERROR_FILE = "error.log"
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
PID_FILE = "pid"
STOP_FILE = "stop"
LOG_FILE = "run.log"
STAGING_DIR = ".staging"
TERMINAL_STATUSES = ("finished", "failed", "stopped")
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_TRAINER_STATE = "trainer_state.json"


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def create_run_dir(config: RunConfig, output_dir: Path | None = None) -> Path:
    """Create a fresh, never reused run directory and write the resolved config into it."""
    parent = Path(output_dir or config.train.output_dir).expanduser()
    if is_run_dir(parent):
        raise ConfigError(
            f"{parent} is a run directory, and runs are never written into each other; "
            f"continue it with finetui run --resume {parent}, or pick another --output-dir"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 1000):
            run_dir = parent / (f"{config.name}-{stamp}" if attempt == 1 else f"{config.name}-{stamp}-{attempt}")
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
        write_atomic(run_dir / CONFIG_FILE, tomli_w.dumps(config_to_dict(config)))
    except OSError as exc:
        raise ConfigError(
            f"train.output_dir: cannot create a run directory in {parent} ({exc.strerror}); choose another --output-dir"
        ) from None
    return run_dir


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2, allow_nan=False, default=str) + "\n")


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first. Only complete ones carry the name `checkpoint-<step>`."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [
        path
        for path in root.iterdir()
        if path.is_dir() and checkpoint_step(path) is not None and (path / _TRAINER_STATE).is_file()
    ]
    return sorted(found, key=lambda path: checkpoint_step(path) or 0)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The last complete checkpoint of a run, the one `--resume` continues from."""
    checkpoints = complete_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def rotate_checkpoints(run_dir: Path, keep: int | None, best: Path | None = None) -> None:
    """Delete all but the last `keep` checkpoints and the `best` one (renamed aside first, so none is ever seen
    half-deleted)."""
    if not keep:
        return
    for old in complete_checkpoints(run_dir)[:-keep]:
        if best is not None and old.name == best.name:
            continue
        trash = old.parent / f".trash-{old.name}"
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def clean_partial_writes(run_dir: Path) -> None:
    """Remove what an interrupted write left behind (staging and trash folders, temporary files), and put
    back a complete folder that `replace_dir` had moved aside when the kill came."""
    for folder in (run_dir, run_dir / CHECKPOINTS_DIR):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            original = folder / path.name.removeprefix(".old-")
            if path.name.startswith(".old-") and not original.exists():
                os.replace(path, original)  # killed between moving the old one aside and the new one in
                continue
            if path.name.startswith((".trash-", ".old-", STAGING_DIR, f".{MODEL_DIR}.")) or (
                path.name.startswith(".") and path.name.endswith(".tmp")
            ):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def write_pid(run_dir: Path, pid: int | None = None, *, signals: bool = False) -> None:
    """Record the process training the run; `signals`: it turns SIGINT into a clean stop (the CLI does)."""
    write_atomic(run_dir / PID_FILE, f"{pid or os.getpid()}\n" + ("signals\n" if signals else ""))


def stops_on_signal(run_dir: Path) -> bool:
    try:
        return "signals" in (run_dir / PID_FILE).read_text(encoding="utf-8").split()[1:]
    except (FileNotFoundError, IndexError):
        return False


class StopRequested(Exception):
    """Raised where a run checks for a stop request between steps (loading, evaluating, embedding)."""


@dataclass(frozen=True)
class StopRequest:
    """Whether a run has been asked to stop: by its caller (`event`, set by the CLI's signal handlers or the
    TUI) or by another process, which creates the `stop` file in the run directory (`engine.launch.follow`)."""

    run_dir: Path
    event: threading.Event | None = None

    def __call__(self) -> bool:
        return (self.event is not None and self.event.is_set()) or (self.run_dir / STOP_FILE).exists()

    def check(self) -> None:
        """Raise StopRequested when a stop was asked for."""
        if self():
            raise StopRequested


def remove_pid(run_dir: Path, pid: int | None = None) -> None:
    """Remove the pid file if it still names `pid` (this process by default)."""
    if read_pid(run_dir) == (pid or os.getpid()):
        (run_dir / PID_FILE).unlink(missing_ok=True)


def read_pid(run_dir: Path) -> int | None:
    try:
        return int((run_dir / PID_FILE).read_text(encoding="utf-8").split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def live_pid(run_dir: Path) -> int | None:
    """The id of the process training this run, if it is still alive (not a later process that reused the id)."""
    pid = read_pid(run_dir)
    if pid is None:
        return None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        if process.create_time() > (run_dir / PID_FILE).stat().st_mtime + 2.0:
            return None  # the id now belongs to a process started after the pid file was written
    except (psutil.Error, OSError):
        return None
    return pid


def run_status(run_dir: Path, summary: dict[str, Any] | None = None) -> str:
    """finished, failed, stopped, running, or interrupted (its process died without recording an end)."""
    summary = summary if summary is not None else read_summary(run_dir)
    status = summary.get("status", "running") if summary else "running"
    if status not in TERMINAL_STATUSES and read_pid(run_dir) is not None and live_pid(run_dir) is None:
        return "interrupted"
    return status


class EventFollower:
    """Reads a run's `events.jsonl` incrementally, also while another process is still writing it.

    Each `poll()` returns the events of the complete lines added since the last poll; a line still
    being written waits for the next poll.
    """

    def __init__(self, run_dir: Path, offset: int = 0) -> None:
        self.path = run_dir / EVENTS_FILE
        self._offset = offset  # where to start reading: 0, or the size the file had before a new session
        self._partial = b""

    def poll(self) -> list[Event]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        events = []
        for line in lines:
            try:
                events.append(event_from_dict(json.loads(line)))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                continue
        return events


def read_events(run_dir: Path) -> list[Event]:
    """The complete events of a run so far."""
    return EventFollower(run_dir).poll()


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    """The resolved config a run was started with (plus optional overrides)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a finetui run directory (no {CONFIG_FILE})")
    return build_config(read_preset_file(path), overrides)


RESUME_OVERRIDABLE = (
    "train.epochs",
    "train.max_steps",
    "train.eval_steps",
    "train.eval_batch_size",
    "train.logging_steps",
    "train.save_steps",
    "train.save_total_limit",
)
"""Keys `--resume` may change: how long to go on, how often to evaluate, log and save. Anything else
(model, data, strategy, batch size, lr, seed) would not match the checkpoint's weights, optimizer or data order."""


def override_resumed_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """Check that a stopped run may be resumed with `overrides`, and record them in its config.toml (atomically)."""
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if key not in RESUME_OVERRIDABLE:
            allowed = ", ".join(RESUME_OVERRIDABLE)
            raise ConfigError(f"--resume cannot change {key} (it must match the checkpoint); it can change: {allowed}")
    check_resumable(run_dir)
    config = load_run_config(run_dir, overrides)
    write_atomic(run_dir / CONFIG_FILE, tomli_w.dumps(config_to_dict(config)))
    return config


def check_resumable(run_dir: Path) -> RunConfig:
    """The config of a run that `--resume` may continue, or a one-line ConfigError saying why not."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    config = load_run_config(run_dir)
    summary = read_summary(run_dir) or {}
    if summary.get("status") == "finished":
        raise ConfigError(f"{run_dir}: the run already finished; nothing to resume (start a new run instead)")
    pid = live_pid(run_dir)
    if pid is not None and pid != os.getpid() and owns_pid_file():  # a worker's pid file names its launcher
        raise ConfigError(f"{run_dir}: the run is still running (pid {pid}); follow it with finetui attach {run_dir}")
    return config


@dataclass(frozen=True)
class RunInfo:
    """What a list of runs shows about one run directory."""

    path: Path
    name: str
    status: str
    strategy: str
    model: str
    started: float
    summary: dict[str, Any] | None


def list_runs(output_dir: Path) -> list[RunInfo]:
    """Run directories under `output_dir`, newest first."""
    runs = []
    for config_path in output_dir.glob(f"*/{CONFIG_FILE}"):
        run_dir = config_path.parent
        summary = read_summary(run_dir)
        try:
            config = load_run_config(run_dir)
        except ConfigError:
            continue
        runs.append(
            RunInfo(
                path=run_dir,
                name=config.name,
                status=run_status(run_dir, summary),
                strategy=config.strategy.kind,
                model=config.model.id,
                started=config_path.stat().st_mtime,
                summary=summary,
            )
        )
    return sorted(runs, key=lambda run: run.started, reverse=True)
