"""The finetui app: four screens (setup, freeze map, training, runs) around one setup and one live run.

The app owns the state the screens share: the current setup (a raw preset dict, validated with the engine's
pydantic models) and the live run, which trains in a thread worker (`engine.trainer.run_training`) with a sink
that posts coalesced messages (`tui.sink`). Torch, transformers and datasets are imported only inside
workers, so the first screen paints before any of them loads.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.signal import Signal
from textual.worker import Worker, WorkerState

from engine.config import ConfigError, build_config, field_errors
from engine.events import Log, Step
from tui.form import relativize_paths
from tui.heavy import load_engine
from tui.history import RunHistory
from tui.presets import default_preset_path, load_preset, preset_files, save_preset
from tui.screens.base import MainScreen, one_line
from tui.screens.dialogs import ConfirmScreen, PresetPickerScreen, SavePresetScreen
from tui.screens.setup import SetupScreen
from tui.sink import EngineEvents, MessageSink

BANNER_INTERVAL_S = 0.5
HEAVY_MODULES = ("torch", "transformers", "peft", "datasets")


def _screen(module: str, name: str) -> Screen:
    """A mode's screen, its module imported when first shown (the first paint needs only the setup screen)."""
    return getattr(importlib.import_module(f"tui.screens.{module}"), name)()


class RunEnded(Message):
    """`run_training` returned (the sink has already delivered the run's last event)."""

    def __init__(self, run_id: int, status: str) -> None:
        super().__init__()
        self.run_id, self.status = run_id, status


class FinetuiApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "finetui"
    MODES: ClassVar[dict[str, Any]] = {
        "setup": SetupScreen,
        "freeze": lambda: _screen("freeze_map", "FreezeMapScreen"),
        "train": lambda: _screen("train", "TrainScreen"),
        "runs": lambda: _screen("runs", "RunsScreen"),
    }
    DEFAULT_MODE = "setup"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f1", "switch_mode('setup')", "Setup", show=False),
        Binding("f2", "switch_mode('freeze')", "Map", show=False),
        Binding("f3", "switch_mode('train')", "Train", show=False),
        Binding("f4", "switch_mode('runs')", "Runs", show=False),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("ctrl+r", "start_run", "Start"),
        Binding("ctrl+o", "load_preset", "Load"),
        Binding("ctrl+s", "save_preset", "Save"),
        Binding("ctrl+q", "quit", "Quit", priority=True, show=False),
    ]

    run_banner: reactive[str] = reactive("")

    def __init__(
        self,
        preset: Path | None = None,
        *,
        setup: dict[str, Any] | None = None,
        runs_dir: Path | None = None,
        cursor_blink: bool = True,
    ) -> None:
        super().__init__()
        self.cursor_blink = cursor_blink
        self.preset_path = preset
        self.setup_data: dict[str, Any] = relativize_paths(setup) if setup is not None else {}
        if preset is not None and setup is None:
            self.setup_data = load_preset(preset)
        self.setup_version = 0
        self.runs_dir = runs_dir
        self.history: RunHistory | None = None
        self.run_signal: Signal[RunHistory] = Signal(self, "run")
        self.events_signal: Signal[list[Any]] = Signal(self, "events")
        self._run_id = 0
        self._stop_event: threading.Event | None = None
        self._quit_after_run = False
        self._banner_dirty = False
        self.first_paint: tuple[float, list[str]] | None = None
        """Seconds from process start to the first painted screen, and the heavy modules loaded by then."""

    def on_mount(self) -> None:
        self.sub_title = self.preset_path.stem if self.preset_path else "new setup"
        self.set_interval(BANNER_INTERVAL_S, self._refresh_banner)

    def screen_painted(self) -> None:
        """The first screen is on the terminal: note when, then load the heavy engine in the background."""
        if self.first_paint is not None:
            return
        import psutil

        seconds = time.time() - psutil.Process().create_time()
        heavy = sorted(name for name in HEAVY_MODULES if name in sys.modules)
        self.first_paint = (seconds, heavy)
        self.log.info(f"first paint after {seconds:.2f}s (heavy modules loaded: {heavy or 'none'})")
        self._warm_up()

    @work(thread=True, exclusive=True, exit_on_error=False, group="warm-up", name="load engine")
    def _warm_up(self) -> None:
        load_engine()

    def on_unmount(self) -> None:
        """The app is closing: an active run stops at its next step (the worker thread cannot be killed)."""
        if self._stop_event is not None:
            self._stop_event.set()

    def _refresh_banner(self) -> None:
        if self._banner_dirty:
            self._set_banner()

    # the shared setup

    def update_setup(self, data: dict[str, Any]) -> None:
        self.setup_data = data
        self.setup_version += 1

    def replace_setup(self, data: dict[str, Any], source: Path | None = None) -> None:
        """A new setup (a loaded preset): every screen shows it, the current one at once."""
        self.update_setup(data)
        if source is not None:
            self.preset_path = source
            self.sub_title = source.stem
        screen = self.screen
        if isinstance(screen, MainScreen) and hasattr(screen, "setup_replaced"):
            screen.setup_replaced()

    def action_load_preset(self) -> None:
        def chosen(path: Path | None) -> None:
            if path is None:
                return
            try:
                data = load_preset(path)
            except ConfigError as exc:
                self.notify(str(exc), title="preset", severity="error")
                return
            self.replace_setup(data, path)
            errors = field_errors(data)
            problems = f" ({len(errors)} field problems, shown on F1)" if errors else ""
            self.notify(f"loaded {path.stem}{problems}", title="preset")

        self.push_screen(PresetPickerScreen(preset_files()), chosen)

    def action_save_preset(self) -> None:
        errors = field_errors(self.setup_data)
        if errors:
            self.notify(f"fix the setup first: {next(iter(errors.values()))}", title="save", severity="error")
            return

        def write(path: Path, overwrite: bool) -> None:
            try:
                saved = save_preset(self.setup_data, path, overwrite=overwrite)
            except FileExistsError:
                self.notify(f"{path} exists (nothing written)", severity="error")
            except OSError as exc:
                self.notify(f"{path}: {exc.strerror or exc}", title="save", severity="error")
            else:
                self.notify(f"saved {saved}", title="preset")

        def chosen(path: Path | None) -> None:
            if path is None:
                return
            if path.exists():
                self.push_screen(
                    ConfirmScreen(f"{path} exists. Replace it?", yes="Replace", no="Keep it"),
                    lambda replace: write(path, True) if replace else self.notify("nothing written"),
                )
            else:
                write(path, False)

        default = default_preset_path(self.setup_data)
        with contextlib.suppress(ValueError):
            default = default.relative_to(Path.cwd())
        self.push_screen(SavePresetScreen(default), chosen)

    # the live run

    @property
    def run_active(self) -> bool:
        return self.history is not None and self.history.active

    def action_start_run(self) -> None:
        if self.run_active:
            self.notify("a run is already active (F3 shows it)", severity="warning")
            self.switch_mode("train")
            return
        errors = field_errors(self.setup_data)
        if errors:
            self.notify(f"fix the setup first: {next(iter(errors.values()))}", title="start", severity="error")
            self.switch_mode("setup")
            return
        config = build_config(self.setup_data)
        self._run_id += 1
        self._stop_event = threading.Event()
        self._quit_after_run = False
        self.history = RunHistory(
            name=config.name, model=config.model.id, strategy=config.strategy.kind, status="starting"
        )
        self._set_banner()
        self.switch_mode("train")
        self.run_signal.publish(self.history)
        self._train(config, MessageSink(self, self._run_id), self._stop_event, self._run_id)

    def resume_run(self, run_dir: Path) -> None:
        """Continue a stopped, failed or interrupted run in its own directory (`engine.trainer.resume_training`)."""
        from engine.runs import check_resumable, read_events

        if self.run_active:
            self.notify("a run is already active (F3 shows it)", severity="warning")
            return
        try:
            check_resumable(run_dir)
        except ConfigError as exc:
            self.notify(str(exc), title="resume", severity="error")
            return
        history = RunHistory(run_dir=str(run_dir))
        for event in read_events(run_dir):  # the curves so far; the resumed run appends to them
            history.apply(event)
        history.status, history.error, history.ended_at = "starting", None, None
        self._run_id += 1
        self._stop_event = threading.Event()
        self._quit_after_run = False
        self.history = history
        self._set_banner()
        self.switch_mode("train")
        self.run_signal.publish(history)
        self._resume(run_dir, MessageSink(self, self._run_id), self._stop_event, self._run_id)

    @work(thread=True, exclusive=True, exit_on_error=False, group="run", name="training")
    def _resume(self, run_dir: Path, sink: MessageSink, stop_event: threading.Event, run_id: int) -> None:
        load_engine()
        from engine.trainer import resume_training

        result = resume_training(run_dir, sink, stop_event=stop_event)
        self.post_message(RunEnded(run_id, result.status))

    @work(thread=True, exclusive=True, exit_on_error=False, group="run", name="training")
    def _train(self, config: Any, sink: MessageSink, stop_event: threading.Event, run_id: int) -> None:
        load_engine()
        from engine.trainer import run_training

        result = run_training(config, sink, stop_event=stop_event)
        self.post_message(RunEnded(run_id, result.status))

    def on_engine_events(self, message: EngineEvents) -> None:
        events = message.sink.drain()
        if message.sink.run_id != self._run_id or self.history is None or not events:
            return
        for event in events:
            self.history.apply(event)
        self._banner_dirty = True
        if any(not isinstance(event, Step | Log) for event in events):
            self._set_banner()
        self.events_signal.publish(events)

    def on_run_ended(self, message: RunEnded) -> None:
        if message.run_id == self._run_id:
            self._run_over()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The run worker raised (a ConfigError before the run directory existed, or a bug): show it, go on."""
        if event.worker.group != "run" or event.state not in (WorkerState.ERROR, WorkerState.CANCELLED):
            return
        if self.history is not None and self.history.active:
            message = one_line(event.worker.error) if event.state == WorkerState.ERROR else "cancelled"
            self.history.fail(message)
            self.run_signal.publish(self.history)
        self._run_over()

    def _run_over(self) -> None:
        self._set_banner()
        history = self.history
        if history is not None and history.status == "failed" and history.error:
            self.notify(history.error, title="run failed", severity="error", timeout=10)
        elif history is not None and history.status in ("finished", "stopped"):
            self.notify(f"{history.label}: {history.status}", title="run")
        if self._quit_after_run:
            self.exit()

    def _set_banner(self) -> None:
        self._banner_dirty = False
        history = self.history
        if history is None:
            self.run_banner = ""
            return
        step = history.last_step
        progress = f" {step.step}/{step.max_steps}" if step is not None else ""
        stopping = self._stop_event is not None and self._stop_event.is_set() and history.active
        banner = {
            "starting": "[b $accent]● starting[/]",
            "running": f"[b $accent]● training{progress}[/]",
            "finished": "[b $success]✓ finished[/]",
            "stopped": "[b $warning]■ stopped[/]",
            "failed": "[b $error]✗ failed[/]",
        }.get(history.status, "")
        self.run_banner = "[b $warning]● stopping…[/]" if stopping else banner

    def action_stop_run(self) -> None:
        if not self.run_active or self._stop_event is None:
            self.notify("no active run", severity="warning")
            return
        if self._stop_event.is_set():
            self.notify("already stopping: the run stops at the next step")
            return
        stop_event = self._stop_event

        def answer(stop: bool | None) -> None:
            if stop and self.run_active:
                stop_event.set()
                self._set_banner()
                self.notify("stopping at the next step (a checkpoint is saved)")

        self.push_screen(
            ConfirmScreen("Stop the run? It stops at the next step and saves a checkpoint.", yes="Stop", no="Go on"),
            answer,
        )

    async def action_quit(self) -> None:
        if not self.run_active or self._stop_event is None:
            self.exit()
            return
        if self._quit_after_run:
            self.notify("waiting for the run to stop at its next step…")
            return
        stop_event = self._stop_event

        def answer(quit_: bool | None) -> None:
            if quit_ and self.run_active:
                self._quit_after_run = True
                stop_event.set()
                self._set_banner()
                self.notify("stopping the run (checkpoint), then quitting…")
            elif quit_:
                self.exit()

        self.push_screen(
            ConfirmScreen(
                "A run is active. Stop it (with a checkpoint) and quit?", yes="Stop and quit", no="Keep running"
            ),
            answer,
        )

    # help and the command palette

    def action_help(self) -> None:
        from tui.screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield SystemCommand("Setup", "Model, data, strategy and training options (F1)", self._mode("setup"))
        yield SystemCommand("Freeze map", "What trains, parameters and memory (F2)", self._mode("freeze"))
        yield SystemCommand("Training", "The live run (F3)", self._mode("train"))
        yield SystemCommand("Runs", "Earlier runs; open or compare them (F4)", self._mode("runs"))
        yield SystemCommand("Start run", "Train the current setup (ctrl+r)", self.action_start_run)
        yield SystemCommand("Stop run", "Stop at the next step with a checkpoint", self.action_stop_run)
        yield SystemCommand("Load preset", "A bundled preset or a TOML file (ctrl+o)", self.action_load_preset)
        yield SystemCommand("Save preset", "The setup as a preset TOML (ctrl+s)", self.action_save_preset)
        yield SystemCommand("Help", "Keys and screens (?)", self.action_help)
        yield from super().get_system_commands(screen)

    def _mode(self, mode: str):  # type: ignore[no-untyped-def]
        return lambda: self.switch_mode(mode)


def create_app(
    preset: Path | None = None,
    *,
    setup: dict[str, Any] | None = None,
    runs_dir: Path | None = None,
    cursor_blink: bool = True,
) -> FinetuiApp:
    """The app, as `finetui [PRESET]` and the tests build it (tests turn the cursor blink off)."""
    return FinetuiApp(preset, setup=setup, runs_dir=runs_dir, cursor_blink=cursor_blink)
