"""Runs written by older finetui versions still open, replay and resume.

`tests/fixtures/run-0b7cde0/` holds a run folder written by finetui at commit 0b7cde0 (before the engine was split
into layers): `builtin:tiny-llama`, LoRA r=4, alpaca-style data (in `data/` beside it), max_steps 6, stopped at
step 3 with `checkpoint-3`. It was written as `/tmp/old-fixture/runs/<run>` with its data in `/tmp/old-fixture/data`,
and its files keep those absolute paths; the tests copy it into the same layout and put their folder in the paths.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.api import resume_training, run_training
from engine.events import RunFinished, RunStarted, RunStopped, Step
from engine.runs import list_runs, load_run_config, read_events, read_summary
from engine.sinks import ListSink
from engine.training import cpu_dropout
from tests.conftest import ROOT
from tui.history import RunHistory

FIXTURE = ROOT / "tests" / "fixtures" / "run-0b7cde0"
WRITTEN_AT = "/tmp/old-fixture"
RUN_NAME = "old-lora-20261202-103242"
TEXT_FILES = ("config.toml", "events.jsonl", "summary.json")


def relocated_fixture(folder: Path) -> Path:
    """A copy of the fixture in `folder` (its data in `data/`, the run in `runs/`), its paths pointing into the
    copy; the run directory."""
    shutil.copytree(FIXTURE / "data", folder / "data")
    run_dir = folder / "runs" / RUN_NAME
    shutil.copytree(FIXTURE / RUN_NAME, run_dir)
    for name in TEXT_FILES:
        path = run_dir / name
        path.write_text(path.read_text(encoding="utf-8").replace(WRITTEN_AT, str(folder)), encoding="utf-8")
    return run_dir


def test_an_old_run_is_listed_and_replayed(tmp_path: Path) -> None:
    run_dir = relocated_fixture(tmp_path)
    [listed] = list_runs(tmp_path / "runs")
    assert (listed.name, listed.status, listed.strategy, listed.model) == (
        "old-lora",
        "stopped",
        "lora",
        "builtin:tiny-llama",
    )
    history = RunHistory()
    for event in read_events(run_dir):
        history.apply(event)
    assert history.status == "stopped" and history.steps == [1, 2, 3]
    assert history.checkpoint == str(run_dir / "checkpoints" / "checkpoint-3")
    assert history.freeze_map is not None and history.freeze_map["trainable_params"] > 0


def test_an_old_stopped_run_resumes_to_the_uninterrupted_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = relocated_fixture(tmp_path / "old")
    sink = ListSink()
    resumed = resume_training(run_dir, sink)
    assert resumed.status == "finished", resumed.summary
    assert [event.resumed_from_step for event in sink.of_type(RunStarted)] == [3]
    assert [step.step for step in sink.of_type(Step)] == [4, 5, 6]
    events = read_events(run_dir)  # the old session, then the new one, in one file
    assert [type(event) for event in events if isinstance(event, RunStarted | RunStopped | RunFinished)] == [
        RunStarted,
        RunStopped,
        RunStarted,
        RunFinished,
    ]
    summary = read_summary(run_dir) or {}
    assert (summary["status"], summary["resumes"], summary["resumed_from_step"], summary["steps"]) == (
        "finished",
        1,
        3,
        6,
    )
    assert summary["cpu_dropout"] == "torch"  # the masks it began with, not BitDropout's

    # the fixture's small instruction set repeats some rows in validation: the data gate of a fresh run (newer than
    # the run) refuses that unless allowed; the resumed run warns instead
    # the old version drew torch's dropout masks from the first step
    fresh = load_run_config(run_dir, ["data.max_leak=1.0"])
    monkeypatch.setattr(cpu_dropout, "use_bit_dropout", lambda model: 0)
    uninterrupted = run_training(fresh, ListSink(), output_dir=tmp_path / "fresh")
    assert uninterrupted.status == "finished"
    assert resumed.summary["validation"]["loss"] == pytest.approx(uninterrupted.summary["validation"]["loss"], rel=1e-6)
    assert resumed.summary["test"]["loss"] == pytest.approx(uninterrupted.summary["test"]["loss"], rel=1e-6)
