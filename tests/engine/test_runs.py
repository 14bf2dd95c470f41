"""Run directories: never reused, written atomically, and readable while another process writes them."""

from __future__ import annotations

from pathlib import Path

from engine.config import build_config
from engine.events import Log, Step
from engine.runs import EventFollower, create_run_dir, list_runs, load_run_config, write_summary
from engine.sinks import JsonlFileSink


def test_run_directories_are_never_reused(tmp_path: Path) -> None:
    config = build_config({"name": "same", "train": {"lr": 1e-3}})
    first, second = create_run_dir(config, tmp_path), create_run_dir(config, tmp_path)
    assert first != second and first.name.startswith("same-") and second.name.startswith(first.name)
    assert load_run_config(first) == config


def test_follower_returns_only_complete_new_lines(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    follower = EventFollower(run_dir)
    assert follower.poll() == []
    sink = JsonlFileSink(run_dir / "events.jsonl")
    sink.emit(Log(level="info", message="one"))
    assert [event.message for event in follower.poll()] == ["one"]
    step = Step(
        step=1, max_steps=2, epoch=0.5, loss=1.0, lr=1e-3, grad_norm=None,
        samples_per_second=1.0, tokens_per_second=1.0, elapsed_s=1.0, eta_s=1.0,
    )  # fmt: skip
    with (run_dir / "events.jsonl").open("a") as handle:
        handle.write('{"type": "log", "time": 1, "level": "info", "mess')
    assert follower.poll() == []
    with (run_dir / "events.jsonl").open("a") as handle:
        handle.write('age": "two"}\n')
    sink.emit(step)
    assert [event.type for event in follower.poll()] == ["log", "step"]
    sink.close()


def test_list_runs_reports_status_from_the_summary(tmp_path: Path) -> None:
    config = build_config({"name": "listed", "strategy": {"kind": "head"}})
    run_dir = create_run_dir(config, tmp_path)
    assert [(run.name, run.status, run.strategy) for run in list_runs(tmp_path)] == [("listed", "running", "head")]
    write_summary(run_dir, {"status": "finished"})
    assert list_runs(tmp_path)[0].status == "finished"
