"""Background (detached) runs from the app: they train in their own process, survive the app, and can be
followed and stopped from the training screen or the runs screen, like `finetui run --detach` and `attach`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from textual.widgets import DataTable

from engine.api import start_detached
from engine.events import RunStopped
from engine.runs import live_pid, read_events, read_summary
from tests.tui.conftest import make_app, plain, screen_text, tiny_setup, wait_for
from tui.app import FinetuiApp
from tui.screens.dialogs import ConfirmScreen
from tui.screens.runs import RunsScreen
from tui.screens.train import TrainScreen
from tui.widgets.run_view import RunView

# long enough that the run is still training when the test stops it; it never gets near the end
LONG = {"max_steps": 100_000, "save_steps": 100_000, "eval_steps": 100_000}


@pytest.fixture
def runs_dir(tmp_path: Path) -> Iterator[Path]:
    """The output folder; any run process still alive at the end of the test is killed (a failed test)."""
    yield tmp_path
    for pid_file in tmp_path.glob("*/pid"):
        pid = live_pid(pid_file.parent)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def runs_table_status(app: FinetuiApp) -> str:
    return str(app.screen.query_one("#runs-table", DataTable).get_row_at(0)[2])


async def test_a_background_run_survives_quitting_the_app_and_is_stopped_from_the_runs_screen(
    runs_dir: Path,
) -> None:
    app = make_app(tiny_setup(runs_dir, **LONG))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+t")
        assert isinstance(app.screen, TrainScreen) and app.session.detached
        history = app.session.history
        assert history is not None
        await wait_for(pilot, lambda: len(history.steps) >= 2)  # followed from its events.jsonl
        assert "(bg)" in app.run_banner and "running" in plain(app.screen.query_one("#run-title"))
        run_dir = Path(history.run_dir or "")
        pid = live_pid(run_dir)
        assert pid is not None and pid != os.getpid()
        await pilot.press("ctrl+q")  # no question: the run goes on without the app
        deadline = time.monotonic() + 10
        while app.return_code is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert psutil.Process(pid).is_running() and live_pid(run_dir) == pid
    assert read_summary(run_dir)["status"] == "running"

    app = make_app(runs_dir=runs_dir)  # the app opened again
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f4")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, RunsScreen) and runs_table_status(app) == "running"
        await pilot.press("s")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert live_pid(run_dir) == pid and not (run_dir / "stop").exists()
        await pilot.press("s", "y")
        await pilot.press("r")
        await wait_for(pilot, lambda: runs_table_status(app) in ("stopping…", "stopped"), timeout=10)
        await wait_for(pilot, lambda: runs_table_status(app) == "stopped")  # the list refreshes by itself
        assert live_pid(run_dir) is None
    events = read_events(run_dir)
    assert isinstance(events[-1], RunStopped) and events[-1].checkpoint
    assert read_summary(run_dir)["status"] == "stopped"


async def test_a_run_started_in_another_process_is_attached_and_stopped_from_the_training_screen(
    runs_dir: Path,
) -> None:
    from engine.config import build_config

    run_dir = start_detached(build_config(tiny_setup(runs_dir, **LONG)))  # `finetui run --detach` in a shell
    app = make_app(runs_dir=runs_dir)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f4")
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("a")
        assert isinstance(app.screen, TrainScreen) and app.session.detached
        history = app.session.history
        assert history is not None and history.run_dir == str(run_dir)
        await wait_for(pilot, lambda: len(history.steps) >= 2)
        await pilot.press("s", "y")
        await wait_for(pilot, lambda: history.stop_requested)
        await wait_for(pilot, lambda: history.status == "stopped")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "stopped" in app.run_banner and "stopped" in plain(app.screen.query_one(RunView).query_one("#run-title"))
        assert "stopped at step" in screen_text(app)
    assert live_pid(run_dir) is None and read_summary(run_dir)["status"] == "stopped"
