"""The try screen: a prompt box, the fine-tuned model's answer streamed in, the base model's answer beside it.

Opened on the run just finished (`t` on the training screen) or on any run of the runs screen (`t`). The run loads
in a worker (escape cancels: the screen closes and whatever loads is dropped); answers are generated in another
worker (escape stops them at the next token) whose events reach the screen coalesced, one message per frame, so
keys stay answered while a model generates. A classifier shows a bar per label instead of text. The engine is
called from those workers only (`engine.inference.loading.load_run`, `engine.inference.predict`).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import Input, Label, Static
from textual.worker import Worker, WorkerState, get_current_worker

from engine.config import ConfigError
from engine.events import GenerationDone, TokensGenerated
from engine.sampling import GenerationSettings
from engine.views import STOP_REASONS, label_bars
from tui.heavy import load_engine
from tui.messages import AnswerEvents, LabelsAnswered, TryLoaded
from tui.screens.base import one_line
from tui.sink import MessageSink
from tui.widgets.steady_footer import SteadyFooter

FINE_TUNED, BASE = "fine-tuned", "base"
SETTINGS = GenerationSettings(max_new_tokens=256)


class TryScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back / stop"),
        Binding("ctrl+b", "compare", "Base beside"),
    ]

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.loaded: Any = None
        """The run's `LoadedRun`, once the worker has loaded it."""
        self.compare = False
        self.answering = False
        self.stop = threading.Event()
        self.texts = {FINE_TUNED: "", BASE: ""}
        """Each pane's answer so far."""
        self.asked: list[str] = []
        """The panes the last prompt went to."""

    def compose(self) -> ComposeResult:
        yield Label(f"[b]try[/] {self.run_dir.name}  [dim]escape: back[/]", id="try-title")
        yield Label("loading the model…  (escape cancels)", id="try-status", classes="dim")
        yield Label("", id="try-asked")
        with Horizontal(id="try-answers"):
            for name in (FINE_TUNED, BASE):
                with Vertical(classes="try-pane", id=f"pane-{name}"):
                    yield Label(name, classes="pane-title", id=f"title-{name}")
                    with VerticalScroll(classes="pane-scroll"):
                        yield Static("", classes="pane-text", id=f"text-{name}", markup=False)
        yield Input(placeholder="loading…", id="try-prompt")
        yield SteadyFooter()

    def on_mount(self) -> None:
        self.query_one(f"#pane-{BASE}").display = False
        self.query_one(Input).focus()
        self._load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="try-load", name="load the run")
    def _load(self) -> None:
        load_engine()
        from engine.inference.loading import load_run

        try:
            loaded = load_run(self.run_dir)
        except ConfigError as exc:
            self.post_message(TryLoaded(None, str(exc)))
            return
        if not get_current_worker().is_cancelled:
            self.post_message(TryLoaded(loaded))

    def on_try_loaded(self, message: TryLoaded) -> None:
        status = self.query_one("#try-status", Label)
        if message.loaded is None:
            status.update(f"[b $error]{escape(message.error or '')}[/]")
            return
        self.loaded = loaded = message.loaded
        config = loaded.config
        limit = f"greedy, at most {SETTINGS.max_new_tokens} tokens"
        what = "label probabilities" if loaded.task == "classification" else limit
        notes = "".join(f"\n{note}" for note in loaded.notes)
        source = f"from {loaded.source.name}/"
        status.update(escape(f"{config.strategy.kind} on {config.model.id} · {what} · {source}{notes}"))
        if loaded.task == "classification" and self.compare:  # ctrl+b pressed while it loaded: nothing to compare
            self.compare = False
            self.query_one(f"#pane-{BASE}").display = False
        prompt = self.query_one(Input)
        prompt.placeholder = (
            "a text: enter shows its label probabilities"
            if loaded.task == "classification"
            else "a prompt: enter answers it (ctrl+b: the base model beside)"
        )

    def action_back(self) -> None:
        if self.answering:
            self.stop.set()
            self.notify("stopping the answer at its next token")
            return
        for worker in self.workers:
            worker.cancel()  # a load still running is dropped when it returns
        self.app.pop_screen()

    def action_compare(self) -> None:
        if self.loaded is not None and self.loaded.task != "causal":
            self.notify("a classifier's base model has no trained head: nothing to compare", severity="warning")
            return
        self.compare = not self.compare
        self.query_one(f"#pane-{BASE}").display = self.compare

    @on(Input.Submitted, "#try-prompt")
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if self.loaded is None:
            self.notify("the run is still loading", severity="warning")
        elif self.answering:
            self.notify("an answer is being generated: escape stops it", severity="warning")
        elif not text:
            self.notify("type a prompt first", severity="warning")
        else:
            self._ask(text)

    def _ask(self, text: str) -> None:
        self.answering = True
        self.stop.clear()
        self.query_one(Input).value = ""
        self.query_one("#try-asked", Label).update(Text.assemble(("> ", "bold"), text.replace("\n", " ")))
        self.asked = [FINE_TUNED, BASE] if self.compare else [FINE_TUNED]
        for name in (FINE_TUNED, BASE):
            self.texts[name] = ""
            self.query_one(f"#text-{name}", Static).update("")
            self.query_one(f"#title-{name}", Label).update(f"{name} · waiting…" if name in self.asked else name)
        if self.loaded.task == "classification":
            self._labels(text)
        else:
            self._answer(text, self.asked)

    @work(thread=True, exclusive=True, exit_on_error=False, group="try-answer", name="answer")
    def _answer(self, text: str, names: list[str]) -> None:
        from engine.inference.predict import answer, request_rows

        rows = request_rows(self.loaded, prompt=text)
        sink = MessageSink(self, 0, AnswerEvents)
        for name in names:
            if not self.stop.is_set():
                answer(self.loaded, rows, SETTINGS, base=name == BASE, sink=sink, stop=self.stop)

    @work(thread=True, exclusive=True, exit_on_error=False, group="try-answer", name="label probabilities")
    def _labels(self, text: str) -> None:
        from engine.inference.predict import label_probabilities

        (reply,) = label_probabilities(self.loaded, [text])
        self.post_message(LabelsAnswered(reply.probabilities))

    def on_answer_events(self, message: AnswerEvents) -> None:
        for event in message.sink.drain():
            if not isinstance(event, TokensGenerated | GenerationDone):
                continue
            title = f"{event.model} · {event.tokens} tok · {event.tokens_per_second:.1f} tok/s"
            self.query_one(f"#title-{event.model}", Label).update(title)
            shown = Text(self.texts[event.model] + event.text if isinstance(event, TokensGenerated) else event.text)
            self.texts[event.model] = shown.plain
            if isinstance(event, GenerationDone):
                shown.append(f"\n({STOP_REASONS[event.stop_reason]})", style="dim")
            self.query_one(f"#text-{event.model}", Static).update(shown)

    def on_labels_answered(self, message: LabelsAnswered) -> None:
        self.query_one(f"#title-{FINE_TUNED}", Label).update(f"{FINE_TUNED} · label probabilities")
        self.texts[FINE_TUNED] = label_bars(message.probabilities, width=30)
        self.query_one(f"#text-{FINE_TUNED}", Static).update(self.texts[FINE_TUNED])

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """An answer is over (done, stopped or failed); a failure is shown in one line, never fatal."""
        if event.state not in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
            return
        if event.worker.group == "try-answer":
            self.answering = False
            for name in self.asked:
                if self.texts[name] == "":  # stopped (or failed) before its first token
                    self.query_one(f"#title-{name}", Label).update(f"{name} · no answer")
        if event.state == WorkerState.ERROR:
            error = one_line(event.worker.error)
            if event.worker.group == "try-load":
                self.query_one("#try-status", Label).update(f"[b $error]{escape(error)}[/]")
            self.notify(error, title=event.worker.name or "error", severity="error", timeout=8)
