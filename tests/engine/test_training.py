"""End-to-end runs of every strategy on tiny models: events in order, loss going down, a saved, re-scorable run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.api import run_training
from engine.config import build_config
from engine.events import Checkpoint, Eval, FreezeMapReady, Log, RunFinished, RunStarted, Step, event_from_dict
from engine.inference.evaluate import evaluate_run
from engine.runs import read_events, read_summary
from engine.sinks import ListSink
from tests.conftest import QUICKSTART_DATA, quickstart_data


def classification_config(tmp_path: Path, kind: str, model: str = "builtin:tiny-bert", **train: object):
    return build_config(
        {
            "name": f"tiny-{kind}",
            "model": {"id": model, "task": "classification"},
            "data": quickstart_data(),
            "strategy": {"kind": kind, "layers": 1, "r": 4},
            "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "logging_steps": 4, "output_dir": str(tmp_path)}
            | train,
        }
    )


def assert_events_in_order(sink: ListSink) -> None:
    types = [event.type for event in sink.events]
    assert types[0] == "run_started"
    assert types[-1] == "run_finished"
    assert types.index("freeze_map") < types.index("step") < types.index("eval")
    steps = [event.step for event in sink.of_type(Step)]
    assert steps == sorted(steps)


def mean_loss(steps: list[Step]) -> float:
    return sum(step.loss for step in steps) / len(steps)


@pytest.mark.parametrize(
    ("kind", "model", "saved_file"),
    [
        ("head", "builtin:tiny-distilbert", "model.safetensors"),
        ("last_layers", "builtin:tiny-bert", "model.safetensors"),
        ("full", "builtin:tiny-bert", "model.safetensors"),
        ("lora", "builtin:tiny-bert", "adapter_model.safetensors"),
        ("dora", "builtin:tiny-distilbert", "adapter_model.safetensors"),
        # bitsandbytes' CPU 4-bit kernels need layers at least 64 wide: tiny-llama is.
        ("qlora", "builtin:tiny-llama", "adapter_model.safetensors"),
    ],
)
def test_strategy_trains_saves_and_rescores(tmp_path: Path, kind: str, model: str, saved_file: str) -> None:
    sink = ListSink()
    # 64 sentences x 8 epochs: tiny random models memorise them, so the loss falls for every strategy and seed
    # (on all 320 x 3 epochs they stay at chance and whether the last losses beat the first is a coin flip).
    config = classification_config(tmp_path, kind, model, epochs=8).model_copy(deep=True)
    config.data.max_train_samples = 64
    result = run_training(config, sink)
    assert result.status == "finished", result.summary.get("error")
    assert_events_in_order(sink)

    steps = sink.of_type(Step)
    assert len(steps) >= 4
    assert mean_loss(steps[-2:]) < mean_loss(steps[:2])

    freeze_map = sink.of_type(FreezeMapReady)[0].freeze_map
    summary = read_summary(result.run_dir)
    assert summary is not None
    assert summary["status"] == "finished"
    assert summary["strategy"] == kind
    assert summary["trainable_params"] == freeze_map["trainable_params"]
    assert 0 < summary["trainable_params"] <= summary["total_params"]
    assert (kind == "full") == (summary["trainable_params"] == summary["total_params"])
    assert set(summary["validation"]) >= {"accuracy", "f1", "loss"}
    assert summary["label_names"] == ["negative", "positive"]
    assert (result.run_dir / "model" / saved_file).is_file()

    written = read_events(result.run_dir)
    assert [event.type for event in written] == [event.type for event in sink.events]
    rescored = evaluate_run(result.run_dir, str(QUICKSTART_DATA / "test.jsonl"))
    assert rescored["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert rescored["examples"] == 80


def test_full_fine_tuning_learns_the_training_set(tmp_path: Path) -> None:
    """A tiny random model cannot generalise from 320 sentences, but it must fit them: loss falls far."""
    sink = ListSink()
    result = run_training(classification_config(tmp_path, "full", epochs=8, logging_steps=10), sink)
    steps = sink.of_type(Step)
    assert result.status == "finished"
    assert steps[-1].loss < 0.5 * steps[0].loss
    assert steps[-1].samples_per_second > 0 and steps[-1].tokens_per_second > 0
    assert steps[-1].eta_s is not None and steps[-1].max_steps == 160
    # The last epoch's evaluation is the final one: the validation set is not scored twice.
    assert [(e.step, e.split) for e in sink.of_type(Eval)] == [
        (s, "validation") for s in (20, 40, 60, 80, 100, 120, 140, 160)
    ] + [(160, "test")]
    # transformers' multi-line LOAD REPORT reaches the log as one line naming the new head.
    (report,) = [
        log.message for log in sink.of_type(Log) if "LOAD REPORT" in log.message or "new weights" in log.message
    ]
    assert (
        "BertForSequenceClassification from" in report
        and "new weights, initialised for this task: classifier." in report
    )
    assert "\n" not in report and result.summary["validation"] == sink.of_type(Eval)[-2].metrics


def test_feature_strategy_fits_a_classifier_and_rescores(tmp_path: Path) -> None:
    sink = ListSink()
    result = run_training(classification_config(tmp_path, "feature"), sink)
    assert result.status == "finished", result.summary.get("error")
    evals = {event.split: event.metrics for event in sink.of_type(Eval)}
    assert set(evals) == {"validation", "test"}
    summary = read_summary(result.run_dir)
    assert summary is not None and summary["trainable_params"] == 0
    assert evaluate_run(result.run_dir, str(QUICKSTART_DATA / "test.jsonl"))["accuracy"] == pytest.approx(
        evals["test"]["accuracy"]
    )


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_causal_instruction_tuning_lowers_the_loss(tmp_path: Path, shared_data: Path, kind: str) -> None:
    config = build_config(
        {
            "name": f"tiny-causal-{kind}",
            "model": {"id": "builtin:tiny-llama"},
            "data": {
                "train": str(shared_data / "alpaca_5000" / "alpaca_5000.json"),
                "max_length": 384,  # tiny-llama's tokenizer is byte-level: the Alpaca prompt alone is ~200 tokens
                "max_train_samples": 64,
                "max_eval_samples": 16,
            },
            "strategy": {"kind": kind, "target_modules": "all-linear"},
            "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "logging_steps": 2, "output_dir": str(tmp_path)},
        }
    )
    sink = ListSink()
    result = run_training(config, sink)
    assert result.status == "finished", result.summary.get("error")
    assert result.summary["task"] == "causal"
    steps = sink.of_type(Step)
    assert mean_loss(steps[-2:]) < mean_loss(steps[:2])
    validation = result.summary["validation"]
    assert validation["perplexity"] == pytest.approx(2.718281828 ** validation["loss"], rel=1e-6)


def test_stop_request_checkpoints_and_records_run_stopped(tmp_path: Path) -> None:
    import threading

    stop = threading.Event()

    class StopAfterFirstStep(ListSink):
        def emit(self, event):  # type: ignore[no-untyped-def]
            super().emit(event)
            if isinstance(event, Step):
                stop.set()

    sink = StopAfterFirstStep()
    result = run_training(classification_config(tmp_path, "lora", logging_steps=1), sink, stop_event=stop)
    assert result.status == "stopped"
    assert sink.events[-1].type == "run_stopped"
    assert sink.events[-1].checkpoint is not None and Path(sink.events[-1].checkpoint).is_dir()
    assert sink.of_type(Checkpoint)
    assert read_summary(result.run_dir)["status"] == "stopped"


def test_bad_data_fails_the_run_with_one_line_and_keeps_the_directory(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": "oops", "label": \n')
    config = classification_config(tmp_path, "head").model_copy(deep=True)
    config.data.train = str(bad)
    sink = ListSink()
    result = run_training(config, sink)
    assert (result.status, result.exit_code) == ("failed", 2)
    failed = sink.events[-1]
    assert failed.type == "run_failed" and failed.user_error
    assert "line 2" in failed.error and "\n" not in failed.error
    assert json.loads((result.run_dir / "summary.json").read_text())["status"] == "failed"
    assert isinstance(sink.events[0], RunStarted)


def test_events_round_trip_through_json() -> None:
    step = Step(
        step=3,
        max_steps=9,
        epoch=0.5,
        loss=1.25,
        lr=1e-4,
        grad_norm=None,
        samples_per_second=2.0,
        tokens_per_second=50.0,
        elapsed_s=1.0,
        eta_s=2.0,
    )
    finished = RunFinished(summary={"status": "finished"})
    for event in (step, finished):
        assert event_from_dict(json.loads(json.dumps(event.to_dict()))) == event
