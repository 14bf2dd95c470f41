"""Snapshots of the main screens at fixed terminal sizes (`pytest --snapshot-update` after a deliberate change).

Nothing in them depends on the clock or the machine: paths show relative to the working directory, the runs
are written with fixed times, and dates are in UTC.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Input

from tests.engine.test_old_runs import relocated_fixture
from tests.tui.conftest import FIXED_TIME, make_app, quickstart, write_run
from tui.form import with_value

SIZE = (120, 34)


async def settle(pilot) -> None:  # type: ignore[no-untyped-def]
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


@pytest.fixture
def runs_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two finished runs in ./runs of a scratch working directory."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    write_run(runs, "head", strategy="head", losses=[0.71, 0.69, 0.68, 0.68, 0.67], accuracy=0.62,
              started=FIXED_TIME - 600)  # fmt: skip
    write_run(runs, "full", strategy="full", losses=[0.70, 0.61, 0.52, 0.44, 0.37, 0.31, 0.27, 0.25])
    return runs


def test_setup_screen_with_the_quickstart_preset(snap_compare) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=settle)


def test_setup_screen_at_80x24_with_an_invalid_field(snap_compare) -> None:  # type: ignore[no-untyped-def]
    setup = with_value(quickstart(), "train.lr", "fast")

    async def focus_lr(pilot) -> None:  # type: ignore[no-untyped-def]
        await settle(pilot)
        pilot.app.screen.query_one("#f-train-lr").focus()
        await pilot.pause()

    assert snap_compare(make_app(setup), terminal_size=(80, 24), run_before=focus_lr)


def test_freeze_map_screen(snap_compare) -> None:  # type: ignore[no-untyped-def]
    setup = with_value(quickstart(), "strategy.kind", "last_layers")

    async def open_map(pilot) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("f2")
        await settle(pilot)

    assert snap_compare(make_app(setup), terminal_size=SIZE, run_before=open_map)


def test_runs_screen(snap_compare, runs_here: Path) -> None:  # type: ignore[no-untyped-def]
    async def open_runs(pilot) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("f4")
        await settle(pilot)

    assert snap_compare(make_app(runs_dir=Path("runs")), terminal_size=SIZE, run_before=open_runs)


def test_a_finished_run_opened_from_the_runs_screen(snap_compare, runs_here: Path) -> None:  # type: ignore[no-untyped-def]
    async def open_run(pilot) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("f4")
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)

    assert snap_compare(make_app(runs_dir=Path("runs")), terminal_size=SIZE, run_before=open_run)


def test_training_screen_before_a_run(snap_compare) -> None:  # type: ignore[no-untyped-def]
    async def open_train(pilot) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("f3")
        await settle(pilot)

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=open_train)


def test_help_screen(snap_compare, runs_here: Path) -> None:  # type: ignore[no-untyped-def]
    async def open_help(pilot) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("f4")
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(make_app(runs_dir=Path("runs")), terminal_size=SIZE, run_before=open_help)


def test_try_screen_at_80x24_with_the_base_model_beside(snap_compare, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A stopped LoRA run (its last checkpoint, and a note saying so), both panes, a prompt typed in."""
    monkeypatch.chdir(tmp_path)
    relocated_fixture(tmp_path)

    async def open_try(pilot) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("f4")
        await settle(pilot)
        await pilot.press("t")
        await settle(pilot)  # the run is loaded
        await pilot.press("ctrl+b")
        pilot.app.screen.query_one(Input).value = "Repeat the word river 3 times."
        await pilot.pause()

    assert snap_compare(make_app(runs_dir=Path("runs")), terminal_size=(80, 24), run_before=open_try)
