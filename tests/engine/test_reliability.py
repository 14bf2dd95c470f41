"""Reliability: stop, kill -9, resume, detach/attach, training faults, safe loading.

The resume tests compare against an uninterrupted run of the same config: a resumed run must end with the
same metrics (model weights, optimizer, scheduler, RNG and data order all come back from the checkpoint).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.api import resume_training, run_training
from engine.config import build_config
from engine.events import Log, RunFailed, RunStarted, Step
from engine.runs import (
    EventFollower,
    checkpoint_step,
    complete_checkpoints,
    latest_checkpoint,
    list_runs,
    read_events,
    read_pid,
    read_summary,
    stops_on_signal,
    write_pid,
    write_summary,
)
from engine.sinks import JsonlFileSink, ListSink
from engine.training.hf_trainer import FinetuiTrainer
from tests.conftest import ROOT, quickstart_data

STEPS = 20  # 2 epochs of 160 sentences in batches of 16


def settings(kind: str, **train: Any) -> dict[str, Any]:
    return {
        "name": f"rel-{kind}",
        "model": {"id": "builtin:tiny-bert", "task": "classification"},
        "data": quickstart_data(max_train_samples=160),
        "strategy": {"kind": kind, "r": 4, "layers": 1},
        "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "logging_steps": 1, "save_steps": 2} | train,
    }


def config_for(kind: str, output_dir: Path, **train: Any):  # type: ignore[no-untyped-def]
    return build_config(settings(kind, output_dir=str(output_dir), **train))


def cli_args(kind: str, output_dir: Path) -> list[str]:
    """`finetui run` arguments that build exactly `config_for(kind, output_dir)`."""
    args = ["run", "--output-dir", str(output_dir), "--json"]
    for section, values in settings(kind).items():
        if isinstance(values, dict):
            args += [
                item for key, value in values.items() for item in ("--set", f"{section}.{key}={json.dumps(value)}")
            ]
        else:
            args += ["--set", f"{section}={json.dumps(values)}"]
    return args


_REFERENCES: dict[str, Any] = {}


def reference(kind: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[int, float]]:
    """The uninterrupted run of `settings(kind)`: its summary and the loss of every step (computed once)."""
    if kind not in _REFERENCES:
        sink = ListSink()
        result = run_training(config_for(kind, tmp_path_factory.mktemp(f"ref-{kind}")), sink)
        assert result.status == "finished", result.summary.get("error")
        _REFERENCES[kind] = (result.summary, {step.step: step.loss for step in sink.of_type(Step)})
    return _REFERENCES[kind]


def assert_same_metrics(summary: dict[str, Any], expected: dict[str, Any]) -> None:
    assert summary["status"] == "finished"
    assert summary["steps"] == expected["steps"] == STEPS
    for split in ("validation", "test"):
        assert summary[split] == pytest.approx(expected[split], rel=1e-6, abs=1e-7), split


def assert_readable(run_dir: Path) -> None:
    """What a kill -9 may leave: complete checkpoints only, whole JSON files, events that parse."""
    for checkpoint in complete_checkpoints(run_dir):
        names = {path.name for path in checkpoint.iterdir()}
        assert {"trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= names, names
        assert names & {"model.safetensors", "adapter_model.safetensors"}, names
        assert "training_args.bin" not in names
        json.loads((checkpoint / "trainer_state.json").read_text())
    summary = run_dir / "summary.json"
    if summary.exists():
        json.loads(summary.read_text())
    lines = (run_dir / "events.jsonl").read_bytes().split(b"\n")
    for line in lines[:-1]:  # every line but a last one being written parses
        json.loads(line)


# --- resume -------------------------------------------------------------------------------------------


def test_stopped_run_resumes_to_the_metrics_of_an_uninterrupted_run(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    expected, expected_losses = reference("full", tmp_path_factory)
    stop = threading.Event()

    class StopInSecondEpoch(ListSink):
        def emit(self, event):  # type: ignore[no-untyped-def]
            super().emit(event)
            if isinstance(event, Step) and event.step >= 13:
                stop.set()

    first = run_training(config_for("full", tmp_path), StopInSecondEpoch(), stop_event=stop)
    assert (first.status, first.exit_code) == ("stopped", 130)
    stopped_at = first.summary["steps"]
    assert latest_checkpoint(first.run_dir).name == f"checkpoint-{stopped_at}"
    assert len(complete_checkpoints(first.run_dir)) == 2  # train.save_total_limit
    # Debris of an interrupted write must be ignored and cleaned: a half-written checkpoint being staged.
    (first.run_dir / "checkpoints" / ".staging" / "checkpoint-99").mkdir(parents=True)

    sink = ListSink()
    resumed = resume_training(first.run_dir, sink)
    assert resumed.status == "finished", resumed.summary.get("error")
    assert_same_metrics(resumed.summary, expected)
    losses = {step.step: step.loss for step in sink.of_type(Step)}
    assert min(losses) == stopped_at + 1
    assert all(losses[step] == pytest.approx(expected_losses[step], rel=1e-6) for step in losses)
    assert not (first.run_dir / "checkpoints" / ".staging").exists()
    # the head was new when the run began, not when it resumed from its checkpoint
    assert [log.message for log in sink.of_type(Log) if "new weights" in log.message] == []

    written = read_events(first.run_dir)
    starts = [event for event in written if isinstance(event, RunStarted)]
    assert [start.resumed_from_step for start in starts] == [None, stopped_at]
    assert [event.type for event in written].count("run_stopped") == 1 and written[-1].type == "run_finished"
    assert read_summary(first.run_dir)["resumes"] == 1
    assert (first.run_dir / "model" / "model.safetensors").is_file()
    assert not (first.run_dir / "model" / "training_args.bin").exists()
    assert not (first.run_dir / "pid").exists()


def test_resume_may_extend_a_run_and_change_saving_but_not_what_the_checkpoint_depends_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.cli import main

    stop = threading.Event()

    class StopAtStep6(ListSink):
        def emit(self, event):  # type: ignore[no-untyped-def]
            super().emit(event)
            if isinstance(event, Step) and event.step >= 6:
                stop.set()

    first = run_training(config_for("full", tmp_path, epochs=1), StopAtStep6(), stop_event=stop)
    assert first.status == "stopped"
    config_text = (first.run_dir / "config.toml").read_text()

    assert main(["run", "--resume", str(first.run_dir), "--set", "train.lr=0.1"]) == 2
    assert "--resume cannot change train.lr" in capsys.readouterr().err
    assert (first.run_dir / "config.toml").read_text() == config_text

    extend = ["--set", "train.epochs=2", "--set", "train.save_total_limit=0"]
    code = main(["run", "--resume", str(first.run_dir), "--json", *extend])
    assert code == 0, capsys.readouterr().err
    summary = read_summary(first.run_dir)
    assert (summary["status"], summary["steps"]) == ("finished", STEPS)
    kept = [checkpoint_step(c) for c in complete_checkpoints(first.run_dir)]
    assert kept == [6, 7, *range(8, STEPS + 1, 2)]  # the 2 kept at the stop (limit 2), then every one (limit 0)
    resumed_config = (first.run_dir / "config.toml").read_text()
    assert "epochs = 2" in resumed_config and "save_total_limit = 0" in resumed_config


@pytest.mark.parametrize(
    ("stop_at", "save_steps"),
    [(10, 4), (10, 2), (20, 4)],
    ids=["epoch-end-eval", "epoch-end-eval-after-a-checkpoint", "final-eval"],
)
def test_a_stop_during_evaluation_checkpoints_and_resumes_exactly(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    stop_at: int,
    save_steps: int,
) -> None:
    """Stop requested while evaluating: the epoch-end evaluation (with no checkpoint yet at that step, or just
    after one: evaluation must not move the RNG the next epoch starts from), or the final one."""
    expected, _ = reference("full", tmp_path_factory)
    stop = threading.Event()
    original = FinetuiTrainer.prediction_step

    def stop_while_evaluating(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.state.global_step == stop_at:
            stop.set()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FinetuiTrainer, "prediction_step", stop_while_evaluating)
    sink = ListSink()
    first = run_training(config_for("full", tmp_path, save_steps=save_steps), sink, stop_event=stop)
    assert first.status == "stopped"
    stopped = sink.events[-1]
    assert (stopped.type, stopped.step) == ("run_stopped", stop_at)
    assert stopped.checkpoint.endswith(f"checkpoint-{stop_at}")
    monkeypatch.undo()

    resumed = resume_training(first.run_dir, ListSink())
    assert_same_metrics(resumed.summary, expected)


def _start(args: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tui.launcher", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        **kwargs,
    )


def _read_until(process: subprocess.Popen[str], done: Any, timeout: float = 240) -> list[dict[str, Any]]:
    """JSON events from the process's stdout until `done(event)` is true or the process ends."""
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    events = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            event = json.loads(line)
            events.append(event)
            if done(event):
                break
    finally:
        watchdog.cancel()
    return events


def _finish(process: subprocess.Popen[str]) -> tuple[int, list[dict[str, Any]], str]:
    out, err = process.communicate(timeout=240)
    return process.returncode, [json.loads(line) for line in out.splitlines()], err


def test_kill_9_sigint_and_sigterm_at_random_moments_then_resume_ends_like_an_uninterrupted_run(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A real `finetui run --json` is SIGKILLed twice at seeded random moments (while starting up, then at a
    random step, checkpoints being written every 2 steps), then stopped with SIGINT (exit 130) and SIGTERM
    (exit 143) at random steps, and resumed with `--resume` after each: it ends with the metrics of an
    uninterrupted run."""
    expected, _ = reference("lora", tmp_path_factory)
    rng = random.Random(int(os.environ.get("FINETUI_KILL_SEED", "20240605")))
    process = _start(cli_args("lora", tmp_path))
    started = _read_until(process, lambda event: event["type"] == "run_started")
    run_dir = Path(started[0]["run_dir"])
    interruptions = [
        ("startup", None, signal.SIGKILL),
        ("step", rng.randint(2, 7), signal.SIGKILL),
        ("step", rng.randint(8, 12), signal.SIGINT),
        ("step", rng.randint(14, 18), signal.SIGTERM),
    ]
    resumed_from = []
    for moment, step, signum in interruptions:
        if moment == "step":
            _read_until(process, lambda event, step=step: event["type"] == "step" and event["step"] >= step)
        if signum == signal.SIGKILL:
            time.sleep(rng.uniform(0.0, 0.4))
            process.kill()
            process.wait()
        else:
            process.send_signal(signum)
            code, rest, err = _finish(process)
            assert code == 128 + signum, err
            assert rest[-1]["type"] == "run_stopped" and Path(rest[-1]["checkpoint"]).is_dir()
            assert rest[-1]["step"] >= step and read_summary(run_dir)["status"] == "stopped"
        assert_readable(run_dir)
        process = _start(["run", "--resume", str(run_dir), "--json"])
        first = _read_until(process, lambda event: event["type"] == "run_started")[-1]
        resumed_from.append(first["resumed_from_step"])
    code, rest, err = _finish(process)
    assert code == 0, err
    assert rest[-1]["type"] == "run_finished"
    assert resumed_from[0] in (0, 2, 4) and resumed_from == sorted(resumed_from) and resumed_from[3] >= 14
    assert_same_metrics(read_summary(run_dir), expected)
    assert read_summary(run_dir)["cpu_dropout"] == "bits"  # every resume kept the masks the run began with
    assert_readable(run_dir)
    assert len(complete_checkpoints(run_dir)) == 2
    assert [event.type for event in read_events(run_dir)].count("run_started") == 5


def test_detached_run_ignores_sighup_and_attach_follows_and_stops_it(tmp_path: Path) -> None:
    config = settings("head", epochs=20, save_steps=5)
    args = ["run", "--output-dir", str(tmp_path)]
    for section in ("model", "data", "strategy", "train"):
        args += [
            item for key, value in config[section].items() for item in ("--set", f"{section}.{key}={json.dumps(value)}")
        ]
    detach = subprocess.run(
        [sys.executable, "-m", "tui.launcher", *args, "--detach"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert detach.returncode == 0, detach.stderr
    run_dir = Path(detach.stdout.strip())
    assert run_dir.is_dir() and "finetui attach" in detach.stderr
    pid = read_pid(run_dir)
    assert pid is not None and stops_on_signal(run_dir)
    assert os.getsid(pid) == pid  # its own session: no controlling terminal to lose

    attach = _start(["attach", str(run_dir), "--json"])
    _read_until(attach, lambda event: event["type"] == "step" and event["step"] >= 2)
    os.kill(pid, signal.SIGHUP)  # a dropped terminal: ignored
    time.sleep(0.5)
    assert (run_dir / "pid").exists() and read_summary(run_dir)["status"] == "running"
    attach.send_signal(signal.SIGINT)  # Ctrl-C in attach asks the detached run to stop
    code, rest, err = _finish(attach)
    assert code == 130, err
    assert rest[-1]["type"] == "run_stopped"
    assert "asked the run to stop" in err
    summary = read_summary(run_dir)
    assert summary["status"] == "stopped" and summary["steps"] >= 2
    deadline = time.monotonic() + 30
    while (run_dir / "pid").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (run_dir / "pid").exists()
    assert "stopped at step" in (run_dir / "run.log").read_text()
    assert [run.status for run in list_runs(tmp_path)] == ["stopped"]


def test_request_stop_reaches_an_in_process_run_without_signalling_its_host(tmp_path: Path) -> None:
    """A run hosted by a long-lived process (the TUI) is stopped through the `stop` file, never by SIGINT."""
    from engine.launch.follow import request_stop

    asked: list[bool] = []

    class AskToStop(ListSink):
        def emit(self, event):  # type: ignore[no-untyped-def]
            super().emit(event)
            if isinstance(event, Step) and not asked:
                asked.append(request_stop(Path(self.events[0].run_dir)))

    previous = signal.signal(signal.SIGINT, lambda *_: pytest.fail("the host process got SIGINT"))
    try:
        result = run_training(config_for("head", tmp_path), AskToStop())
    finally:
        signal.signal(signal.SIGINT, previous)
    assert asked == [True]
    assert result.status == "stopped" and result.summary["steps"] == 2
    assert not (result.run_dir / "stop").exists() and not (result.run_dir / "pid").exists()


# --- atomic files -------------------------------------------------------------------------------------


def test_event_file_ends_a_line_cut_short_by_a_kill(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "log", "time": 1, "level": "info", "message": "whole"}\n{"type": "log", "ti')
    sink = JsonlFileSink(path)
    sink.emit(Log(level="info", message="after resume"))
    sink.close()
    assert [event.message for event in EventFollower(tmp_path).poll()] == ["whole", "after resume"]


def test_debris_of_interrupted_writes_is_cleaned_and_a_moved_aside_folder_put_back(tmp_path: Path) -> None:
    from engine.runs import clean_partial_writes

    checkpoints = tmp_path / "checkpoints"
    for name in (".old-checkpoint-6", ".trash-checkpoint-2", ".staging/checkpoint-8", "checkpoint-4"):
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / "trainer_state.json").write_text("{}")
    (tmp_path / ".model.staging").mkdir()
    (tmp_path / ".old-model").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / ".summary.json.x1.tmp").write_text("{")
    clean_partial_writes(tmp_path)
    assert sorted(path.name for path in checkpoints.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoints", "model"]
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]


def test_a_run_whose_process_died_is_listed_as_interrupted(tmp_path: Path) -> None:
    from engine.runs import create_run_dir

    run_dir = create_run_dir(build_config({"name": "dead"}), tmp_path)
    write_summary(run_dir, {"status": "running"})
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    write_pid(run_dir, child.pid)
    assert list_runs(tmp_path)[0].status == "interrupted"


# --- training faults ----------------------------------------------------------------------------------


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = FinetuiTrainer.compute_loss

    def diverge_at_step_5(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        result = original(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.state.global_step < 4:
            return result
        return (result[0] * float("nan"), result[1]) if return_outputs else result * float("nan")

    monkeypatch.setattr(FinetuiTrainer, "compute_loss", diverge_at_step_5)
    sink = ListSink()
    result = run_training(config_for("full", tmp_path, save_steps=2), sink)
    assert (result.status, result.exit_code) == ("failed", 1)
    failed = sink.of_type(RunFailed)[0]
    assert (failed.step, failed.reason, failed.user_error) == (5, "nan_loss", False)
    assert "loss became nan at step 5" in failed.error and "train.lr=0.003" in failed.error
    assert "warmup" in failed.error and failed.checkpoint.endswith("checkpoint-4") and "\n" not in failed.error
    assert [path.name for path in complete_checkpoints(result.run_dir)] == ["checkpoint-2", "checkpoint-4"]
    assert read_summary(result.run_dir)["reason"] == "nan_loss"


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory."), MemoryError()])
def test_out_of_memory_suggests_concrete_settings_from_the_estimate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    original = FinetuiTrainer.training_step

    def fail_at_step_2(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.state.global_step == 1:
            raise error
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FinetuiTrainer, "training_step", fail_at_step_2)
    config = build_config(
        settings("full", output_dir=str(tmp_path)) | {"data": settings("full")["data"] | {"max_length": 128}}
    )
    result = run_training(config, ListSink())
    assert (result.status, result.exit_code) == ("failed", 1)
    message = result.summary["error"]
    assert message.startswith("out of host memory at step 2 (estimated need ~")
    for setting in (
        "--set train.batch_size=8 --set train.grad_accum=2 (~",
        "--set train.gradient_checkpointing=true (~",
        "--set data.max_length=64 (~",
        "--strategy lora",
    ):
        assert setting in message, message
    assert result.summary["reason"] == "out_of_memory"


def test_a_tokenizer_error_names_the_offending_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import models
    from engine.config import ModelConfig

    tokenizer_class = type(models.load_tokenizer(ModelConfig(id="builtin:tiny-bert")))
    original = tokenizer_class.__call__

    def fragile(self, text, *args, **kwargs):  # type: ignore[no-untyped-def]
        if any("BOOM" in item for item in (text if isinstance(text, list) else [text])):
            raise ValueError("cannot encode this")
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(tokenizer_class, "__call__", fragile)
    train = tmp_path / "train.jsonl"
    rows = [{"text": f"fine sentence {i}", "label": i % 2} for i in range(12)]
    rows[7]["text"] = "this one goes BOOM"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = build_config(settings("head", output_dir=str(tmp_path / "runs")) | {"data": {"train": str(train)}})
    result = run_training(config, ListSink())
    assert (result.status, result.exit_code) == ("failed", 2)
    message = result.summary["error"]
    assert "cannot be tokenised (ValueError: cannot encode this)" in message
    assert '"text": "this one goes BOOM"' in message and "\n" not in message


# --- safe by default ----------------------------------------------------------------------------------


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))  # type: ignore[attr-defined]


def test_pickled_checkpoint_files_never_run_code_on_resume(tmp_path: Path) -> None:
    result = run_training(config_for("head", tmp_path, max_steps=2, save_steps=1), ListSink())
    assert result.status == "finished", result.summary.get("error")
    run_dir = result.run_dir
    (checkpoint_1, checkpoint_2) = complete_checkpoints(run_dir)
    import shutil

    shutil.rmtree(checkpoint_2)
    shutil.rmtree(run_dir / "model")
    write_summary(run_dir, read_summary(run_dir) | {"status": "stopped"})
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker  # type: ignore[attr-defined]
    torch.save(payload, checkpoint_1 / "rng_state.pth")

    assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(checkpoint_1 / "rng_state.pth", weights_only=False)  # forced safe whatever the caller asks
    resumed = resume_training(run_dir, ListSink())
    assert resumed.status == "failed" and "Weights only load failed" in resumed.summary["error"]
    assert not marker.exists()


def test_engine_never_unpickles_and_presets_are_data() -> None:
    engine = ROOT / "engine"
    for path in engine.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import pickle" not in text and "joblib" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line}"
    for preset in (ROOT / "presets").glob("*"):
        assert preset.is_dir() or preset.suffix == ".toml", preset
        if preset.suffix == ".toml":
            assert "trust_remote_code" not in preset.read_text(), preset


def test_trust_remote_code_is_off_by_default_and_warned_about_when_on(tmp_path: Path) -> None:
    assert build_config({}).model.trust_remote_code is False
    sink = ListSink()
    config = build_config(
        settings("head", output_dir=str(tmp_path), max_steps=1)
        | {"model": {"id": "builtin:tiny-bert", "trust_remote_code": True}}
    )
    result = run_training(config, sink)
    assert result.status == "finished", result.summary.get("error")
    warnings = [event.message for event in sink.of_type(Log) if event.level == "warning"]
    assert any("trust_remote_code is on" in message for message in warnings)
