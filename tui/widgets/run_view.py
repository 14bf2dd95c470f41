"""One run on screen: loss curves, progress, speed and memory, latest metrics, and its log.

The same widget shows the live run on the training screen and a run read back from its directory on the runs
screen; both feed it a `tui.history.RunHistory`. Every moment the UI thread spends drawing is taken from the
training (the CPU, and the GIL when the run trains in this process), so the view redraws on one clock: at most
once a second, and only what changed (new points, or the elapsed time), in one frame; and no
update changes a widget's size unless its text grew or shrank by lines (a size change repaints the whole screen).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Label, ProgressBar, RichLog, Sparkline, Static
from textual_plotext import PlotextPlot

from engine.events import (
    BUSY_CPU_PERCENT,
    Checkpoint,
    Eval,
    Event,
    Log,
    RunFailed,
    RunFinished,
    RunStarted,
    RunStopped,
    Step,
)
from engine.views import format_duration, stopped_line
from tui.form import display_path
from tui.history import RunHistory

FLUSH_S = 1.0
STATUS_STYLE = {
    "running": "$accent",
    "starting": "$accent",
    "finished": "$success",
    "stopped": "$warning",
    "failed": "$error",
    "interrupted": "$warning",
}
LINE_COLORS = ("cyan", "orange", "green", "magenta", "blue", "red", "yellow", "gray")


@dataclass(frozen=True)
class Series:
    label: str
    steps: Sequence[int]
    losses: Sequence[float]
    eval_steps: Sequence[int] = ()
    eval_losses: Sequence[float] = ()


def series_of(history: RunHistory, label: str | None = None) -> Series:
    eval_steps, eval_losses = history.eval_curve("loss")
    return Series(label or history.label, history.steps, history.losses, eval_steps, eval_losses)


def memory_rows(freeze_map: dict[str, Any] | None, step: Step | None) -> list[tuple[str, str]]:
    """The freeze map's memory estimate, and the measured peak so far with the ratio estimate / peak. They come
    before RSS: the panel shows 7 rows, and the peak says more than the resident size now."""
    estimate = ((freeze_map or {}).get("memory") or {}).get("total_bytes")
    peak = step.memory_peak_bytes if step is not None else None
    rows = []
    if estimate:
        rows.append(("mem est", short_bytes(estimate)))
    if peak:
        rows.append(("mem peak", short_bytes(peak) + (f" {estimate / peak:.2f}x" if estimate else "")))
    return rows


def short_bytes(count: float) -> str:
    """Bytes in at most 9 characters (the side panel is narrow): 210 MiB, 12.5 GiB."""
    return f"{count / 2**20:,.0f} MiB" if count < 10 * 2**30 else f"{count / 2**30:,.1f} GiB"


class LossChart(PlotextPlot):
    """Train loss (and validation loss) against the step, for one run or several overlaid."""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.series: list[Series] = []
        self.overlay = False

    def plot(self, series: Iterable[Series], *, overlay: bool = False) -> None:
        self.series = list(series)
        self.overlay = overlay
        plt = self.plt
        plt.clear_figure()
        plt.title("loss (train" + (", validation dots)" if not overlay else ")"))
        plt.xlabel("step")
        drawn = False
        for index, run in enumerate(self.series):
            color = LINE_COLORS[index % len(LINE_COLORS)]
            if run.steps:
                label = run.label if overlay else "train"
                plt.plot(list(run.steps), list(run.losses), marker="braille", color=color, label=label)
                drawn = True
            if run.eval_steps and not overlay:
                plt.scatter(list(run.eval_steps), list(run.eval_losses), marker="●", color="orange", label="validation")
                drawn = True
        if not drawn:
            plt.title("loss: waiting for the first logged step")
        self.refresh()


class RunView(Vertical):
    """A run's header, progress, chart, stats and log, redrawn from a RunHistory."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, classes="run-view")
        self.history: RunHistory | None = None
        self._dirty = False
        self._plotted: tuple[list[int], int, int] | None = None
        self._texts: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        yield Label("", id="run-title")
        yield Label("", id="run-error")
        with Horizontal(id="progress-row"):
            # a known total from the start: an indeterminate bar animates at full frame rate, costing the CPU
            yield ProgressBar(total=1, show_eta=False, show_percentage=False, id="run-progress")
            yield Label("", id="progress-text")
        with Horizontal(id="run-body"):
            yield LossChart(id="loss-chart")
            with VerticalScroll(id="run-side"):
                yield Static("", id="run-stats")
                with Horizontal(id="lr-row"):
                    yield Label("lr curve  ", classes="dim")
                    yield Sparkline([], id="lr-spark")
                yield Static("", id="run-metrics")
        yield RichLog(id="run-log", wrap=True, markup=False, max_lines=2000)

    def on_mount(self) -> None:
        self.set_interval(FLUSH_S, self._flush)
        if self.history is not None:
            self.show(self.history)

    # full redraw / incremental updates

    def show(self, history: RunHistory) -> None:
        """Redraw everything from `history` (a run just opened, or a new run started)."""
        self.history = history
        if not self.is_mounted:
            return
        log = self.query_one("#run-log", RichLog)
        log.clear()
        for event in history.journal:
            line = self._log_line(event)
            if line is not None:
                log.write(line)
        self._dirty = True
        self._plotted = None
        self._flush()

    def events_applied(self, history: RunHistory, events: Sequence[Event]) -> None:
        """`events` were just applied to `history`: log them now; numbers and chart follow at a steady pace.

        A run logging every step may send hundreds of events a second; redrawing on each would keep the UI
        thread (and the GIL) busy and slow the training thread down.
        """
        self.history = history
        if not self.is_mounted:
            return
        log = self.query_one("#run-log", RichLog)
        for event in events:
            line = self._log_line(event)
            if line is not None:
                log.write(line)
        self._dirty = True
        if any(not isinstance(event, Step | Log) for event in events):
            self._flush()  # start, eval, end: show at once

    def _flush(self) -> None:
        """Redraw what changed since the last flush; the elapsed time and ETA of an active run every second."""
        history = self.history
        if history is None:
            return
        if self._dirty:
            self._dirty = False
            self._update_text()
            plotted = (history.steps[-1:], len(history.steps), len(history.evals))
            if plotted != self._plotted:  # a log line alone leaves the chart as it is
                self._plotted = plotted
                self.query_one(LossChart).plot([series_of(history)])
                self.query_one("#lr-spark", Sparkline).data = list(history.lrs[-200:])
        elif history.active:
            self._update_progress(history)

    # text

    def _log_line(self, event: Event) -> Text | None:
        match event:
            case Log():
                style = {"warning": "yellow", "error": "red"}.get(event.level, "")
                return Text(event.message, style=style)
            case Eval():
                metrics = "  ".join(f"{k} {v:.4g}" for k, v in event.metrics.items())
                return Text(f"{event.split} @ step {event.step}: {metrics}", style="cyan")
            case Checkpoint():
                return Text(f"checkpoint saved at step {event.step}", style="dim")
            case RunStarted():
                resumed = f" (resumed from step {event.resumed_from_step})" if event.resumed_from_step else ""
                return Text(f"run directory {display_path(event.run_dir)}{resumed}", style="dim")
            case RunFinished():
                return Text("finished", style="green")
            case RunStopped():  # the checkpoint by name: the run directory's path follows
                run_dir = display_path(self.history.run_dir) if self.history and self.history.run_dir else None
                checkpoint = Path(event.checkpoint).name if event.checkpoint else None
                return Text(stopped_line(replace(event, checkpoint=checkpoint), run_dir), style="yellow")
            case RunFailed():
                return Text(f"failed: {event.error}", style="bold red")
        return None

    def _update_text(self) -> None:
        history = self.history
        assert history is not None
        status = "stopping…" if history.active and history.stop_requested else history.status
        style = STATUS_STYLE.get(history.status, "")
        parts = [history.label, history.strategy, history.model.removeprefix("builtin:")]
        title = " · ".join(part for part in parts if part)
        self.query_one("#run-title", Label).update(f"[{style} b]{status}[/]  {title}", layout=False)
        if self._set_text("#run-error", f"error: {history.error}" if history.error else ""):
            self.query_one("#run-error").display = bool(history.error)
        self._update_progress(history)
        stats = self._stats(history)
        shown = self._texts.get("#run-stats", "")
        self._texts["#run-stats"] = stats
        self.query_one("#run-stats", Static).update(stats, layout=not shown or stats.count("\n") != shown.count("\n"))
        self._set_text("#run-metrics", self._metrics(history))

    def _set_text(self, selector: str, text: str) -> bool:
        """Show `text` in a widget whose size follows its text; nothing (no new layout) when it is unchanged."""
        if self._texts.get(selector) == text:
            return False
        self._texts[selector] = text
        self.query_one(selector, Static).update(text)
        return True

    def _update_progress(self, history: RunHistory) -> None:
        step = history.position
        bar = self.query_one("#run-progress", ProgressBar)
        if step is not None:
            done = step.max_steps if history.status == "finished" else step.step
            bar.update(total=step.max_steps, progress=done)
        else:
            bar.update(total=1, progress=1 if history.status == "finished" else 0)
        elapsed = history.elapsed(time.time()) if history.started_at is not None else None
        pieces = []
        if step is not None:
            pieces.append(f"step {step.step}/{step.max_steps}")
            pieces.append(f"epoch {step.epoch:.2f}")
        elif history.active:
            pieces.append("loading model and data…")
        pieces.append(f"{format_duration(elapsed)} elapsed")
        if history.active and step is not None and step.eta_s is not None:
            since_step = max(0.0, time.time() - step.time)
            pieces.append(f"ETA {format_duration(max(0.0, step.eta_s - since_step))}")
        self.query_one("#progress-text", Label).update(" · ".join(pieces), layout=False)

    @staticmethod
    def _stats(history: RunHistory) -> str:
        step, position = history.last_step, history.position
        if position is None:
            return "[dim]no step yet[/]"
        rows = [
            ("loss", f"{step.loss:.4f}" if step is not None else "–"),
            ("lr", f"{step.lr:.2e}" if step is not None else "–"),
            ("grad norm", f"{step.grad_norm:.3g}" if step is not None and step.grad_norm is not None else "–"),
            ("samples/s", f"{position.samples_per_second:.1f}"),
            ("tokens/s", f"{position.tokens_per_second:,.0f}"),
            *memory_rows(history.freeze_map, step),
            ("RSS", f"{position.memory_rss_mb:,.0f} MiB" if position.memory_rss_mb is not None else "–"),
        ]
        if step is not None and step.gpu_memory_mb is not None:
            rows.append(("GPU mem", f"{step.gpu_memory_mb:,.0f} MiB"))
        others = position.cpu_others_percent
        if others is not None and others >= BUSY_CPU_PERCENT:
            rows.append(("CPU busy", f"[$warning]others {others:.0f} %[/]"))
        return "\n".join(f"{name:<10}[b]{value}[/]" for name, value in rows)

    @staticmethod
    def _metrics(history: RunHistory) -> str:
        """The latest metrics as a small table, one column per split: validation and test side by side fit the
        side panel of an 80x24 terminal (one block per split fell below its fold)."""
        splits = {split: history.latest_metrics(split) for split in ("validation", "test")}
        splits = {split: metrics for split, metrics in splits.items() if metrics}
        if not splits:
            return ""
        names = list(dict.fromkeys(name for metrics in splits.values() for name in metrics))
        names.sort(key=lambda name: name == "perplexity")  # last, as in the log

        def cell(split: str, name: str) -> str:
            value = splits[split].get(name)
            return "–" if value is None else f"{value:.4g}" if name == "perplexity" else f"{value:.4f}"

        widths = {split: max(len(split), *(len(cell(split, name)) for name in names)) for split in splits}
        header = " ".join(f"{split:>{widths[split]}}" for split in splits)
        rows = [" " * 10 + f"[b]{header}[/]"]
        for name in names:
            label = "ppl" if name == "perplexity" else name
            values = " ".join(f"{cell(split, name):>{widths[split]}}" for split in splits)
            rows.append(f"{label[:9]:<10}{values}")
        return "\n".join(rows)
