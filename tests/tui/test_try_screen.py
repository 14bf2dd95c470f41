"""Trying runs in the app: the try screen (answers streamed, the base model beside, label bars, stop, cancel) and
the runs screen's export dialog."""

from __future__ import annotations

import threading
from pathlib import Path

from textual.widgets import Input, Label, ProgressBar, Static

from engine.inference import export
from engine.inference.loading import load_run
from engine.inference.predict import answer, request_rows
from engine.runs import read_summary
from engine.views import STOP_REASONS
from tests.engine.test_old_runs import RUN_NAME, relocated_fixture
from tests.tui.conftest import RUN_TIMEOUT_S, make_app, plain, tiny_setup, wait_for
from tui.app import FinetuiApp
from tui.screens.export import ExportScreen
from tui.screens.runs import RunsScreen
from tui.screens.train import TrainScreen
from tui.screens.try_run import BASE, FINE_TUNED, SETTINGS, TryScreen

PROMPT = "Repeat the word river 3 times."


async def open_try(app: FinetuiApp, pilot) -> TryScreen:  # type: ignore[no-untyped-def]
    """From the runs screen, try the run under the cursor and wait until it is loaded."""
    await pilot.press("f4")
    await app.workers.wait_for_complete()
    await pilot.pause()
    assert isinstance(app.screen, RunsScreen)
    await pilot.press("t")
    screen = app.screen
    assert isinstance(screen, TryScreen)
    await wait_for(pilot, lambda: screen.loaded is not None)
    return screen


def pane(screen: TryScreen, name: str) -> tuple[str, str]:
    """A pane's title and text, as shown."""
    return plain(screen.query_one(f"#title-{name}", Label)), str(screen.query_one(f"#text-{name}", Static).visual)


async def ask(screen: TryScreen, pilot, text: str) -> None:  # type: ignore[no-untyped-def]
    screen.query_one(Input).value = text
    await pilot.press("enter")
    await wait_for(pilot, lambda: not screen.answering)
    await pilot.pause()


async def test_answers_stream_in_and_the_base_model_answers_beside(tmp_path: Path) -> None:
    run_dir = relocated_fixture(tmp_path)
    loaded = load_run(run_dir)
    rows = request_rows(loaded, prompt=PROMPT)
    (tuned,) = answer(loaded, rows, SETTINGS)
    (base,) = answer(loaded, rows, SETTINGS, base=True)
    app = make_app(runs_dir=run_dir.parent)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_try(app, pilot)
        assert "using its last checkpoint, checkpoint-3" in plain(screen.query_one("#try-status", Label))
        await ask(screen, pilot, PROMPT)
        title, text = pane(screen, FINE_TUNED)
        assert text == f"{tuned.text}\n({STOP_REASONS[tuned.stop_reason]})"
        assert title.startswith(f"{FINE_TUNED} · {tuned.tokens} tok · ") and title.endswith(" tok/s")
        assert not screen.query_one(f"#pane-{BASE}").display and plain(screen.query_one("#try-asked", Label)) == (
            f"> {PROMPT}"
        )
        await pilot.press("ctrl+b")
        await ask(screen, pilot, PROMPT)
        assert screen.query_one(f"#pane-{BASE}").display
        assert pane(screen, BASE)[1] == f"{base.text}\n({STOP_REASONS[base.stop_reason]})"
        assert pane(screen, FINE_TUNED)[1].startswith(tuned.text)
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)


async def test_escape_stops_an_answer_then_goes_back_and_cancels_a_load(tmp_path: Path) -> None:
    run_dir = relocated_fixture(tmp_path)
    app = make_app(runs_dir=run_dir.parent)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_try(app, pilot)
        await pilot.press("ctrl+b")
        screen.query_one(Input).value = "Tell me a long story."
        await pilot.press("enter")
        await wait_for(pilot, lambda: "tok/s" in pane(screen, FINE_TUNED)[0] + pane(screen, BASE)[0])
        await pilot.press("escape")  # stops the answer, keeps the screen
        await wait_for(pilot, lambda: not screen.answering)
        await pilot.pause()
        assert app.screen is screen
        texts = pane(screen, FINE_TUNED)[1] + pane(screen, BASE)[1]
        assert "(stopped)" in texts and "(reached max_new_tokens)" not in pane(screen, BASE)[1]
        assert pane(screen, BASE)[0] == f"{BASE} · no answer" or pane(screen, BASE)[1].endswith("(stopped)")
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)
        await pilot.press("t")  # and away again before it has loaded
        assert isinstance(app.screen, TryScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, RunsScreen)


async def test_the_run_just_trained_is_tried_from_the_training_screen_with_label_bars(tmp_path: Path) -> None:
    app = make_app(tiny_setup(tmp_path))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f3")
        await pilot.press("t")
        assert isinstance(app.screen, TrainScreen)  # no run yet: a notice, nothing opens
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.session.history is not None and app.session.history.status == "finished")
        await pilot.press("t")
        screen = app.screen
        assert isinstance(screen, TryScreen) and screen.run_dir == Path(app.session.history.run_dir or "")
        await wait_for(pilot, lambda: screen.loaded is not None)
        await ask(screen, pilot, "A wonderful, moving film.")
        title, bars = pane(screen, FINE_TUNED)
        assert title == "fine-tuned · label probabilities"
        labels = read_summary(screen.run_dir)["label_names"]
        assert sorted(line.split()[0] for line in bars.splitlines()) == sorted(labels)
        assert "█" in bars or "░" in bars
        await pilot.press("ctrl+b")
        assert not screen.query_one(f"#pane-{BASE}").display  # a classifier's base has no trained head


async def test_the_runs_screen_exports_a_run_with_progress(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    run_dir = relocated_fixture(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    app = make_app(runs_dir=run_dir.parent)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f4")
        await app.workers.wait_for_complete()
        await pilot.press("e")
        dialog = app.screen
        assert isinstance(dialog, ExportScreen)
        assert dialog.query_one(Input).value == f"exports/{RUN_NAME}"
        stage = dialog.query_one("#export-stage", Label)
        dialog.query_one(Input).value = str(tmp_path / "taken")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "exists and is not an empty folder" in plain(stage))
        assert not dialog.running
        await wait_for(pilot, lambda: app.focused is dialog.query_one(Input))  # the folder can be changed again
        started = threading.Event()  # the real export waits for it, so the dialog is seen while it runs
        real_export = export.export_run
        monkeypatch.setattr(export, "export_run", lambda *a, **k: started.wait(RUN_TIMEOUT_S) and real_export(*a, **k))
        dialog.query_one(Input).value = str(tmp_path / "exported")
        await pilot.press("enter")
        assert dialog.running and dialog.query_one(Input).disabled
        await pilot.press("escape")  # refused while it runs
        assert app.screen is dialog
        started.set()
        await wait_for(pilot, lambda: plain(stage).startswith("exported to"))
        assert plain(stage).startswith(f"exported to {tmp_path / 'exported'}") and not dialog.running
        assert (tmp_path / "exported" / "model.safetensors").is_file()
        progress = dialog.query_one(ProgressBar)
        assert progress.progress == progress.total
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)
