"""The export dialog of the runs screen (`e`): where to write the folder, then the export's stages as they pass.

The export itself is `engine.inference.export.export_run`, in a worker: it merges the adapter, writes the folder,
reloads it with plain transformers and checks its answers before publishing it (`finetui export`). Its progress
events reach the dialog coalesced; its result, or the one line saying why nothing was written, ends it.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.markup import escape
from textual.screen import ModalScreen
from textual.widgets import Input, Label, ProgressBar
from textual.worker import Worker, WorkerState

from engine.config import ConfigError
from engine.events import ExportProgress
from tui.heavy import load_engine
from tui.messages import ExportDone, ExportEvents
from tui.screens.base import one_line
from tui.sink import MessageSink

EXPORTS_DIR = Path("exports")


class ExportScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close")]

    def __init__(self, run_dir: Path) -> None:
        super().__init__(classes="dialog-screen")
        self.run_dir = run_dir
        self.running = False

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="export"):
            yield Label(
                f"Export {self.run_dir.name}: a folder plain transformers loads, checked against the run "
                "(enter starts, escape closes)",
                classes="dialog-question",
            )
            yield Input(value=str(EXPORTS_DIR / self.run_dir.name), id="export-out")
            yield ProgressBar(total=6, show_eta=False, id="export-progress")
            yield Label("", id="export-stage")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def action_close(self) -> None:
        if self.running:
            self.notify("the export is running: it ends with its check (a few seconds to minutes)", severity="warning")
            return
        self.dismiss(None)

    @on(Input.Submitted, "#export-out")
    def _submitted(self, event: Input.Submitted) -> None:
        if self.running or not event.value.strip():
            return
        self.running = True
        self.query_one(Input).disabled = True
        self.query_one("#export-stage", Label).update("starting…")
        self._export(Path(event.value.strip()).expanduser())

    @work(thread=True, exclusive=True, exit_on_error=False, group="export", name="export")
    def _export(self, out: Path) -> None:
        load_engine()
        from engine.inference.export import ExportMismatch, export_run

        try:
            result = export_run(self.run_dir, out, sink=MessageSink(self, 0, ExportEvents))
        except (ConfigError, ExportMismatch) as exc:
            self.post_message(ExportDone(None, str(exc)))
            return
        self.post_message(ExportDone(result))

    def on_export_events(self, message: ExportEvents) -> None:
        for event in message.sink.drain():
            if isinstance(event, ExportProgress):
                self.query_one(ProgressBar).update(progress=event.step - 1)
                self.query_one("#export-stage", Label).update(escape(f"[{event.step}/{event.steps}] {event.message}"))

    def on_export_done(self, message: ExportDone) -> None:
        self.running = False
        stage = self.query_one("#export-stage", Label)
        result = message.result
        if result is None:
            self._editable()
            stage.update(f"[b $error]{escape(message.error or '')}[/]")
            self.notify(message.error or "", title="export", severity="error", timeout=10)
            return
        self.query_one(ProgressBar).update(progress=6)
        stage.update(
            escape(
                f"exported to {result.out}: the same answers on {result.prompts} prompts, largest log-prob "
                f"difference {result.max_logprob_diff:.3g} (tolerance {result.tolerance:g}). escape closes."
            )
        )
        self.notify(f"{self.run_dir.name} exported to {result.out}", title="export")

    def _editable(self) -> None:
        """The folder can be changed and the export started again."""
        prompt = self.query_one(Input)
        prompt.disabled = False
        prompt.focus()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """A bug in the export: shown in one line, the dialog stays usable."""
        if event.state == WorkerState.ERROR:
            self.running = False
            self._editable()
            self.query_one("#export-stage", Label).update(f"[b $error]{escape(one_line(event.worker.error))}[/]")
