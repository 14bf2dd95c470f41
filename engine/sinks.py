"""Where engine events go: a file, stdout as JSON lines, a rich progress view, a list, or several at once.

A sink is anything with `emit(event)`. The engine only ever talks to a sink, which is how the
same training code drives the CLI, the TUI (a sink that posts Textual messages) and the tests.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from engine.events import (
    Checkpoint,
    Eval,
    Event,
    FreezeMapReady,
    Log,
    RunFailed,
    RunFinished,
    RunStarted,
    RunStopped,
    Step,
)


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


class TextLogSink:
    """Plain text lines for a detached run's `run.log`: what is happening, without the per-step noise."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stdout

    def emit(self, event: Event) -> None:
        match event:
            case RunStarted():
                resumed = f" (resumed from step {event.resumed_from_step})" if event.resumed_from_step else ""
                line = f"run started: {event.strategy} on {event.model} -> {event.run_dir}{resumed}"
            case Log():
                line = f"{event.level}: {event.message}"
            case Checkpoint():
                line = f"checkpoint {event.path}"
            case Eval():
                line = f"{event.split} @ step {event.step}: " + "  ".join(
                    f"{k} {v:.4f}" for k, v in event.metrics.items()
                )
            case RunFinished():
                line = "finished"
            case RunStopped():
                line = f"stopped at step {event.step} (checkpoint: {event.checkpoint})"
            case RunFailed():
                line = f"failed: {event.error}"
            case _:
                return
        self._stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        self._stream.flush()


class FanoutSink:
    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = sinks

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink.emit(event)


def format_count(n: int) -> str:
    return f"{n:,}"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def freeze_map_table(freeze_map: dict[str, Any], *, max_rows: int = 40) -> Table:
    """A rich table of a freeze map dict (the `FreezeMap.to_dict()` form)."""
    table = Table(title="Freeze map", title_justify="left", show_edge=False)
    for column, justify in (("layer", "left"), ("params", "right"), ("trainable", "right"), ("dtype", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    layers = freeze_map["layers"]
    shown = layers if len(layers) <= max_rows else [*layers[: max_rows - 3], None, *layers[-2:]]
    for row in shown:
        if row is None:
            table.add_row("…", "", "", "")
            continue
        dtype = row["dtype"] + (f" ({row['quantization']})" if row.get("quantization") else "")
        style = "green" if row["trainable"] else "dim"
        table.add_row(row["name"], format_count(row["total"]), format_count(row["trainable"]), dtype, style=style)
    table.add_section()
    table.add_row(
        "total",
        format_count(freeze_map["total_params"]),
        f"{format_count(freeze_map['trainable_params'])} ({freeze_map['trainable_percent']:.4g} %)",
        "",
    )
    return table


def memory_table(memory: dict[str, Any]) -> Table:
    table = Table(title="Memory (estimate)", title_justify="left", show_edge=False, show_header=False, expand=False)
    table.add_column("part")
    table.add_column("bytes", justify="right")
    for key in (
        "weights_bytes",
        "gradients_bytes",
        "optimizer_bytes",
        "activations_bytes",
        "overhead_bytes",
        "total_bytes",
    ):
        if key in memory:  # overhead_bytes: absent from freeze maps of older runs
            table.add_row(key.removesuffix("_bytes"), format_bytes(memory[key]))
    if memory.get("note"):
        table.caption = memory["note"]
        table.caption_justify = "left"
        table.min_width = 60
    return table


class RichProgressSink:
    """The terminal view of `finetui run`: freeze map, a progress bar with loss and speed, eval lines."""

    def __init__(self, console: Console | None = None, *, show_errors: bool = False) -> None:
        self.console = console or Console(stderr=False)
        self.show_errors = show_errors  # `finetui attach` shows the run's error; `run` prints it on stderr
        self._progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("eta {task.fields[eta]}  loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]}"),
            console=self.console,
            transient=False,
        )
        self._task: Any = None

    def _ensure_progress(self, total: int) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task("train", total=total, eta="?", loss="?", lr="?", speed="")

    def _stop_progress(self) -> None:
        if self._task is not None:
            self._progress.stop()
            self._task = None

    def emit(self, event: Event) -> None:
        match event:
            case RunStarted():
                self._stop_progress()
                resumed = ""
                if event.resumed_from_step is not None:
                    resumed = f" [yellow](resumed from step {event.resumed_from_step})[/]"
                processes = f" [dim]({event.processes} processes)[/]" if event.processes > 1 else ""
                self.console.print(
                    f"[bold]{event.name}[/]: {event.strategy} on {event.model} -> {event.run_dir}{resumed}{processes}"
                )
            case FreezeMapReady():
                self.console.print(freeze_map_table(event.freeze_map))
                if event.freeze_map.get("memory"):
                    self.console.print(memory_table(event.freeze_map["memory"]))
            case Step():
                self._ensure_progress(event.max_steps)
                eta = "?" if event.eta_s is None else f"{event.eta_s:.0f}s"
                speed = f"{event.samples_per_second:.1f} samples/s {event.tokens_per_second:.0f} tok/s"
                self._progress.update(
                    self._task,
                    completed=event.step,
                    eta=eta,
                    loss=f"{event.loss:.4f}",
                    lr=f"{event.lr:.2e}",
                    speed=speed,
                )
            case Eval():
                metrics = "  ".join(f"{k} {v:.4f}" for k, v in event.metrics.items())
                self.console.print(f"[cyan]{event.split}[/] @ step {event.step}: {metrics}")
            case Checkpoint():
                self.console.print(f"[dim]checkpoint {event.path}[/]")
            case Log():
                style = {"warning": "yellow", "error": "red"}.get(event.level, "dim")
                self.console.print(Text(event.message, style=style))
            case RunFinished():
                self._stop_progress()
                summary = event.summary
                lines = [f"[bold green]finished[/] in {summary['train_runtime_s']:.1f}s -> {summary['run_dir']}"]
                for split in ("validation", "test"):
                    if summary.get(split):
                        lines.append(f"  {split}: " + "  ".join(f"{k} {v:.4f}" for k, v in summary[split].items()))
                self.console.print("\n".join(lines))
            case RunStopped():
                self._stop_progress()
                self.console.print(f"[yellow]stopped at step {event.step}[/] (checkpoint: {event.checkpoint})")
            case RunFailed():
                self._stop_progress()  # the CLI reports the error itself, as one line on stderr
                if self.show_errors:
                    self.console.print(f"[red]failed[/]: {event.error}")
