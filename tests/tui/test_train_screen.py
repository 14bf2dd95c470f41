"""Training from the app: loss points arrive live, the run finishes, stops on request, fails without harm."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import pytest
from textual.widgets import Label

from engine.events import Event, Log, Step
from engine.runs import read_summary
from engine.strategies import feature
from tests.tui.conftest import RUN_TIMEOUT_S, make_app, plain, screen_text, tiny_setup, wait_for
from tui.app import FinetuiApp
from tui.form import with_value
from tui.screens.dialogs import ConfirmScreen
from tui.screens.runs import RunDetailScreen, RunsScreen
from tui.screens.setup import SetupScreen
from tui.screens.train import TrainScreen
from tui.sink import MessageSink
from tui.widgets.run_view import LossChart, RunView


@pytest.fixture
def first_step_gate(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """(reached, release): the training thread waits after emitting its first step until the test releases it.

    Without it, a tiny run could finish before the test's key presses arrive; with it, a stop requested while
    the gate is closed takes effect at the very next step.
    """
    reached, release = threading.Event(), threading.Event()
    emit = MessageSink.emit

    def gated(self: MessageSink, event: Event) -> None:
        emit(self, event)
        if isinstance(event, Step) and not reached.is_set():
            reached.set()
            release.wait(RUN_TIMEOUT_S)

    monkeypatch.setattr(MessageSink, "emit", gated)
    return reached, release


async def finish(app: FinetuiApp, pilot) -> None:  # type: ignore[no-untyped-def]
    await app.workers.wait_for_complete()
    await pilot.pause()


async def test_a_tiny_run_shows_its_loss_curve_finishes_and_reopens_from_the_runs_screen(tmp_path: Path) -> None:
    app = make_app(tiny_setup(tmp_path))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert isinstance(app.screen, TrainScreen)
        # a 6-step run may already be over on a fast machine: any state but idle shows it started
        assert any(state in app.run_banner for state in ("starting", "training", "finished"))
        await finish(app, pilot)
        history = app.session.history
        assert history is not None and history.status == "finished", history and history.error
        assert history.steps == [1, 2, 3, 4, 5, 6] and len(history.losses) == 6
        view = app.screen.query_one(RunView)
        view._flush()
        chart = view.query_one(LossChart)
        assert list(chart.series[0].steps) == history.steps and list(chart.series[0].losses) == history.losses
        assert "step 6/6" in plain(view.query_one("#progress-text", Label))
        assert "finished" in app.run_banner and "finished" in plain(view.query_one("#run-title", Label))
        shown = screen_text(app)  # the whole summary above the fold of an 80x24 terminal
        validation, test = history.latest_metrics("validation"), history.latest_metrics("test")
        assert re.search(r"validation +test *\n", shown), shown
        for name in ("loss", "accuracy", "f1"):
            assert re.search(rf"{name} +{validation[name]:.4f} +{test[name]:.4f} ", shown), name
        run_dir = Path(history.run_dir or "")
        assert read_summary(run_dir)["status"] == "finished"

        await pilot.press("f4")
        await finish(app, pilot)
        assert isinstance(app.screen, RunsScreen)
        assert [run.path for run in app.screen.runs] == [run_dir]
        assert "finished" in screen_text(app)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, RunDetailScreen)
        reopened = app.screen.run.history
        assert reopened.status == "finished"
        assert (reopened.steps, reopened.losses) == (history.steps, history.losses)
        assert reopened.latest_metrics() == history.latest_metrics()
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)


async def test_stop_asks_then_stops_with_a_checkpoint_and_the_runs_screen_resumes_it(
    tmp_path: Path, first_step_gate: tuple[threading.Event, threading.Event]
) -> None:
    reached, release = first_step_gate
    app = make_app(tiny_setup(tmp_path, max_steps=30, save_steps=1000))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+r")
        await wait_for(pilot, reached.is_set)
        await pilot.press("f1")  # the UI answers while a run is active
        assert isinstance(app.screen, SetupScreen)
        await pilot.press("f3")
        assert isinstance(app.screen, TrainScreen)
        await pilot.press("s")
        assert isinstance(app.screen, ConfirmScreen) and app.session.active
        await pilot.press("n")  # not stopped
        assert isinstance(app.screen, TrainScreen) and not app.session.stop_event.is_set()
        await pilot.press("s", "y")
        release.set()
        await finish(app, pilot)
        history = app.session.history
        assert history is not None and history.status == "stopped"
        assert history.checkpoint and Path(history.checkpoint).name == "checkpoint-2"  # the very next step
        run_dir = Path(history.run_dir or "")
        assert read_summary(run_dir)["status"] == "stopped"
        assert "stopped" in app.run_banner
        notes = [note.message for note in app._notifications]
        assert f"{run_dir.name} stopped with a checkpoint: R on the runs screen (F4) resumes it" in notes

        await pilot.press("f4")
        await finish(app, pilot)
        assert app.screen.runs[0].status == "stopped"
        await pilot.press("R")  # resume it from its checkpoint, in the same directory
        assert isinstance(app.screen, TrainScreen)
        await finish(app, pilot)
        resumed = app.session.history
        assert resumed is not None and resumed.status == "finished", resumed and resumed.error
        assert Path(resumed.run_dir or "") == run_dir and resumed.steps[-1] == 30
        assert resumed.steps == sorted(set(resumed.steps))  # the curve continues, no step twice
        assert read_summary(run_dir)["status"] == "finished"


async def test_quitting_during_a_run_asks_first(
    tmp_path: Path, first_step_gate: tuple[threading.Event, threading.Event], capsys: pytest.CaptureFixture[str]
) -> None:
    reached, release = first_step_gate
    app = make_app(tiny_setup(tmp_path, max_steps=2000))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+r")
        await wait_for(pilot, reached.is_set)
        await pilot.press("ctrl+q")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert app.session.active and app.is_running
        await pilot.press("ctrl+q", "y")  # stop with a checkpoint, then quit
        assert app.is_running  # not before the run has stopped
        release.set()
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while app.return_code is None:  # the app quits by itself once the run stopped
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert app.session.history is not None and app.session.history.status == "stopped"
    assert app.session.history.checkpoint and Path(app.session.history.checkpoint).name == "checkpoint-2"
    assert app.return_code == 0
    said = " ".join(capsys.readouterr().err.split())  # the shell shows how to continue the run
    assert (
        f"finetui: {Path(app.session.history.run_dir or '').name} stopped; continue it with: finetui run --resume"
        in said
    )


async def test_a_failed_run_shows_its_error_and_the_app_stays_usable(tmp_path: Path) -> None:
    setup = tiny_setup(tmp_path)
    setup["data"]["label_field"] = "stars"  # no such column: the run fails once its data is read
    app = make_app(setup)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+r")
        await finish(app, pilot)
        history = app.session.history
        assert history is not None and history.status == "failed"
        assert history.error and "stars" in history.error and "\n" not in history.error
        view = app.screen.query_one(RunView)
        assert view.query_one("#run-error", Label).display
        assert history.error in plain(view.query_one("#run-error", Label))
        assert "failed" in app.run_banner

        setup_missing = dict(app.setup_data, data={**app.setup_data["data"], "train": "no/such/file.jsonl"})
        app.update_setup(setup_missing)
        await pilot.press("ctrl+r")  # fails before a run directory exists (ConfigError from the engine)
        await finish(app, pilot)
        assert app.session.history.status == "failed" and "no/such/file.jsonl" in (app.session.history.error or "")
        await pilot.press("f1")
        assert isinstance(app.screen, SetupScreen)


async def test_a_feature_run_stops_while_it_embeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The feature strategy has no training steps: a stop must reach it between two embedding batches."""
    reached, release = threading.Event(), threading.Event()
    emit = MessageSink.emit

    def gated(self: MessageSink, event: Event) -> None:
        emit(self, event)
        if isinstance(event, Log) and event.message.startswith("embedding train") and not reached.is_set():
            reached.set()
            release.wait(RUN_TIMEOUT_S)

    monkeypatch.setattr(MessageSink, "emit", gated)
    batches: list[int] = []
    pool = feature._pool
    monkeypatch.setattr(feature, "_pool", lambda hidden, *args: batches.append(len(hidden)) or pool(hidden, *args))
    setup = with_value(tiny_setup(tmp_path, batch_size=4), "strategy.kind", "feature")
    app = make_app(setup)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+r")
        await wait_for(pilot, reached.is_set)
        await pilot.press("s", "y")
        assert app.session.history is not None and app.session.history.stop_requested
        assert "stopping" in plain(app.screen.query_one("#run-title", Label))
        release.set()
        await finish(app, pilot)
        history = app.session.history
        assert history.status == "stopped", history.error
        assert batches == []  # stopped before the next batch: not one more forward pass
        assert not any(isinstance(e, Log) and "embeddings from the cache" in e.message for e in history.journal)
        assert read_summary(Path(history.run_dir or ""))["status"] == "stopped"
        assert "stopped" in app.run_banner
