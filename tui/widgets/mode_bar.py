"""The top line of every main screen: the four screens with their keys, and the state of the current run."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label

MODES: tuple[tuple[str, str, str], ...] = (
    ("setup", "F1", "Setup"),
    ("freeze", "F2", "Freeze map"),
    ("train", "F3", "Train"),
    ("runs", "F4", "Runs"),
)


class ModeBar(Horizontal):
    """`finetui  F1 Setup  F2 Freeze map  F3 Train  F4 Runs        ● training 12/40`."""

    def __init__(self, current: str) -> None:
        super().__init__(id="mode-bar")
        self.current = current

    def compose(self) -> ComposeResult:
        yield Label("finetui", id="app-name")
        for mode, key, title in MODES:
            classes = "mode-tab -current" if mode == self.current else "mode-tab"
            yield Label(f"[b]{key}[/] {title}", classes=classes, id=f"tab-{mode}")
        yield Label("", id="run-banner")

    def on_mount(self) -> None:
        self.watch(self.app, "run_banner", self._show_banner)

    def _show_banner(self, banner: str) -> None:
        self.query_one("#run-banner", Label).update(banner, layout=False)

    def on_click(self, event) -> None:  # type: ignore[no-untyped-def]
        widget = event.widget
        if widget is not None and widget.id and widget.id.startswith("tab-"):
            self.app.switch_mode(widget.id.removeprefix("tab-"))
