"""Where engine events go: a file, stdout as JSON lines, a list, or several at once.

A sink is anything with `emit(event)`. The engine only ever talks to a sink, which is how the
same training code drives the CLI, the TUI (a sink that posts Textual messages) and the tests.
What a person sees of the events (the terminal progress view, tables) is `engine.views`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import IO, Any, Protocol

from engine.events import Event


class EventSink(Protocol):
    def emit(self, event: Event) -> None: ...


def event_to_json(event: Event) -> str:
    return json.dumps(event.to_dict(), ensure_ascii=False, allow_nan=False, default=str)


class JsonlFileSink:
    """Appends one JSON object per line, each line in one `write` call, so a reader never sees half an event.

    Opening an existing file (a resumed run) first ends a line cut short by a killed writer, so that the
    half line stays one unreadable line (readers skip it) instead of spoiling the next event.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        size = os.fstat(self._fd).st_size
        if size:
            with path.open("rb") as handle:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    self._write(b"\n")

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def emit(self, event: Event) -> None:
        line = (event_to_json(event) + "\n").encode("utf-8")
        with self._lock:
            self._write(line)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class JsonLinesSink:
    """JSON lines on a stream (stdout by default): `finetui run --json`."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stdout

    def emit(self, event: Event) -> None:
        self._stream.write(event_to_json(event) + "\n")
        self._stream.flush()


class ListSink:
    """Keeps every event in memory (tests)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def of_type(self, cls: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]


class GuardedSink:
    """A view that may go away (a closed terminal, a broken pipe): the first OSError silences it for good.

    Training goes on and events.jsonl stays complete; only the display stops.
    """

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self.broken = False

    def emit(self, event: Event) -> None:
        if self.broken:
            return
        try:
            self.sink.emit(event)
        except (OSError, ValueError):  # BrokenPipeError, EIO on a hung-up tty, "I/O operation on closed file"
            self.broken = True


class FanoutSink:
    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = sinks

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink.emit(event)
