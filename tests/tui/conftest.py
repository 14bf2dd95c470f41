"""Shared setup of the app tests: the repository as working directory, UTC dates, tiny setups, fake run folders."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from engine.config import build_config, config_to_dict
from engine.events import Eval, RunFinished, RunStarted, Step
from engine.presets import resolve_preset
from tests.conftest import ROOT
from tui.app import FinetuiApp, create_app
from tui.form import with_value
from tui.presets import load_preset

FIXED_TIME = 1_780_000_000.0  # 2026-05-28 20:26:40 UTC
RUN_TIMEOUT_S = 120


@pytest.fixture(autouse=True)
def _repository_cwd_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Paths show relative to the repository, dates in UTC: the screens look the same on every machine."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    time.tzset()


def quickstart() -> dict[str, Any]:
    return load_preset(resolve_preset("quickstart"))


def tiny_setup(output_dir: Path, **train: Any) -> dict[str, Any]:
    """The quickstart preset on the tiny random BERT: a run takes a few seconds."""
    data = quickstart()
    data = with_value(data, "name", "tiny")
    data = with_value(data, "model.id", "builtin:tiny-bert")
    data = with_value(data, "data.max_train_samples", 48)
    data = with_value(data, "data.max_eval_samples", 16)
    data = with_value(data, "data.max_length", 32)
    settings = {"max_steps": 6, "logging_steps": 1, "batch_size": 8, "output_dir": str(output_dir)} | train
    for key, value in settings.items():
        data = with_value(data, f"train.{key}", value)
    return data


def make_app(setup: dict[str, Any] | None = None, **kwargs: Any) -> FinetuiApp:
    return create_app(setup=setup if setup is not None else quickstart(), cursor_blink=False, **kwargs)


def screen_text(app: FinetuiApp) -> str:
    """What the terminal shows, as plain text."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


def write_run(
    folder: Path,
    name: str,
    *,
    strategy: str = "full",
    losses: list[float] | None = None,
    status: str = "finished",
    accuracy: float = 0.75,
    test_accuracy: float | None = None,
    started: float = FIXED_TIME,
) -> Path:
    """A run directory as the engine writes it, with fixed times (for followed runs and snapshots)."""
    config = build_config({"name": name, "model": {"id": "builtin:tiny-bert"}, "strategy": {"kind": strategy}})
    run_dir = folder / f"{name}-20260528-202640"
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(tomli_w.dumps(config_to_dict(config)))
    losses = losses or [0.7, 0.62, 0.55, 0.5, 0.46, 0.43]
    events: list[Any] = [
        RunStarted(
            time=started,
            run_dir=str(run_dir),
            name=name,
            model="builtin:tiny-bert",
            strategy=strategy,
            task="classification",
            config=config_to_dict(config),
        )
    ]
    events += step_events(losses, started)
    summary = {"status": status, "strategy": strategy, "name": name, "train_runtime_s": 2.0 * len(losses)}
    if status == "finished":
        metrics = {"loss": losses[-1], "accuracy": accuracy, "f1": accuracy - 0.05}
        end = started + 2 * len(losses) + 1
        events.append(Eval(time=end, step=len(losses), epoch=1.0, split="validation", metrics=metrics))
        summary["validation"] = metrics
        if test_accuracy is not None:
            test = {"loss": losses[-1] + 0.02, "accuracy": test_accuracy, "f1": test_accuracy - 0.03}
            events.append(Eval(time=end, step=len(losses), epoch=1.0, split="test", metrics=test))
            summary["test"] = test
        events.append(RunFinished(time=end, summary=summary))
    with (run_dir / "events.jsonl").open("w") as handle:
        for event in events:
            handle.write(json.dumps(event.to_dict()) + "\n")
    if status != "running":
        (run_dir / "summary.json").write_text(json.dumps(summary))
    for path in (run_dir / "config.toml", run_dir):
        os.utime(path, (started, started))
    return run_dir


def with_memory(run_dir: Path, estimated: int, measured: int) -> None:
    """Add the memory record (`summary.json` `memory`) a finished run writes."""
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["memory"] = {"estimated": estimated, "measured": measured, "ratio": round(estimated / measured, 4)}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def step_events(losses: list[float], started: float) -> list[Step]:
    """One `step` event per loss, two seconds apart from `started`."""
    return [
        Step(
            time=started + 2 * index,
            step=index,
            max_steps=len(losses),
            epoch=index / len(losses),
            loss=loss,
            lr=1e-4 * (1 - index / len(losses)),
            grad_norm=1.0,
            samples_per_second=20.0,
            tokens_per_second=500.0,
            elapsed_s=2.0 * index,
            eta_s=2.0 * (len(losses) - index),
            memory_rss_mb=700.0,
        )
        for index, loss in enumerate(losses, start=1)
    ]


def plain(widget: Any) -> str:
    """The text a Label or Static shows, without markup."""
    visual = widget.visual
    return visual.plain if hasattr(visual, "plain") else str(visual)


async def wait_for(pilot: Any, condition: Callable[[], bool], timeout: float = RUN_TIMEOUT_S) -> None:
    """Let the app run until `condition()` holds (events from other threads and processes arrive asynchronously)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.05)


def append_events(run_dir: Path, *events: Any) -> None:
    """Append events to a run's events.jsonl, as the process training it does."""
    with (run_dir / "events.jsonl").open("a") as handle:
        for event in events:
            handle.write(json.dumps(event.to_dict()) + "\n")


def step_event(step: int, loss: float, max_steps: int = 4) -> Step:
    return Step(
        time=FIXED_TIME + 2 * step,
        step=step,
        max_steps=max_steps,
        epoch=step / max_steps,
        loss=loss,
        lr=1e-4,
        grad_norm=1.0,
        samples_per_second=20.0,
        tokens_per_second=500.0,
        elapsed_s=2.0 * step,
        eta_s=2.0 * (max_steps - step),
    )
