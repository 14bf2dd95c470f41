"""Telling the person who walked away that a run ended: a terminal alert, and a command hook.

A run started over SSH may end hours later. The terminal that follows it (`finetui attach`, the TUI) rings the
bell and sends a desktop-notification escape, OSC 9 (iTerm2, Windows Terminal, WezTerm, kitty, ...) and
OSC 777 (rxvt-unicode, foot, VTE terminals), which travel through SSH like any output; inside tmux they are
wrapped for tmux's passthrough (`set -g allow-passthrough on`). `train.notify_command` runs once at the end with
summary.json on stdin, for mail or chat hooks: without a shell, with a timeout, and a failure is only logged.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from typing import IO, Any

from engine.events import Log
from engine.runs import TERMINAL_STATUSES
from engine.sinks import EventSink

NOTIFY_TIMEOUT_S = 60.0
TITLE = "finetui"


def terminal_alert(message: str, *, tmux: bool | None = None) -> str:
    """BEL plus OSC 9 and OSC 777 notifications carrying `message` (control characters and `;` removed)."""
    text = "".join(" " if ord(char) < 32 or char in ";\x7f" else char for char in message)
    escapes = f"\x1b]9;{text}\x07\x1b]777;notify;{TITLE};{text}\x07"
    if tmux if tmux is not None else bool(os.environ.get("TMUX")):
        escapes = "\x1bPtmux;" + escapes.replace("\x1b", "\x1b\x1b") + "\x1b\\"
    return "\a" + escapes


def alert_terminal(message: str, stream: IO[str]) -> None:
    """Send `terminal_alert(message)` to `stream` if it is a terminal (never into a pipe or a file)."""
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        stream.write(terminal_alert(message))
        stream.flush()


def end_message(summary: dict[str, Any]) -> str:
    """One line for a run's end: its folder name, status and headline result or error."""
    name = os.path.basename(str(summary.get("run_dir", ""))) or summary.get("name", "run")
    status = summary.get("status", "ended")
    if status == "failed" and summary.get("error"):
        return f"{name} failed: {summary['error']}"
    metrics = summary.get("validation") or {}
    shown = next((f"{key} {metrics[key]:.4g}" for key in ("accuracy", "loss") if key in metrics), "")
    return f"{name} {status}" + (f" ({shown})" if shown else "")


def command_argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def run_notify_command(
    command: str | list[str] | None, summary: dict[str, Any], sink: EventSink, *, timeout: float = NOTIFY_TIMEOUT_S
) -> bool:
    """Run `train.notify_command` with the summary JSON on stdin once the run has ended. Returns whether it ran
    and succeeded; a failure (cannot start, non-zero exit, timeout) is a warning on `sink`, never an exception."""
    if not command or summary.get("status") not in TERMINAL_STATUSES:
        return False
    argv = command_argv(command)
    try:
        done = subprocess.run(
            argv,
            input=json.dumps(summary, default=str),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        problem = f"did not finish within {timeout:g} s and was stopped"
    except (OSError, ValueError) as exc:
        problem = f"could not start ({exc})"
    else:
        if done.returncode == 0:
            return True
        last = (done.stderr.strip().splitlines() or [""])[-1]
        problem = f"exited with status {done.returncode}" + (f": {last}" if last else "")
    sink.emit(Log(level="warning", message=f"train.notify_command {shlex.join(argv)} {problem}"))
    return False
