"""Textual's footer, rebuilt only when the keys it shows change, showing only the keys that fit whole.

The stock `Footer` recomposes (a new widget per key, each styled and rendered) whenever its screen's bindings are
signalled, which includes every switch back to the screen: ~25 ms of the UI thread per switch at 120 columns,
taken from a run that trains meanwhile. The keys a screen shows rarely change, so this footer compares them first.

On a narrow terminal the stock footer cuts the last key that fits mid-word (`^t Bac`) and lets the ones after it
show through beside the palette key (a stray letter at the last column). This one leaves out the keys, from the
end (the app-wide ones: `?` lists them all), that would not fit whole.
"""

from __future__ import annotations

from collections.abc import Hashable

from rich.cells import cell_len
from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer
from textual.widgets._footer import FooterKey


def key_width(key_display: str, description: str) -> int:
    """Cells a key takes in the compact footer: `^r Start` and the one-cell gap after it."""
    return cell_len(f"{key_display} {description}" if description else key_display) + 1


class SteadyFooter(Footer):
    def __init__(self) -> None:
        super().__init__(compact=True)
        self._shown: Hashable = None

    def compose(self) -> ComposeResult:
        room = self.size.width - self._palette_width()
        for widget in super().compose():
            if isinstance(widget, FooterKey) and not widget.has_class("-command-palette") and self.size.width:
                room -= key_width(widget.key_display, widget.description)
                if room < 0:
                    continue
            yield widget

    def _palette_width(self) -> int:
        """The palette key's cells, the border on its left included."""
        found = self.screen.active_bindings.get(self.app.COMMAND_PALETTE_BINDING)
        if found is None or not (self.show_command_palette and self.app.ENABLE_COMMAND_PALETTE):
            return 0
        binding = found[1]
        return key_width(self.app.get_key_display(binding), binding.description)

    def bindings_changed(self, screen: Screen) -> None:
        shown = (
            self.size.width,
            tuple(
                (binding.key, binding.action, binding.description, enabled, tooltip)
                for _, binding, enabled, tooltip in screen.active_bindings.values()
                if binding.show
            ),
        )
        if shown == self._shown:
            return
        super().bindings_changed(screen)
        if screen.app.app_focus and self.is_attached and screen is self.screen:  # it recomposes
            self._shown = shown

    def on_resize(self) -> None:
        if self.is_attached and self.screen.is_current:
            self.bindings_changed(self.screen)
