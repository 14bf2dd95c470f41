"""Run records in the app: memory estimate and peak on a run, the ratio on the runs screen, two runs diffed, the
alert when a run ends."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.events import FreezeMapReady
from engine.notify import terminal_alert
from tests.tui.conftest import append_events, make_app, screen_text, step_event, with_memory, write_run
from tui import alerts
from tui.history import RunHistory
from tui.screens.diff import DiffScreen
from tui.screens.runs import RunsScreen

MIB = 2**20


async def test_runs_screen_shows_the_memory_ratio_and_diffs_two_marked_runs(tmp_path: Path) -> None:
    head = write_run(tmp_path, "cmp", strategy="head", accuracy=0.6, started=1_779_990_000.0)
    full = write_run(tmp_path / "other", "cmp", strategy="full", accuracy=0.8)
    full = full.rename(tmp_path / "cmp-20260528-202641")
    with_memory(full, 97 * MIB, 100 * MIB)
    app = make_app(runs_dir=tmp_path)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.press("f4")
        await app.workers.wait_for_complete()
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, RunsScreen)
        assert [run.path for run in screen.runs] == [full, head]
        assert "0.97x" in screen_text(app)
        await pilot.press("d")
        await pilot.pause()
        assert isinstance(app.screen, RunsScreen)  # nothing marked: a hint, no diff
        await pilot.press("space", "down", "space", "d")
        await pilot.pause()
        assert isinstance(app.screen, DiffScreen)
        text = screen_text(app)
        assert "config: 1 differ" in text and "strategy.kind: full -> head" in text
        assert "validation.accuracy: 0.8 -> 0.6 (-0.2)" in text
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)


async def test_a_run_shows_its_memory_estimate_and_measured_peak(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, "mem", losses=[0.9], status="running")
    freeze_map = {"total_params": 1, "trainable_params": 1, "trainable_percent": 100.0, "layers": []}
    memory = {"weights_bytes": 0, "gradients_bytes": 0, "optimizer_bytes": 0, "activations_bytes": 0}
    freeze_map["memory"] = memory | {"total_bytes": 210 * MIB, "note": ""}
    append_events(run_dir, FreezeMapReady(freeze_map=freeze_map))
    step = step_event(2, 0.8)
    append_events(run_dir, type(step)(**{**step.__dict__, "memory_peak_bytes": 200 * MIB}))
    app = make_app(runs_dir=tmp_path)
    async with app.run_test(size=(120, 34)) as pilot:
        await pilot.press("f4")
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("enter")
        await pilot.pause()
        text = screen_text(app)
        assert "mem est   210 MiB" in text
        assert "mem peak  200 MiB 1.05x" in text


@pytest.mark.parametrize("headless", [True, False])
def test_the_app_rings_when_its_run_ends(headless: bool) -> None:
    written: list[str] = []
    app = SimpleNamespace(is_headless=headless, _driver=SimpleNamespace(write=written.append))
    history = RunHistory(run_dir="/runs/tiny-1", status="running")
    alerts.announce_end(app, history)  # type: ignore[arg-type]
    assert written == []  # still running
    history.status, history.error = "failed", "out of memory at step 3"
    alerts.announce_end(app, history)  # type: ignore[arg-type]
    assert written == ([] if headless else [terminal_alert("tiny-1 failed: out of memory at step 3")])
