"""What every main screen shares: the mode bar on top, the footer below, and one handler for failed workers."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual import events
from textual.screen import Screen
from textual.widgets import Input
from textual.worker import Worker, WorkerState

from tui.messages import SetupChanged

if TYPE_CHECKING:
    from tui.app import FinetuiApp


def one_line(error: BaseException | None) -> str:
    """An exception as one line for people: engine ConfigErrors are already worded that way."""
    from engine.config import ConfigError

    if error is None:
        return "unknown error"
    if isinstance(error, ConfigError):
        return str(error)
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class MainScreen(Screen[None]):
    """Base of the four mode screens."""

    MODE = ""
    _styled_theme: str | None = None

    @property
    def finetui(self) -> FinetuiApp:
        return cast("FinetuiApp", self.app)

    def _on_screen_resume(self, event: events.ScreenResume) -> None:
        """Skip Textual's restyle of every widget when a screen comes back, unless the theme changed meanwhile.

        Runs before `Screen._on_screen_resume`. The restyle costs ~60 ms for the setup form, two or three times
        that while a run keeps every core busy: the difference between a key answered at once and one answered
        late. Nothing else restyles a screen behind the user's back here.
        """
        theme = self.app.theme
        if event.refresh_styles and self._styled_theme == theme:
            event.refresh_styles = False
        self._styled_theme = theme

    def on_mount(self) -> None:
        if not self.finetui.cursor_blink:
            for widget in self.query(Input):
                widget.cursor_blink = False
        self.call_after_refresh(self.finetui.screen_painted)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The one place where a worker's unexpected exception ends up: shown, never fatal."""
        if event.state == WorkerState.ERROR:
            message = one_line(event.worker.error)
            self.worker_failed(event.worker, message)

    def worker_failed(self, worker: Worker, message: str) -> None:
        self.notify(message, title=worker.name or "error", severity="error", timeout=8)


class SetupScreenBase(MainScreen):
    """A screen that shows the app's setup: a change made elsewhere (another screen, a loaded preset) is shown at
    once when the screen is current, else when it next becomes current."""

    stale = True
    """The setup changed since the screen last showed it."""

    def on_mount(self) -> None:
        self.finetui.setup_signal.subscribe(self, self._setup_changed)

    def _setup_changed(self, change: SetupChanged) -> None:
        if change.origin is self:
            return
        if self.is_current:
            self.show_setup()
        else:
            self.stale = True

    def on_screen_resume(self) -> None:
        if self.stale:
            self.show_setup()

    def show_setup(self) -> None:
        """Show the app's setup (and set `stale` to False)."""
        raise NotImplementedError
