"""The runs screen: every run directory under the output folder; open one, or overlay several on one chart.

Runs are read back from their folders (`engine.runs.list_runs`, `EventFollower`), never from memory, so a
run started by `finetui run` in another shell, or by an app whose SSH session dropped, shows the same way,
and one still being written is followed as it grows (and again when it is resumed). A run that another
process trains can be stopped from here (`engine.launch.follow.request_stop`) or followed on the training screen;
any run with a model or a checkpoint can be tried (`tui.screens.try_run`) or exported (`tui.screens.export`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

from rich.cells import cell_len, set_cell_size
from rich.markup import escape
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Label, Static

from engine.runs import TERMINAL_STATUSES, EventFollower, RunInfo, list_runs, read_summary, run_status
from engine.views import format_duration, one_line
from tui.form import display_path, effective_value
from tui.history import RunHistory, best_metric
from tui.messages import RunsListed
from tui.screens.base import MainScreen
from tui.screens.diff import DiffScreen
from tui.screens.export import ExportScreen
from tui.screens.try_run import TryScreen
from tui.widgets.mode_bar import ModeBar
from tui.widgets.run_view import LossChart, RunView, series_of
from tui.widgets.steady_footer import SteadyFooter

if TYPE_CHECKING:
    from tui.app import FinetuiApp

REFRESH_S = 3.0
FOLLOW_S = 0.5
RUN_COLUMNS = (
    ("", "mark"),
    ("run", "run"),
    ("status", "status"),
    ("strategy", "strategy"),
    ("model", "model"),
    ("best", "best"),
    ("est/peak", "memory"),
    ("started", "started"),
)
COMPARE_COLUMNS = ("run", "strategy", "status", "steps", "best", "samples/s", "time")
MIN_SHRUNK = 12
METRIC_SHORT = {"accuracy": "acc", "perplexity": "ppl"}


def memory_ratio_text(summary: dict[str, Any] | None) -> str:
    """The memory estimate over the measured peak (`summary.json` `memory`), e.g. 0.97x."""
    ratio = ((summary or {}).get("memory") or {}).get("ratio")
    return f"{ratio:.2f}x" if ratio else ""


def best_text(summary: dict[str, Any] | None) -> str:
    best = best_metric(summary)
    return f"{METRIC_SHORT.get(best[0], best[0])} {best[1]:.4f}" if best else ""


def ellipsize(text: str, width: int) -> str:
    """`text` cut in the middle to `width` cells: a run's name keeps its start and its timestamp."""
    if cell_len(text) <= width:
        return text
    tail = (width - 1) // 2
    return set_cell_size(text, width - 1 - tail) + "…" + text[len(text) - tail :]


def fit_table(
    table: DataTable,
    columns: Sequence[tuple[str, str]],
    rows: Sequence[tuple[str, Sequence[str]]],
    *,
    optional: Sequence[str] = (),
    shrink: Sequence[str] = (),
    spare: Sequence[str] = (),
) -> None:
    """Fill `table` with `columns` ((label, key) pairs) and `rows` ((key, cells) pairs) so that it fits its width
    without scrolling sideways: the `optional` columns are left out first, then the `shrink` columns' cells are cut
    in the middle (down to `MIN_SHRUNK` cells), and the `spare` columns are left out only where that is not enough.
    At 80 columns the runs table showed its last header as `s`."""
    keys = [key for _, key in columns]
    widths = {
        key: max([cell_len(label)] + [cell_len(cells[index]) for _, cells in rows])
        for index, (label, key) in enumerate(columns)
    }
    room = table.size.width - table.styles.scrollbar_size_vertical
    excess = sum(width + 2 for width in widths.values()) - room if table.size.width else 0  # 2: cell padding
    for key in optional:
        if excess > 0:
            excess -= widths.pop(key) + 2
    for key in spare:
        if excess > sum(max(0, widths[name] - MIN_SHRUNK) for name in shrink):
            excess -= widths.pop(key) + 2
    for key in shrink:
        cut = max(0, min(excess, widths[key] - MIN_SHRUNK))
        widths[key] -= cut
        excess -= cut
    table.clear(columns=True)
    for label, key in columns:
        if key in widths:
            table.add_column(label, key=key)
    for row_key, cells in rows:
        shown = [ellipsize(cell, widths[key]) for cell, key in zip(cells, keys, strict=True) if key in widths]
        table.add_row(*shown, key=row_key)


class RunsScreen(MainScreen):
    MODE = "runs"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "open", "Open", show=True),
        Binding("space", "mark", "Mark"),
        Binding("c", "compare", "Compare"),
        Binding("d", "diff", "Diff"),
        Binding("R", "resume", "Resume"),
        Binding("s", "stop", "Stop"),
        Binding("a", "attach", "Attach"),
        Binding("t", "try", "Try"),
        Binding("e", "export", "Export", show=False),  # in the help; the footer keeps ? Help at 80 columns
        Binding("r", "refresh", "Refresh", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[RunInfo] = []
        self.marked: set[Path] = set()

    def compose(self) -> ComposeResult:
        yield ModeBar("runs")
        yield Label("", id="runs-folder", classes="dim")
        yield DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        yield SteadyFooter()

    def on_mount(self) -> None:
        table = self.query_one("#runs-table", DataTable)
        for label, key in RUN_COLUMNS:
            table.add_column(label, key=key)
        table.focus()
        self.set_interval(REFRESH_S, self._refresh_if_shown)

    @property
    def folder(self) -> Path:
        return self.finetui.runs_dir or Path(str(effective_value(self.finetui.setup_data, "train.output_dir")))

    def on_screen_resume(self) -> None:
        self.action_refresh()

    def _refresh_if_shown(self) -> None:
        if self.is_current:
            self.action_refresh()

    def action_refresh(self) -> None:
        self._list(self.folder)

    @work(thread=True, exclusive=True, exit_on_error=False, group="runs", name="list runs")
    def _list(self, folder: Path) -> None:
        self.post_message(RunsListed(folder, list_runs(folder)))

    def on_runs_listed(self, message: RunsListed) -> None:
        self.runs = message.runs
        self.query_one("#runs-folder", Label).update(
            f"{len(self.runs)} runs in {display_path(str(message.folder))}/ · enter opens · space marks · "
            "c overlays marked · d diffs two"
        )
        self._show_runs()

    def _show_runs(self) -> None:
        """The runs in the table; where it is too narrow, without `started` (the run's name ends with its start
        time) and with names cut in the middle, then without the memory ratio."""
        session = self.finetui.session
        table = self.query_one("#runs-table", DataTable)
        keep = table.cursor_row
        rows = [
            (
                str(run.path),
                [
                    "✓" if run.path in self.marked else "",
                    run.path.name,
                    "stopping…" if run.status == "running" and session.stopping_other(run.path) else run.status,
                    run.strategy,
                    run.model.removeprefix("builtin:"),
                    best_text(run.summary),
                    memory_ratio_text(run.summary),
                    time.strftime("%m-%d %H:%M", time.localtime(run.started)),
                ],
            )
            for run in self.runs
        ]
        fit_table(table, RUN_COLUMNS, rows, optional=("started",), shrink=("model", "run"), spare=("memory",))
        if self.runs:
            table.move_cursor(row=min(keep, len(self.runs) - 1), animate=False)

    def on_resize(self) -> None:
        self._show_runs()

    def _current(self) -> RunInfo | None:
        table = self.query_one("#runs-table", DataTable)
        if not self.runs or not table.row_count:
            return None
        return self.runs[min(table.cursor_row, len(self.runs) - 1)]

    def action_open(self) -> None:
        run = self._current()
        if run is not None:
            self.app.push_screen(RunDetailScreen(run.path))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_resume(self) -> None:
        run = self._current()
        if run is None:
            return
        if run.status == "finished":
            self.notify(f"{run.path.name} finished: nothing to resume", severity="warning")
            return
        self.finetui.resume_run(run.path)

    def action_stop(self) -> None:
        run = self._current()
        if run is not None:
            self.finetui.stop_run_dir(run.path)

    def action_attach(self) -> None:
        run = self._current()
        if run is not None:
            self.finetui.attach_run(run.path)

    def action_try(self) -> None:
        run = self._current()
        if run is not None:
            self.app.push_screen(TryScreen(run.path))

    def action_export(self) -> None:
        run = self._current()
        if run is not None:
            self.app.push_screen(ExportScreen(run.path))

    def action_mark(self) -> None:
        run = self._current()
        if run is None:
            return
        self.marked ^= {run.path}
        table = self.query_one("#runs-table", DataTable)
        table.update_cell(str(run.path), "mark", "✓" if run.path in self.marked else "")

    def action_diff(self) -> None:
        paths = [run.path for run in self.runs if run.path in self.marked]
        if len(paths) != 2:
            self.notify("mark exactly two runs with space, then press d", severity="warning")
            return
        self.app.push_screen(DiffScreen(paths[0], paths[1]))

    def action_compare(self) -> None:
        paths = [run.path for run in self.runs if run.path in self.marked]
        if len(paths) < 2:
            self.notify("mark two or more runs with space, then press c", severity="warning")
            return
        self.app.push_screen(CompareScreen(paths))


class FollowedRun:
    """A run directory read incrementally into a RunHistory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.follower = EventFollower(path)
        self.history = RunHistory(run_dir=str(path), status="running")

    def poll(self) -> list[Any]:
        """The events written since the last poll, applied. Without new events, a run that ended without its
        final event (a summary says so, or its process died: `interrupted`) gets that status."""
        events = self.follower.poll()
        for event in events:
            self.history.apply(event)
        if self.history.status not in TERMINAL_STATUSES and not events:
            summary = read_summary(self.path)
            status = run_status(self.path, summary)
            if status in TERMINAL_STATUSES:
                self.history.status = status
                self.history.summary = self.history.summary or summary
            elif status == "interrupted" or self.history.status == "interrupted":
                self.history.status = status
        return events


class RunDetailScreen(Screen[None]):
    """One run rebuilt from its events.jsonl, followed while it is written: as long as the screen is open, since
    an ended run may be resumed (a new `run_started`) by another process."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q", "app.pop_screen", "Back"),
        Binding("s", "stop", "Stop"),
        Binding("a", "attach", "Attach"),
        Binding("g", "samples", "Samples"),
        Binding("t", "try", "Try"),
    ]

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.run = FollowedRun(path)

    def compose(self) -> ComposeResult:
        yield Label(f"[b]run[/] {self.run.path.name}  [dim]escape: back to the runs[/]", id="detail-title")
        yield RunView(id="detail-run")
        yield SteadyFooter()

    @property
    def finetui(self) -> FinetuiApp:
        return cast("FinetuiApp", self.app)

    def on_mount(self) -> None:
        self.run.poll()
        self._note_stop_request()
        self.query_one(RunView).show(self.run.history)
        self.set_interval(FOLLOW_S, self._follow)

    def _follow(self) -> None:
        history = self.run.history
        before = (history.status, history.stop_requested)
        events = self.run.poll()
        self._note_stop_request()
        if events or (history.status, history.stop_requested) != before:
            self.query_one(RunView).events_applied(history, events)

    def _note_stop_request(self) -> None:
        history = self.run.history
        if history.active:
            history.stop_requested = self.finetui.session.stopping_other(self.run.path)

    def action_stop(self) -> None:
        self.finetui.stop_run_dir(self.run.path)

    def action_attach(self) -> None:
        self.app.pop_screen()
        self.finetui.attach_run(self.run.path)

    def action_samples(self) -> None:
        if not self.run.history.samples:
            self.notify("this run has no sample answers (train.sample_prompts)", severity="warning")
            return
        self.app.push_screen(SamplesScreen(self.run.history))

    def action_try(self) -> None:
        self.app.push_screen(TryScreen(self.run.path))


def samples_by_prompt(history: RunHistory, width: int = 76) -> str:
    """Each sample prompt, then its answer at each evaluation, step by step: how the answers changed."""
    prompts: dict[int, str] = {}
    answers: dict[int, list[tuple[int, str]]] = {}
    for sample in history.samples:
        prompts.setdefault(sample.index, sample.prompt)
        answers.setdefault(sample.index, []).append((sample.step, sample.output))
    lines = []
    for index, prompt in sorted(prompts.items()):
        lines.append(f"[b]{escape(one_line(prompt, width))}[/]")
        steps = answers[index]
        column = len(str(steps[-1][0]))
        for step, output in steps:
            lines.append(
                f"  [dim]step {step:>{column}}[/]  {escape(one_line(output or '(nothing)', width - column - 9))}"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


class SamplesScreen(Screen[None]):
    """A run's answers to its sample prompts at every evaluation, prompt by prompt."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "app.pop_screen", "Back")]

    def __init__(self, history: RunHistory) -> None:
        super().__init__()
        self.history = history

    def compose(self) -> ComposeResult:
        yield Label(f"[b]samples[/] {self.history.label}  [dim]escape: back to the run[/]", id="samples-title")
        with VerticalScroll(id="samples-scroll"):
            yield Static(samples_by_prompt(self.history, max(30, self.app.size.width - 6)), id="samples-text")
        yield SteadyFooter()


class CompareScreen(Screen[None]):
    """Several runs' train loss on one chart, with a line of numbers per run."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "app.pop_screen", "Back")]

    def __init__(self, paths: list[Path]) -> None:
        super().__init__()
        self.followed = [FollowedRun(path) for path in paths]

    def compose(self) -> ComposeResult:
        yield Label("[b]compare[/]  train loss of the marked runs  [dim]escape: back[/]", id="compare-title")
        yield LossChart(id="compare-chart")
        yield DataTable(id="compare-table", cursor_type="row")
        yield SteadyFooter()

    def on_mount(self) -> None:
        self._follow()
        self.set_interval(FOLLOW_S * 2, self._follow)

    def _follow(self) -> None:
        changed = [bool(run.poll()) for run in self.followed]
        if self.query_one("#compare-table", DataTable).row_count and not any(changed):
            return
        self.query_one(LossChart).plot([series_of(run.history) for run in self.followed], overlay=True)
        self._show_numbers()

    def _show_numbers(self) -> None:
        rows = []
        for index, run in enumerate(self.followed):
            history = run.history
            summary = history.summary or {}
            speed = summary.get("train_samples_per_second")
            if speed is None and history.position is not None:
                speed = history.position.samples_per_second
            cells = [
                history.label,
                history.strategy,
                history.status,
                str(history.steps[-1] if history.steps else 0),
                best_text(history.summary) or ("" if history.status == "finished" else f"({history.status})"),
                f"{speed:.1f}" if speed else "",
                format_duration(summary.get("train_runtime_s") or history.elapsed()),
            ]
            rows.append((str(index), cells))
        table = self.query_one("#compare-table", DataTable)
        fit_table(table, [(label, label) for label in COMPARE_COLUMNS], rows, optional=("status",), shrink=("run",))

    def on_resize(self) -> None:
        self._show_numbers()
