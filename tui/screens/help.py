"""`?`: the keys of every screen, and what the screens are for (plain text: it opens at once, even mid-run)."""

from __future__ import annotations

import textwrap
from typing import ClassVar

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

SECTIONS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "anywhere",
        (
            ("F1 F2 F3 F4", "setup · freeze map · training · runs"),
            ("ctrl+r", "start a run of the current setup"),
            ("ctrl+t", "start it in the background: its own process, it survives closing the app"),
            ("ctrl+o / ctrl+s", "load a preset / save the setup as a preset TOML"),
            ("ctrl+p", "command palette: every action by name"),
            ("?", "this help (escape closes it)"),
            ("tab / shift+tab", "next / previous field"),
            ("ctrl+q", "quit (asks first while a run is active; a background run goes on)"),
        ),
    ),
    (
        "setup (F1)",
        (
            ("ctrl+b", "browse for the data file of the focused data field (or the train data)"),
            ("enter in train data", "read a hub dataset id for the preview"),
            ("", "invalid values show in red under their field, in the words of `finetui run`"),
        ),
    ),
    (
        "freeze map (F2)",
        (
            ("space", "toggle the highlighted group: the setup becomes the `custom` strategy"),
            ("a", "every group trainable (custom)"),
            ("f", "fold runs of alike blocks into one row (past 16 groups: folded), or unfold them"),
            ("shift+r", "compute the map again"),
            ("", "built from the config on the meta device (no weights): 70B maps in seconds"),
            ("", "totals and memory are those of `finetui inspect --json`"),
        ),
    ),
    (
        "training (F3)",
        (
            ("ctrl+r / ctrl+t", "start / start in the background"),
            ("s", "stop (asks; stops at the next step and saves a checkpoint)"),
            ("t", "try the run just finished: prompt it, see its answers beside the base model's"),
        ),
    ),
    (
        "runs (F4)",
        (
            ("enter", "open a run: curves and summary from its events.jsonl, followed while written"),
            ("space, then c", "mark runs, then overlay their loss curves"),
            ("space, then d", "mark two runs, then diff them: config, environment, data, metrics"),
            ("R (shift+r)", "resume a stopped, failed or interrupted run from its last checkpoint"),
            ("s", "stop a running run, whatever process trains it (asks first)"),
            ("a", "attach: follow a running run on the training screen (like `finetui attach`)"),
            ("t", "try a run (its model, or a stopped run's last checkpoint)"),
            ("e", "export a run: a merged folder plain transformers loads, checked first (`finetui export`)"),
            ("r", "refresh the list"),
            ("escape", "back from a run or a comparison"),
        ),
    ),
    (
        "try (t)",
        (
            ("enter", "answer the prompt, streamed (a classifier: its label probabilities)"),
            ("ctrl+b", "the base model's answer beside the fine-tuned one's, with tokens/s"),
            ("escape", "stop the answer being generated; again: back"),
        ),
    ),
)


KEY_WIDTH = 20
INDENT = " " * (2 + KEY_WIDTH + 1)


def help_text(width: int | None = None) -> str:
    """The help, its descriptions wrapped to `width` cells under their own column (a hanging indent)."""
    lines = [
        "[b $accent]finetui[/]  pick a model, data and a strategy (F1), see what trains and what it costs (F2), "
        "train and watch the loss (F3), compare runs (F4). Everything works from the keyboard."
    ]
    room = max(20, width - len(INDENT)) if width else None
    for title, keys in SECTIONS:
        lines.append("")
        lines.append(f"[b $accent]{title}[/]")
        for key, what in keys:
            wrapped = textwrap.wrap(what, room) if room else [what]
            text = ("\n" + INDENT).join(wrapped)
            lines.append(f"  [b]{key:<{KEY_WIDTH}}[/] {text}" if key else f"{INDENT}[dim]{text}[/]")
    return "\n".join(lines)


class HelpText(Static):
    def on_resize(self, event: events.Resize) -> None:
        self.update(help_text(event.size.width))


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "app.pop_screen", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield HelpText(help_text(), id="help-text")
