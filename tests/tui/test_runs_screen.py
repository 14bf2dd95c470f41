"""The runs screen: run folders listed, a run rebuilt from events.jsonl and followed while written, overlays."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from textual.widgets import DataTable

from engine.events import RunFinished, RunStopped, Step
from engine.runs import read_events, write_pid
from tests.tui.conftest import (
    FIXED_TIME,
    append_events,
    make_app,
    screen_text,
    step_event,
    wait_for,
    with_memory,
    write_run,
)
from tui.screens.runs import CompareScreen, RunDetailScreen, RunsScreen
from tui.widgets.run_view import LossChart, RunView


async def open_runs(app, pilot) -> RunsScreen:  # type: ignore[no-untyped-def]
    await pilot.press("f4")
    await app.workers.wait_for_complete()
    await pilot.pause()
    assert isinstance(app.screen, RunsScreen)
    return app.screen


async def open_run(app, pilot) -> RunDetailScreen:  # type: ignore[no-untyped-def]
    """From the runs screen, open the run under the cursor."""
    await pilot.press("enter")
    await pilot.pause()
    assert isinstance(app.screen, RunDetailScreen)
    return app.screen


async def test_runs_are_listed_newest_first_with_status_and_best_metric(tmp_path: Path) -> None:
    write_run(tmp_path, "older", strategy="head", accuracy=0.6, started=FIXED_TIME - 3600)
    write_run(tmp_path, "newer", strategy="lora", accuracy=0.8)
    app = make_app(runs_dir=tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_runs(app, pilot)
        assert [run.name for run in screen.runs] == ["newer", "older"]
        table = screen.query_one("#runs-table", DataTable)
        assert [str(cell) for cell in table.get_row_at(0)][1:6] == [
            "newer-20260528-202640", "finished", "lora", "tiny-bert", "acc 0.8000",
        ]  # fmt: skip
        assert "05-28 20:26" in screen_text(app)


async def test_a_run_written_by_another_process_is_followed(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, "live", losses=[0.9, 0.8], status="running")
    app = make_app(runs_dir=tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_runs(app, pilot)
        assert screen.runs[0].status == "running"
        detail = await open_run(app, pilot)
        history = detail.run.history
        assert history.status == "running" and history.losses == [0.9, 0.8]

        with (run_dir / "events.jsonl").open("a") as handle:  # the other process writes on
            step = Step(time=FIXED_TIME + 9, step=3, max_steps=3, epoch=1.0, loss=0.7, lr=0.0, grad_norm=None,
                        samples_per_second=20.0, tokens_per_second=400.0, elapsed_s=9.0, eta_s=0.0)  # fmt: skip
            handle.write(json.dumps(step.to_dict()) + "\n")
            handle.write('{"type": "run_fin')  # a line still being written waits for the next poll
        detail._follow()
        assert history.losses == [0.9, 0.8, 0.7] and history.status == "running"
        with (run_dir / "events.jsonl").open("a") as handle:
            rest = json.dumps(RunFinished(time=FIXED_TIME + 10, summary={"status": "finished"}).to_dict())
            handle.write(rest.removeprefix('{"type": "run_fin') + "\n")
        detail._follow()
        await pilot.pause()
        assert history.status == "finished"
        assert "finished" in screen_text(app)
        detail.query_one(RunView)._flush()
        assert list(detail.query_one(LossChart).series[0].losses) == [0.9, 0.8, 0.7]


async def test_marked_runs_overlay_on_one_loss_chart(tmp_path: Path) -> None:
    write_run(tmp_path, "head", strategy="head", losses=[0.7, 0.66, 0.65], started=FIXED_TIME - 60)
    write_run(tmp_path, "full", strategy="full", losses=[0.7, 0.5, 0.3, 0.2])
    app = make_app(runs_dir=tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await open_runs(app, pilot)
        await pilot.press("c")  # nothing marked yet: a hint, no screen
        assert isinstance(app.screen, RunsScreen)
        await pilot.press("space", "down", "space", "c")
        await pilot.pause()
        compare = app.screen
        assert isinstance(compare, CompareScreen)
        series = compare.query_one(LossChart).series
        assert [(s.label, list(s.losses)) for s in series] == [
            ("full-20260528-202640", [0.7, 0.5, 0.3, 0.2]),
            ("head-20260528-202640", [0.7, 0.66, 0.65]),
        ]
        assert compare.query_one("#compare-table", DataTable).row_count == 2
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)


async def test_an_open_run_is_followed_live_through_its_end_and_a_resume(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, "live", losses=[0.9, 0.8], status="running")
    started = read_events(run_dir)[0]
    app = make_app(runs_dir=tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await open_runs(app, pilot)
        detail = await open_run(app, pilot)
        history = detail.run.history
        assert history.status == "running" and history.losses == [0.9, 0.8]

        append_events(run_dir, step_event(3, 0.7))  # the other process writes on
        await wait_for(pilot, lambda: history.losses == [0.9, 0.8, 0.7], timeout=10)
        append_events(run_dir, RunStopped(time=FIXED_TIME + 9, step=3, checkpoint=None))
        await wait_for(pilot, lambda: history.status == "stopped", timeout=10)
        await wait_for(pilot, lambda: "stopped" in screen_text(app), timeout=10)

        # resumed by another process from its checkpoint at step 2: a new session, followed on the same screen
        resumed = dataclasses.replace(started, time=FIXED_TIME + 20, resumed_from_step=2)
        append_events(run_dir, resumed, step_event(3, 0.65), step_event(4, 0.6))
        await wait_for(pilot, lambda: history.status == "running" and history.steps == [1, 2, 3, 4], timeout=10)
        assert history.losses == [0.9, 0.8, 0.65, 0.6]
        append_events(run_dir, RunFinished(time=FIXED_TIME + 30, summary={"status": "finished"}))
        await wait_for(pilot, lambda: history.status == "finished" and "finished" in screen_text(app), timeout=10)
        await wait_for(pilot, lambda: list(detail.query_one(LossChart).series[0].losses) == history.losses, timeout=10)


async def test_an_open_run_whose_process_died_shows_interrupted(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, "killed", losses=[0.9, 0.8], status="running")
    app = make_app(runs_dir=tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await open_runs(app, pilot)
        detail = await open_run(app, pilot)
        assert detail.run.history.status == "running"
        process = subprocess.Popen([sys.executable, "-c", "pass"])
        process.wait()
        write_pid(run_dir, process.pid)  # the process training it is gone without a final event
        await wait_for(pilot, lambda: detail.run.history.status == "interrupted", timeout=10)
        await wait_for(pilot, lambda: "interrupted" in screen_text(app), timeout=10)


async def test_the_runs_and_compare_tables_fit_80_columns(tmp_path: Path) -> None:
    long = write_run(tmp_path, "a-run-with-a-rather-long-name", strategy="head", started=FIXED_TIME - 60)
    with_memory(long, 97 * 2**20, 100 * 2**20)
    write_run(tmp_path, "full", strategy="last_layers")
    app = make_app(runs_dir=tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_runs(app, pilot)
        header, *rows = screen_text(app).splitlines()[2:5]
        assert header.split() == ["run", "status", "strategy", "model", "best", "est/peak"]  # `started` is in names
        assert rows[0].split()[:2] == ["full-2026…8-202640", "finished"]  # names are cut in the middle
        assert rows[1].split()[0] == "a-run-wit…8-202640"
        assert rows[1].rstrip().endswith("acc 0.7500  0.97x")
        await pilot.resize_terminal(120, 24)
        await pilot.pause()
        header, row = screen_text(app).splitlines()[2:4]
        assert header.split()[-1] == "started" and "full-20260528-202640" in row and row.rstrip().endswith("20:26")

        await pilot.resize_terminal(80, 24)
        await pilot.press("space", "down", "space", "c")
        await pilot.pause()
        assert isinstance(app.screen, CompareScreen)
        lines = screen_text(app).splitlines()
        header = next(line for line in lines if line.split()[:1] == ["run"])
        assert header.split() == ["run", "strategy", "steps", "best", "samples/s", "time"]
        assert lines[lines.index(header) + 1].split()[1:] == ["last_layers", "6", "acc", "0.7500", "20.0", "0:12"]
