"""Run directories: everything a run produces lives in one folder that any view can be rebuilt from.

Layout of `<output_dir>/<name>-<YYYYmmdd-HHMMSS>/`:
    config.toml     the resolved run config (written atomically, before training starts)
    events.jsonl    one event per line, flushed whole
    checkpoints/    Trainer checkpoints (the last `train.save_total_limit`)
    model/          the final model or adapter, with its tokenizer
    summary.json    status, metrics and speed (written atomically at the end)
    error.log       the traceback of a failed run
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from engine.config import ConfigError, RunConfig, build_config, config_to_dict, read_preset_file
from engine.events import Event, event_from_dict

CONFIG_FILE = "config.toml"
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"
ERROR_FILE = "error.log"
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new one, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_run_dir(config: RunConfig, output_dir: Path | None = None) -> Path:
    """Create a fresh, never reused run directory and write the resolved config into it."""
    parent = Path(output_dir or config.train.output_dir).expanduser()
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
    except FileNotFoundError:
        return None


class EventFollower:
    """Reads a run's `events.jsonl` incrementally, also while another process is still writing it.

    Each `poll()` returns the events of the complete lines added since the last poll; a line still
    being written waits for the next poll.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / EVENTS_FILE
        self._offset = 0
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
                status=summary["status"] if summary else "running",
                strategy=config.strategy.kind,
                model=config.model.id,
                started=config_path.stat().st_mtime,
                summary=summary,
            )
        )
    return sorted(runs, key=lambda run: run.started, reverse=True)
