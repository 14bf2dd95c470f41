"""The terminal alert of the TUI: bell and desktop notification (OSC 9 / OSC 777) when its run ends."""

from __future__ import annotations

from textual.app import App

from engine.notify import end_message, terminal_alert
from engine.runs import TERMINAL_STATUSES
from tui.history import RunHistory


def ring(app: App, message: str) -> None:
    """Write the alert through the app's driver, between its frames (as `App.bell` does); nothing when headless."""
    driver = app._driver
    if not app.is_headless and driver is not None:
        driver.write(terminal_alert(message))


def announce_end(app: App, history: RunHistory) -> None:
    """Ring for a run that ended (finished, stopped, failed), with its name and result or error."""
    if history.status in TERMINAL_STATUSES:
        summary = {
            "run_dir": history.run_dir or history.label,
            "status": history.status,
            "error": history.error,
            "validation": history.latest_metrics(),
        }
        ring(app, end_message(summary))
