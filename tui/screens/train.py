"""The training screen: the live run (loss curves, progress, speed, memory, metrics, log), start and stop."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Static

from engine.events import Event
from tui.form import effective_value
from tui.history import RunHistory
from tui.screens.base import MainScreen
from tui.screens.try_run import TryScreen
from tui.widgets.mode_bar import ModeBar
from tui.widgets.run_view import RunView
from tui.widgets.steady_footer import SteadyFooter


class TrainScreen(MainScreen):
    MODE = "train"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "app.stop_run", "Stop"),
        Binding("t", "try", "Try"),
    ]

    def compose(self) -> ComposeResult:
        yield ModeBar("train")
        yield Static("", id="train-empty")
        yield RunView(id="live-run")
        yield SteadyFooter()

    def on_mount(self) -> None:
        self.finetui.session.run_signal.subscribe(self, self.run_started)
        self.finetui.session.events_signal.subscribe(self, self.events_applied)
        self.show_current()

    def on_screen_resume(self) -> None:
        if self.finetui.session.history is None:
            self._show_empty()

    def show_current(self) -> None:
        history = self.finetui.session.history
        if history is None:
            self._show_empty()
        else:
            self.run_started(history)

    def _show_empty(self) -> None:
        data = self.finetui.setup_data
        name = effective_value(data, "name")
        kind = effective_value(data, "strategy.kind")
        model = effective_value(data, "model.id")
        empty = self.query_one("#train-empty", Static)
        empty.update(
            f"No run yet.\n\n[b]ctrl+r[/] starts [b]{name}[/]: {kind} on {model}; [b]ctrl+t[/] starts it in the "
            "background (it survives closing the app).\n"
            "F1 changes the setup, F2 shows what will train, F4 lists earlier runs."
        )
        empty.display = True
        self.query_one(RunView).display = False

    def run_started(self, history: RunHistory) -> None:
        self.query_one("#train-empty", Static).display = False
        view = self.query_one(RunView)
        view.display = True
        view.show(history)

    def action_try(self) -> None:
        """Try the run just finished (or stopped with a checkpoint) on the try screen."""
        history = self.finetui.session.history
        if history is None or history.run_dir is None or history.status not in ("finished", "stopped"):
            self.notify("no finished run to try yet (F4 lists earlier runs: t tries one)", severity="warning")
            return
        self.app.push_screen(TryScreen(Path(history.run_dir)))

    def events_applied(self, events: Sequence[Event]) -> None:
        history = self.finetui.session.history
        if history is not None:
            self.query_one(RunView).events_applied(history, events)
