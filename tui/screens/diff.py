"""The diff screen: what differs between two runs marked on the runs screen, as `finetui diff` shows it."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Label, Static

from engine.config import ConfigError
from engine.run_diff import diff_lines, diff_runs
from tui.widgets.steady_footer import SteadyFooter


class DiffScreen(Screen[None]):
    """Config keys, environment, data files, final metrics and the loss gap of two runs (`engine.run_diff`)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "app.pop_screen", "Back")]

    def __init__(self, run_a: Path, run_b: Path) -> None:
        super().__init__()
        self.runs = (run_a, run_b)

    def compose(self) -> ComposeResult:
        yield Label(f"[b]diff[/]  A {self.runs[0].name}  B {self.runs[1].name}  [dim]escape: back[/]", id="diff-title")
        with VerticalScroll(id="diff-scroll"):
            yield Static("", id="diff-body")
        yield SteadyFooter()

    def on_mount(self) -> None:
        try:
            text = "\n".join(diff_lines(diff_runs(*self.runs))[2:])  # the title names both runs
        except ConfigError as exc:
            text = str(exc)
        self.query_one("#diff-body", Static).update(Text(text))
