"""Textual's footer, rebuilt only when the keys it shows change.

The stock `Footer` recomposes (a new widget per key, each styled and rendered) whenever its screen's bindings are
signalled, which includes every switch back to the screen: ~25 ms of the UI thread per switch at 120 columns,
taken from a run that trains meanwhile. The keys a screen shows rarely change, so this footer compares them first.
"""

from __future__ import annotations

from collections.abc import Hashable

from textual.screen import Screen
from textual.widgets import Footer


class SteadyFooter(Footer):
    def __init__(self) -> None:
        super().__init__(compact=True)
        self._shown: Hashable = None

    def bindings_changed(self, screen: Screen) -> None:
        shown = tuple(
            (binding.key, binding.action, binding.description, enabled, tooltip)
            for _, binding, enabled, tooltip in screen.active_bindings.values()
            if binding.show
        )
        if shown == self._shown:
            return
        super().bindings_changed(screen)
        if screen.app.app_focus and self.is_attached and screen is self.screen:  # it recomposes
            self._shown = shown
