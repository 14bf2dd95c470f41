"""The finetui app: four screens (setup, freeze map, training, runs) around one setup and one live run.

The app owns what the screens share and hands it down: the current setup (a raw preset dict, validated with the
engine's pydantic models; changes are announced on `setup_signal`) and the live run (`tui.session.LiveRun`,
`app.session`). Besides, it holds the modes, the keys and the command palette, presets, the first paint and
quitting. Screens never change these fields themselves: they call the app's methods or `app.session`.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.reactive import var
from textual.screen import Screen
from textual.signal import Signal
from textual.worker import Worker, WorkerState

from engine.config import ConfigError, build_config, field_errors
from tui.alerts import announce_end
from tui.form import display_path, relativize_paths
from tui.heavy import load_engine
from tui.history import RunHistory
from tui.messages import EngineEvents, RunDetached, RunEnded, SetupChanged
from tui.presets import default_preset_path, load_preset, preset_files, save_preset
from tui.screens.base import one_line
from tui.screens.dialogs import ConfirmScreen, PresetPickerScreen, SavePresetScreen
from tui.screens.setup import SetupScreen
from tui.session import LiveRun

BANNER_INTERVAL_S = 1.0
HEAVY_MODULES = ("torch", "transformers", "peft", "datasets")


def _screen(module: str, name: str) -> Screen:
    """A mode's screen, its module imported when first shown (the first paint needs only the setup screen)."""
    return getattr(importlib.import_module(f"tui.screens.{module}"), name)()


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
        Binding("ctrl+t", "start_detached", "Background"),
        Binding("ctrl+o", "load_preset", "Load"),
        Binding("ctrl+s", "save_preset", "Save"),
        Binding("ctrl+q", "quit", "Quit", priority=True, show=False),
    ]

    run_banner: var[str] = var("")  # shown by the mode bars; a `reactive` would repaint the whole app on each change

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
        self.setup_signal: Signal[SetupChanged] = Signal(self, "setup")
        """Published on every change of `setup_data`."""
        self.runs_dir = runs_dir
        self.session = LiveRun(self)
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
        """The app is closing: an active run of its own stops at its next step (the worker thread cannot be
        killed); a detached run goes on, only following it ends."""
        self.session.leave()

    def _refresh_banner(self) -> None:
        if self._banner_dirty:
            self._set_banner()

    # the shared setup

    def update_setup(self, data: dict[str, Any], *, origin: object | None = None) -> None:
        """An edit of the setup (a field, a toggled freeze-map row) made by `origin`, which shows it already."""
        self.setup_data = data
        self.setup_signal.publish(SetupChanged(origin))

    def replace_setup(self, data: dict[str, Any], source: Path | None = None) -> None:
        """A new setup (a loaded preset): every screen shows it, the current one at once."""
        self.setup_data = data
        if source is not None:
            self.preset_path = source
            self.sub_title = source.stem
        self.setup_signal.publish(SetupChanged(None))

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

    # the live run (tui.session.LiveRun)

    def action_start_run(self) -> None:
        self._start_new(detached=False)

    def action_start_detached(self) -> None:
        """Start the setup in its own process session: it survives closing the app (`finetui run --detach`)."""
        self._start_new(detached=True)

    def _start_new(self, *, detached: bool) -> None:
        if self._refuse_when_busy():
            self.switch_mode("train")
            return
        errors = field_errors(self.setup_data)
        if errors:
            self.notify(f"fix the setup first: {next(iter(errors.values()))}", title="start", severity="error")
            self.switch_mode("setup")
            return
        self._quit_after_run = False
        self.session.start(build_config(self.setup_data), detached=detached)
        self._show_run()

    def resume_run(self, run_dir: Path) -> None:
        """Continue a stopped, failed or interrupted run in its own directory (`engine.api.resume_training`)."""
        if self._refuse_when_busy():
            return
        try:
            self.session.resume(run_dir)
        except ConfigError as exc:
            self.notify(str(exc), title="resume", severity="error")
            return
        self._show_run()

    def attach_run(self, run_dir: Path) -> None:
        """Follow a run that another process trains (a detached run, `finetui run` in a shell) on the training
        screen, as `finetui attach` does: stop asks it to stop, quitting the app leaves it running."""
        if self.session.is_current(run_dir):
            self.switch_mode("train")
            return
        if self._refuse_when_busy():
            return
        try:
            self.session.attach(run_dir)
        except ConfigError as exc:
            self.notify(str(exc), severity="warning")
            return
        self._show_run()

    def _refuse_when_busy(self) -> bool:
        if self.session.active:
            self.notify("a run is already active (F3 shows it)", severity="warning")
        return self.session.active

    def _show_run(self) -> None:
        self._quit_after_run = False
        self._set_banner()
        self.switch_mode("train")

    def on_run_detached(self, message: RunDetached) -> None:
        self.session.detached_to(message)

    def on_engine_events(self, message: EngineEvents) -> None:
        events = self.session.apply(message.sink)
        if not events:
            return
        self._banner_dirty = True
        if not LiveRun.only_progress(events):
            self._set_banner()

    def on_run_ended(self, message: RunEnded) -> None:
        if self.session.owns(message):
            self._run_over()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The run worker raised (a ConfigError before the run directory existed, or a bug): show it, go on."""
        if event.worker.group != "run" or event.state not in (WorkerState.ERROR, WorkerState.CANCELLED):
            return
        self.session.worker_failed(one_line(event.worker.error) if event.state == WorkerState.ERROR else "cancelled")
        self._run_over()

    def _run_over(self) -> None:
        self._set_banner()
        history = self.session.history
        if history is not None:
            announce_end(self, history)
            if history.status == "failed" and history.error:
                self.notify(history.error, title="run failed", severity="error", timeout=10)
            elif history.status == "stopped":
                self.notify(self._stopped_text(history.label, history.checkpoint), title="run stopped", timeout=10)
            elif history.status == "finished":
                self.notify(f"{history.label}: finished", title="run")
        if self._quit_after_run:
            self.exit(message=self._resume_line(history))

    @staticmethod
    def _stopped_text(label: str, checkpoint: str | None) -> str:
        if checkpoint:
            return f"{label} stopped with a checkpoint: R on the runs screen (F4) resumes it"
        return f"{label} stopped before its first checkpoint: R on the runs screen (F4) trains it again from the start"

    @staticmethod
    def _resume_line(history: RunHistory | None) -> str | None:
        """What the shell shows once the app stopped its run and quit: the command that continues the run."""
        if history is None or history.status != "stopped" or not history.run_dir:
            return None
        return (
            f"finetui: {history.label} stopped; continue it with: finetui run --resume {display_path(history.run_dir)}"
        )

    def _set_banner(self) -> None:
        self._banner_dirty = False
        self.run_banner = self.session.banner()

    def action_stop_run(self) -> None:
        if not self.session.active:
            self.notify("no active run", severity="warning")
            return
        if self.session.stopping:
            self.notify("already stopping: the run stops at the next step")
            return

        def answer(stop: bool | None) -> None:
            if stop and self.session.active:
                self.session.stop()
                self._set_banner()
                self.notify("stopping at the next step (a checkpoint is saved)")

        self.push_screen(
            ConfirmScreen("Stop the run? It stops at the next step and saves a checkpoint.", yes="Stop", no="Go on"),
            answer,
        )

    def stop_run_dir(self, run_dir: Path) -> None:
        """Ask the process training `run_dir` to stop (confirm first): the app's own run, or another process's
        (a detached run, `finetui run` in a shell: `engine.launch.follow.request_stop`)."""
        from engine.runs import live_pid

        if self.session.is_current(run_dir):
            self.action_stop_run()
            return
        if self.session.stopping_other(run_dir):
            self.notify(f"{run_dir.name} is stopping already")
            return
        pid = live_pid(run_dir)
        if pid is None:
            self.notify(f"{run_dir.name} is not running", severity="warning")
            return

        def answer(stop: bool | None) -> None:
            if not stop:
                return
            if self.session.stop_other(run_dir):
                self.notify(f"{run_dir.name}: stopping at its next step (a checkpoint is saved)")
            else:
                self.notify(f"{run_dir.name} ended meanwhile")

        self.push_screen(
            ConfirmScreen(
                f"Stop {run_dir.name} (process {pid})? It stops at its next step and saves a checkpoint.",
                yes="Stop",
                no="Go on",
            ),
            answer,
        )

    async def action_quit(self) -> None:
        session = self.session
        if not session.active:
            self.exit()
            return
        if session.detached:
            run_dir = session.history.run_dir if session.history is not None else None
            if run_dir is None:
                self.notify("the background run is starting: quit once it has its run directory", severity="warning")
                return
            self.exit(message=f"finetui: {run_dir} goes on in the background; follow it: finetui attach {run_dir}")
            return
        if self._quit_after_run:
            self.notify("waiting for the run to stop at its next step…")
            return

        def answer(quit_: bool | None) -> None:
            if quit_ and session.active:
                self._quit_after_run = True
                session.stop()
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
        yield SystemCommand(
            "Start run in the background",
            "Train the current setup detached: the run survives closing the app (ctrl+t)",
            self.action_start_detached,
        )
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
