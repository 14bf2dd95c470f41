"""Sample answers in the app (issue 12): the latest under the curves, every step of them from the runs screen, and
the generation metric's curve beside the validation loss; at 80x24."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.events import Eval, RunFinished, Samples
from engine.runs import EventFollower
from tests.tui.conftest import FIXED_TIME, append_events, make_app, screen_text, write_run
from tui.history import RunHistory
from tui.screens.runs import RunDetailScreen, SamplesScreen
from tui.screens.train import TrainScreen
from tui.widgets.run_view import LossChart, RunView

PROMPTS = ["Is this review positive or negative: a gorgeous, witty film", "Say hello."]
ANSWERS = {2: ["The review", "hello hello"], 4: ["negative", "Hello!"], 6: ["positive", "Hello."]}
SCORES = {2: 0.25, 4: 0.5, 6: 0.75}


def write_sampled_run(folder: Path) -> Path:
    """A finished causal run whose evaluations at steps 2, 4 and 6 answered two sample prompts."""
    run_dir = write_run(folder, "sampled", strategy="lora", status="running")
    events: list[Samples | Eval | RunFinished] = []
    for step, answers in ANSWERS.items():
        at = FIXED_TIME + 2 * step + 0.5
        for index, (prompt, output) in enumerate(zip(PROMPTS, answers, strict=True)):
            events.append(Samples(time=at, step=step, prompt=prompt, output=output, index=index, seconds=1.5))
        metrics = {"loss": 0.9 - step / 10, "generation_exact": SCORES[step], "generation_s": 1.5}
        events.append(Eval(time=at, step=step, epoch=step / 6, split="validation", metrics=metrics))
    summary = {"status": "finished", "strategy": "lora", "name": "sampled", "train_runtime_s": 12.0}
    events.append(RunFinished(time=FIXED_TIME + 13, summary=summary | {"validation": events[-1].metrics}))
    append_events(run_dir, *events)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def sampled_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return write_sampled_run(tmp_path / "runs")


async def open_sampled_run(pilot) -> None:  # type: ignore[no-untyped-def]
    await pilot.press("f4")
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    await pilot.press("enter")
    await pilot.pause()
    await pilot.pause(0.2)


async def test_the_runs_screen_shows_the_latest_samples_and_every_step_of_them(sampled_here: Path) -> None:
    app = make_app(runs_dir=Path("runs"))
    async with app.run_test(size=(80, 24)) as pilot:
        await open_sampled_run(pilot)
        assert isinstance(app.screen, RunDetailScreen)
        shown = screen_text(app)
        assert "samples @ step 6" in shown
        assert "→ positive" in shown and "Say hello. → Hello." in shown
        chart = app.screen.query_one(LossChart)
        assert chart.series[0].generation == ("generation_exact", [2, 4, 6], [0.25, 0.5, 0.75])
        await pilot.press("g")
        await pilot.pause()
        assert isinstance(app.screen, SamplesScreen)
        steps = screen_text(app)
        for step, (first, second) in ANSWERS.items():
            assert f"step {step}  {first}" in steps and f"step {step}  {second}" in steps
        assert steps.index("step 2  The review") < steps.index("step 4  negative") < steps.index("step 6  positive")
        await pilot.press("escape")
        assert isinstance(app.screen, RunDetailScreen)


async def test_the_training_screen_shows_the_latest_samples_under_the_curves(sampled_here: Path) -> None:
    history = RunHistory()
    for event in EventFollower(next(Path("runs").iterdir())).poll():
        history.apply(event)
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f3")
        await pilot.pause()
        assert isinstance(app.screen, TrainScreen)
        app.screen.run_started(history)  # what the screen does when the app's run starts
        await pilot.pause()
        view = app.screen.query_one(RunView)
        shown = screen_text(app)
        assert "samples @ step 6" in shown and "Say hello. → Hello." in shown
        samples, chart = view.query_one("#run-samples"), view.query_one(LossChart)
        assert samples.region.y >= chart.region.bottom and samples.region.height == 3  # under the curves
        assert chart.series[0].generation is not None


def test_a_run_with_samples_at_80x24(snap_compare, sampled_here: Path) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(make_app(runs_dir=Path("runs")), terminal_size=(80, 24), run_before=open_sampled_run)


def test_the_samples_of_a_run_step_by_step_at_80x24(snap_compare, sampled_here: Path) -> None:  # type: ignore[no-untyped-def]
    async def open_samples(pilot) -> None:  # type: ignore[no-untyped-def]
        await open_sampled_run(pilot)
        await pilot.press("g")
        await pilot.pause()

    assert snap_compare(make_app(runs_dir=Path("runs")), terminal_size=(80, 24), run_before=open_samples)
