"""What the libraries print (transformers, peft, accelerate, datasets), turned into events or silenced.

Progress bars and raw log lines would interleave with the CLI's view and with the JSON on stdout. Their
warnings still reach the user: during a run they become `log` events, transformers' multi-line LOAD REPORT
table summarised as one line.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import datasets
import transformers

from engine.events import Log
from engine.sinks import EventSink

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
LOAD_REPORT = "LOAD REPORT"
LOAD_REPORT_STATUSES = {
    "MISSING": "new weights, initialised for this task",
    "UNEXPECTED": "checkpoint weights this model does not use",
    "MISMATCH": "reinitialised (shape differs from the checkpoint)",
}
LOGGERS_BRIDGED = ("transformers", "peft", "accelerate", "engine")


def quiet_library_output() -> None:
    """No library progress bars or log lines on the terminal (warnings go through `bridged_logs` instead)."""
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_default_handler()
    # peft 0.21 still reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class _LogBridge(logging.Handler):
    """Library warnings (transformers, peft, ...) become `log` events while a run is active."""

    def __init__(self, sink: EventSink) -> None:
        super().__init__(level=logging.WARNING)
        self.sink = sink
        self.restoring_from: str | None = None
        """While a resumed run loads its model: the checkpoint whose weights replace the new ones."""

    def emit(self, record: logging.LogRecord) -> None:
        level = "error" if record.levelno >= logging.ERROR else "warning"
        message = ANSI_ESCAPE.sub("", record.getMessage()).strip()
        if LOAD_REPORT in message:
            if self.restoring_from:  # nothing is new: every weight comes from the checkpoint
                return
            level, message = "info", summarise_load_report(message)
        self.sink.emit(Log(level=level, message=f"{record.name}: {message}"))


@contextmanager
def bridged_logs(sink: EventSink) -> Iterator[_LogBridge]:
    """While inside, warnings of the bridged libraries (and the engine's own) are `log` events on `sink`."""
    bridge = _LogBridge(sink)
    for name in LOGGERS_BRIDGED:
        logging.getLogger(name).addHandler(bridge)
    try:
        yield bridge
    finally:
        for name in LOGGERS_BRIDGED:
            logging.getLogger(name).removeHandler(bridge)


def summarise_load_report(report: str) -> str:
    """transformers' multi-line LOAD REPORT table as one line: which weights are new, unused or reinitialised."""
    title = report.split("\n", 1)[0].replace(f" {LOAD_REPORT} from:", " from")
    keys: dict[str, list[str]] = {status: [] for status in LOAD_REPORT_STATUSES}
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) > 1 and cells[1] in keys:
            keys[cells[1]].append(cells[0])
    parts = [f"{LOAD_REPORT_STATUSES[status]}: {', '.join(names)}" for status, names in keys.items() if names]
    return f"{title}: " + "; ".join(parts) if parts else title
