"""Snapshots of the screens and dialogs at fixed terminal sizes (`pytest --snapshot-update` after a deliberate
change): 120x34, and 80x24, the size where nothing may be cut off.

Nothing in them depends on the clock or the machine: paths show relative to the working directory, the runs
are written with fixed times, and dates are in UTC.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Input

from tests.engine.test_old_runs import relocated_fixture
from tests.tui.conftest import FIXED_TIME, make_app, quickstart, wait_for, with_memory, write_run
from tui.form import with_value
from tui.screens.dialogs import ConfirmScreen
from tui.widgets.data_report import DataReportView

SIZE = (120, 34)
NARROW = (80, 24)
SIZES = pytest.mark.parametrize("size", [SIZE, NARROW], ids=["120x34", "80x24"])


async def settle(pilot) -> None:  # type: ignore[no-untyped-def]
    """Workers done and their results shown: a data report's findings change the setup screen's layout."""
    await pilot.app.workers.wait_for_complete()
    reports = pilot.app.screen.query(DataReportView)
    await wait_for(pilot, lambda: all(report.pending_key is None for report in reports))
    await pilot.pause()
    await pilot.pause()


@pytest.fixture
def runs_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Three finished runs in ./runs of a scratch working directory (one with a long name, one with test
    metrics, two with a memory record)."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    lora = write_run(runs, "sentiment-lora-r16-all-linear", strategy="lora", losses=[0.72, 0.6, 0.5, 0.46],
                     accuracy=0.7, started=FIXED_TIME - 1200)  # fmt: skip
    with_memory(lora, 624 * 2**20, 600 * 2**20)
    head = write_run(runs, "head", strategy="head", losses=[0.71, 0.69, 0.68, 0.68, 0.67], accuracy=0.62,
                     started=FIXED_TIME - 600)  # fmt: skip
    with_memory(head, 582 * 2**20, 600 * 2**20)
    write_run(runs, "full", strategy="full", losses=[0.70, 0.61, 0.52, 0.44, 0.37, 0.31, 0.27, 0.25],
              test_accuracy=0.71)  # fmt: skip
    return runs


def test_setup_screen_with_the_quickstart_preset(snap_compare) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=settle)


def test_setup_screen_at_80x24_with_an_invalid_field(snap_compare) -> None:  # type: ignore[no-untyped-def]
    setup = with_value(quickstart(), "train.lr", "fast")

    async def focus_lr(pilot) -> None:  # type: ignore[no-untyped-def]
        await settle(pilot)
        learning_rate = pilot.app.screen.query_one("#f-train-lr")
        learning_rate.focus(scroll_visible=False)  # focus scrolls later, sometimes after the snapshot
        learning_rate.scroll_visible(animate=False)
        await pilot.pause()

    assert snap_compare(make_app(setup), terminal_size=(80, 24), run_before=focus_lr)


def test_setup_screen_data_report_at_80x24(snap_compare) -> None:  # type: ignore[no-untyped-def]
    """The quickstart data cut to 16 tokens: the truncated examples, and the warning beside max length."""

    async def scroll_to_report(pilot) -> None:  # type: ignore[no-untyped-def]
        await settle(pilot)
        pilot.app.screen.query_one("#data-report").scroll_visible(animate=False, top=True)
        await pilot.pause()

    setup = with_value(quickstart(), "data.max_length", 16)
    assert snap_compare(make_app(setup), terminal_size=(80, 24), run_before=scroll_to_report)


@SIZES
def test_freeze_map_screen(snap_compare, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    """LoRA: the classifier (new) trains whole, the blocks in part; the memory estimate under the map."""
    setup = with_value(quickstart(), "strategy.kind", "lora")

    async def open_map(pilot) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("f2")
        await settle(pilot)

    assert snap_compare(make_app(setup), terminal_size=size, run_before=open_map)


@SIZES
def test_runs_screen(snap_compare, runs_here: Path, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    async def open_runs(pilot) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("f4")
        await settle(pilot)

    assert snap_compare(make_app(runs_dir=Path("runs")), terminal_size=size, run_before=open_runs)


@SIZES
def test_a_finished_run_opened_from_the_runs_screen(snap_compare, runs_here: Path, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    async def open_run(pilot) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("f4")
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)

    assert snap_compare(make_app(runs_dir=Path("runs")), terminal_size=size, run_before=open_run)


def test_compare_screen_at_80x24(snap_compare, runs_here: Path) -> None:  # type: ignore[no-untyped-def]
    async def compare(pilot) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("f4")
        await settle(pilot)
        await pilot.press("space", "down", "down", "space", "c")
        await settle(pilot)

    assert snap_compare(make_app(runs_dir=Path("runs")), terminal_size=NARROW, run_before=compare)


def test_training_screen_before_a_run(snap_compare) -> None:  # type: ignore[no-untyped-def]
    async def open_train(pilot) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("f3")
        await settle(pilot)

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=open_train)


@SIZES
def test_help_screen(snap_compare, runs_here: Path, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    async def open_help(pilot) -> None:  # type: ignore[no-untyped-def]
        await pilot.press("f4")
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(make_app(runs_dir=Path("runs")), terminal_size=size, run_before=open_help)


def test_confirm_dialog_at_80x24(snap_compare) -> None:  # type: ignore[no-untyped-def]
    async def ask(pilot) -> None:  # type: ignore[no-untyped-def]
        await settle(pilot)
        question = "Stop the run? It stops at the next step and saves a checkpoint."  # FinetuiApp.action_stop_run
        pilot.app.push_screen(ConfirmScreen(question, yes="Stop", no="Go on"))
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=NARROW, run_before=ask)


def test_preset_picker_at_80x24(snap_compare) -> None:  # type: ignore[no-untyped-def]
    async def pick(pilot) -> None:  # type: ignore[no-untyped-def]
        await settle(pilot)
        await pilot.press("ctrl+o")
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=NARROW, run_before=pick)


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

    assert snap_compare(make_app(runs_dir=Path("runs")), terminal_size=NARROW, run_before=open_try)
