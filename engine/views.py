"""What a person sees of a run in a terminal: the progress view of `finetui run`, freeze-map and memory tables,
plain log lines for a detached run's `run.log`, streamed answers, label bars and export stages of `generate`,
`chat` and `export`, and the number formats the TUI shares.

These are sinks (`emit(event)`) or helpers that only format; the engine's work never depends on them.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as ProgressBar
from rich.table import Table
from rich.text import Text

from engine.events import (
    Checkpoint,
    Eval,
    Event,
    ExportProgress,
    FreezeMapReady,
    Log,
    Progress,
    RunFailed,
    RunFinished,
    RunStarted,
    RunStopped,
    Samples,
    Step,
    TokensGenerated,
)


class TextLogSink:
    """Plain text lines for a detached run's `run.log`: what is happening, without the per-step noise."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stdout
        self._run_dir: str | None = None

    def emit(self, event: Event) -> None:
        match event:
            case RunStarted():
                self._run_dir = event.run_dir
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
                line = stopped_line(event, self._run_dir)
            case RunFailed():
                line = f"failed: {event.error}"
            case _:
                return
        self._stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        self._stream.flush()


def stopped_line(event: RunStopped, run_dir: str | None) -> str:
    """A stop, and the command that continues the run."""
    kept = f" (checkpoint: {event.checkpoint})" if event.checkpoint else " (no checkpoint yet)"
    resume = f"; continue with: finetui run --resume {run_dir}" if run_dir else ""
    return f"stopped at step {event.step}{kept}{resume}"


def format_duration(seconds: float | None) -> str:
    """31 -> 0:31, 423 -> 7:03, 3723 -> 1:02:03; None -> –."""
    if seconds is None:
        return "–"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_count(n: int) -> str:
    return f"{n:,}"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def freeze_map_table(freeze_map: dict[str, Any], *, max_rows: int = 40) -> Table:
    """A rich table of a freeze map dict (the `FreezeMap.to_dict()` form); runs of identical blocks fold into one
    row (`model.layers.0-31 ×32`), so that a 70B model fits a screen."""
    table = Table(title="Freeze map", title_justify="left", show_edge=False)
    for column, justify in (("layer", "left"), ("params", "right"), ("trainable", "right"), ("dtype", "left")):
        table.add_column(column, justify=justify, no_wrap=column == "layer")  # type: ignore[arg-type]
    layers = fold_blocks(freeze_map["layers"])
    shown = layers if len(layers) <= max_rows else [*layers[: max_rows - 3], None, *layers[-2:]]
    for row in shown:
        if row is None:
            table.add_row("…", "", "", "")
            continue
        dtype = row["dtype"] + (f" ({row['quantization']})" if row.get("quantization") else "")
        name = row["name"] + (" (new)" if row.get("new") else "")
        style = "green" if row["trainable"] else "dim"
        table.add_row(name, format_count(row["total"]), format_count(row["trainable"]), dtype, style=style)
    table.add_section()
    table.add_row(
        "total",
        format_count(freeze_map["total_params"]),
        f"{format_count(freeze_map['trainable_params'])} ({freeze_map['trainable_percent']:.4g} %)",
        "",
    )
    return table


def fold_blocks(layers: list[dict[str, Any]], *, at_least: int = 3) -> list[dict[str, Any]]:
    """Freeze-map rows with each run of `at_least` or more alike consecutive blocks (same counts, dtype and
    quantization) as one row: `model.layers.0-31 ×32` with the run's summed counts and its `groups`' names."""

    def alike(row: dict[str, Any]) -> tuple[Any, ...] | None:
        if row["kind"] != "block":
            return None
        return row["total"], row["trainable"], row["dtype"], row.get("quantization"), row["name"].rpartition(".")[0]

    folded: list[dict[str, Any]] = []
    start = 0
    while start < len(layers):
        end = start + 1
        while end < len(layers) and alike(layers[start]) is not None and alike(layers[end]) == alike(layers[start]):
            end += 1
        run = layers[start:end]
        if len(run) < at_least:
            folded.extend(run)
        else:
            first, last = run[0]["name"], run[-1]["name"].rpartition(".")[2]
            name = f"{first}-{last} ×{len(run)}"
            totals = {key: sum(row[key] for row in run) for key in ("total", "trainable")}
            folded.append({**run[0], "name": name, **totals, "groups": [row["name"] for row in run]})
        start = end
    return folded


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


WIDE_PROGRESS_COLUMNS = 110  # narrower terminals (80 columns over SSH) get a short bar and fewer fields


class RichProgressSink:
    """The terminal view of `finetui run`: freeze map, a progress bar with loss and speed, eval lines."""

    def __init__(self, console: Console | None = None, *, show_errors: bool = False) -> None:
        self.console = console or Console(stderr=False)
        self.show_errors = show_errors  # `finetui attach` shows the run's error; `run` prints it on stderr
        wide = self.console.width >= WIDE_PROGRESS_COLUMNS
        details = (
            "  lr {task.fields[lr]}  {task.fields[speed]} {task.fields[tokens]}" if wide else " {task.fields[speed]}"
        )
        self._progress = ProgressBar(
            TextColumn("[bold]step {task.completed}/{task.total}"),
            BarColumn(bar_width=None if wide else 12),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("eta {task.fields[eta]}  loss {task.fields[loss]}" + details),
            console=self.console,
            transient=False,
        )
        self._task: Any = None
        self._run_dir: str | None = None

    def _ensure_progress(self, total: int) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task("train", total=total, eta="?", loss="?", lr="?", speed="", tokens="")

    def _stop_progress(self) -> None:
        if self._task is not None:
            self._progress.stop()
            self._task = None

    def emit(self, event: Event) -> None:
        match event:
            case RunStarted():
                self._started(event)
            case FreezeMapReady():
                self.console.print(freeze_map_table(event.freeze_map))
                if event.freeze_map.get("memory"):
                    self.console.print(memory_table(event.freeze_map["memory"]))
            case Step() | Progress():
                self._step(event)
            case Eval():
                metrics = "  ".join(f"{k} {v:.4f}" for k, v in event.metrics.items())
                self.console.print(f"[cyan]{event.split}[/] @ step {event.step}: {metrics}")
            case Checkpoint():
                self.console.print(f"[dim]checkpoint {event.path}[/]")
            case Samples():
                self.console.print(Text(f"  sample {event.index + 1} @ step {event.step}: ", style="magenta"), end="")
                self.console.print(Text(f"{one_line(event.prompt, 40)} → {one_line(event.output, 60)}"))
            case Log():
                style = {"warning": "yellow", "error": "red"}.get(event.level, "dim")
                self.console.print(Text(event.message, style=style))
            case RunFinished() | RunStopped() | RunFailed():
                self._stop_progress()
                self._ended(event)

    def _started(self, event: RunStarted) -> None:
        self._stop_progress()
        self._run_dir = event.run_dir
        resumed = ""
        if event.resumed_from_step is not None:
            resumed = f" [yellow](resumed from step {event.resumed_from_step})[/]"
        processes = f" [dim]({event.processes} processes)[/]" if event.processes > 1 else ""
        self.console.print(
            f"[bold]{event.name}[/]: {event.strategy} on {event.model} -> {event.run_dir}{resumed}{processes}"
        )

    def _step(self, event: Step | Progress) -> None:
        self._ensure_progress(event.max_steps)
        eta = "?" if event.eta_s is None else format_duration(event.eta_s)
        speed = f"{event.samples_per_second:.1f} samples/s"
        fields = {"loss": f"{event.loss:.4f}", "lr": f"{event.lr:.2e}"} if isinstance(event, Step) else {}
        tokens = f"{event.tokens_per_second:.0f} tok/s"
        self._progress.update(self._task, completed=event.step, eta=eta, speed=speed, tokens=tokens, **fields)

    def _ended(self, event: RunFinished | RunStopped | RunFailed) -> None:
        if isinstance(event, RunFinished):
            summary = event.summary
            lines = [f"[bold green]finished[/] in {summary['train_runtime_s']:.1f}s -> {summary['run_dir']}"]
            for split in ("validation", "test"):
                if summary.get(split):
                    lines.append(f"  {split}: " + "  ".join(f"{k} {v:.4f}" for k, v in summary[split].items()))
            self.console.print("\n".join(lines))
        elif isinstance(event, RunStopped):
            self.console.print(Text(stopped_line(event, self._run_dir), style="yellow"))
        elif self.show_errors:  # the CLI reports a run's error itself, as one line on stderr
            self.console.print(f"[red]failed[/]: {event.error}")


STOP_REASONS = {"end": "ended at an end token", "length": "reached max_new_tokens", "stopped": "stopped"}


class AnswerStream:
    """Prints an answer's text as it is generated (`TokensGenerated`), flushed piece by piece."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stdout

    def emit(self, event: Event) -> None:
        if isinstance(event, TokensGenerated):
            self._stream.write(event.text)
            self._stream.flush()


def answer_stats(tokens: int, tokens_per_second: float, stop_reason: str) -> str:
    """`12 tokens, 35.1 tokens/s, ended at an end token`."""
    return f"{tokens} tokens, {tokens_per_second:.1f} tokens/s, {STOP_REASONS.get(stop_reason, stop_reason)}"


def label_bars(probabilities: dict[str, float], width: int = 30) -> str:
    """One line per label, most likely first: name, a bar, the probability."""
    names = max((len(name) for name in probabilities), default=0)
    lines = []
    for name, probability in sorted(probabilities.items(), key=lambda item: -item[1]):
        filled = round(probability * width)
        lines.append(f"{name:<{names}}  {'█' * filled}{'░' * (width - filled)}  {probability:.3f}")
    return "\n".join(lines)


def judged_line(model: str, result: dict[str, Any]) -> str:
    """`fine-tuned  exact 0.812 (95 % CI 0.771-0.847, wilson) on 400 rows, accuracy 0.812, macro-F1 0.809, ...`."""
    low, high = result["interval"]
    line = (
        f"{model:<10}  {result['metric']} {result['score']:.3f} (95 % CI {low:.3f}-{high:.3f}, "
        f"{result['interval_method']}) on {result['rows']} rows"
    )
    if "accuracy" in result:
        line += f", accuracy {result['accuracy']:.3f}, macro-F1 {result['f1']:.3f}"
        line += f", {result['outside_label_set']} answers outside the label set"
    return f"{line}  ({result['rows_per_second']:.1f} rows/s)"


def one_line(text: Any, width: int) -> str:
    """A text on one line (runs of whitespace as one space), cut to `width` characters with an ellipsis."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def worst_row_lines(records: list[dict[str, Any]], width: int = 60) -> list[str]:
    """The worst-scored rows: number, score, reference and output, each cut to `width` characters."""

    def cut(text: Any) -> str:
        return json.dumps(one_line(text, width), ensure_ascii=False)

    return [
        f"  row {record['row']}  score {record['score']:.2f}  reference {cut(record['reference'])}  "
        f"output {cut(record['output'])}"
        for record in records
    ]


class ExportProgressLines:
    """`finetui export`'s stages as lines: `[2/6] the run's greedy answers to 4 fixed prompts`."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stderr

    def emit(self, event: Event) -> None:
        if isinstance(event, ExportProgress):
            self._stream.write(f"[{event.step}/{event.steps}] {event.message}\n")
            self._stream.flush()
