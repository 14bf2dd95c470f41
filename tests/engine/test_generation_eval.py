"""`finetui eval --generate` (issue 12): answers generated from each row's prompt, scored against its reference, for
instruction runs and for runs that learned labels as words; the JSON contract, predictions.jsonl, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

from engine.api import run_training
from engine.config import ConfigError, build_config, config_to_dict
from engine.data import label_word_new_tokens
from engine.events import Eval, Samples
from engine.inference import generation_eval as ge
from engine.inference.loading import load_run
from engine.runs import checkpoint_step, complete_checkpoints, load_run_config
from engine.sampling import GenerationSettings
from engine.sinks import ListSink
from tests.conftest import QUICKSTART_DATA, ROOT, SHARED, needs_shared, needs_smollm2, quickstart_data
from tests.engine.test_use import INSTRUCTIONS, finetui

SENTIMENT = QUICKSTART_DATA / "test.jsonl"


def train(folder: Path, data: dict[str, Any]) -> Path:
    config = {
        "name": "judged",
        "model": {"id": "builtin:tiny-llama"},
        "data": {"max_length": 256, "max_train_samples": 16, "max_eval_samples": 4, "max_leak": 1.0} | data,
        "strategy": {"kind": "lora", "r": 8, "target_modules": "all-linear"},
        "train": {"max_steps": 2, "batch_size": 8, "lr": 2e-2, "output_dir": str(folder)},
    }
    result = run_training(build_config(config), ListSink())
    assert result.status == "finished", result.summary
    return result.run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("judged")
    instructions = {"train": str(INSTRUCTIONS / "train.jsonl"), "validation": str(INSTRUCTIONS / "validation.jsonl")}
    words = {"train": str(QUICKSTART_DATA / "train.jsonl"), "validation": str(QUICKSTART_DATA / "validation.jsonl")}
    return {
        "instructions": train(folder, instructions),
        "label_words": train(folder, words | {"label_words": {"negative": "bad", "positive": "good"}}),
    }


def saved_evaluation(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    (folder,) = (run_dir / "evaluations").iterdir()
    predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return predictions, json.loads((folder / "result.json").read_text())


def test_eval_generate_prints_the_json_contract_and_keeps_the_predictions_in_the_run(runs: dict[str, Path]) -> None:
    run_dir, data = runs["instructions"], INSTRUCTIONS / "test.jsonl"
    done = finetui("eval", str(run_dir), "--data", str(data), "--generate", "--base", "--json", "--max-new-tokens", "6")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert list(printed) == ["metric", "score", "rows", "base"]
    assert list(printed["base"]) == ["metric", "score", "rows"]
    assert printed["metric"] == "exact" and printed["rows"] == 10  # references are a few words: exact by default
    predictions, result = saved_evaluation(run_dir)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert [p["reference"] for p in predictions] == [row["output"] for row in rows]
    assert [p["prompt"] for p in predictions] == [row["instruction"] for row in rows]
    assert printed["score"] == sum(p["score"] for p in predictions) / 10
    assert printed["base"]["score"] == sum(p["base_score"] for p in predictions) / 10
    assert result["interval_method"] == "wilson" and 0 <= result["interval"][0] <= result["interval"][1] <= 1
    assert f"predictions written to {run_dir / 'evaluations'}" in done.stderr


def test_batched_answers_are_the_answers_one_by_one(runs: dict[str, Path], tmp_path: Path) -> None:
    loaded = load_run(runs["instructions"])
    reviews = [json.loads(line) for line in SENTIMENT.read_text().splitlines()[:24]]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"instruction": r["text"], "output": r["label"]}) + "\n" for r in reviews))
    request = ge.check_request(loaded.config, str(data), "rouge_l")
    settings = GenerationSettings(max_new_tokens=8)
    batched = ge.judge(loaded, request, settings, batch_size=16)
    alone = ge.judge(loaded, request, settings, batch_size=1)
    assert len({len(row["instruction"]) for row in request.rows}) > 5  # prompts of many lengths: padding varies
    assert batched.outputs == alone.outputs
    assert batched.scored.scores == alone.scored.scores


def test_a_label_word_run_is_scored_as_a_classifier(runs: dict[str, Path]) -> None:
    run_dir = runs["label_words"]
    done = finetui("eval", str(run_dir), "--data", str(SENTIMENT), "--generate", "--json")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert list(printed) == ["metric", "score", "rows", "accuracy", "f1"]
    predictions, result = saved_evaluation(run_dir)
    labels = [json.loads(line)["label"] for line in SENTIMENT.read_text().splitlines()]
    assert [p["reference"] for p in predictions] == [{"negative": "bad", "positive": "good"}[x] for x in labels]
    assert printed["accuracy"] == printed["score"] == sum(p["score"] for p in predictions) / len(labels)
    outside = sum(p["output"].strip(" .").lower() not in ("bad", "good") for p in predictions)
    assert result["outside_label_set"] == outside
    shown = finetui("eval", str(run_dir), "--data", str(SENTIMENT), "--generate")
    assert f"{outside} answers outside the label set" in shown.stdout and "worst rows" in shown.stdout


def run_folder(folder: Path, data: dict[str, Any], task: str = "causal") -> Path:
    """A run directory without training: its config and an empty model/ (never loaded: the checks come first)."""
    folder.mkdir(parents=True)
    config = build_config({"model": {"id": "builtin:tiny-llama", "task": task}, "data": data})
    (folder / "config.toml").write_text(tomli_w.dumps(config_to_dict(config)))
    (folder / "model").mkdir()
    return folder


def test_bad_input_is_one_line_exit_2_before_the_model_loads(tmp_path: Path) -> None:
    classifier = run_folder(tmp_path / "classifier", {"train": "t.jsonl"}, "classification")
    causal = run_folder(tmp_path / "causal", {"train": "t.jsonl"})
    words = run_folder(tmp_path / "words", {"train": "t.jsonl", "label_words": {"negative": "bad", "positive": "ok"}})
    no_torch = tmp_path / "no-torch"
    (no_torch / "torch").mkdir(parents=True)
    (no_torch / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text('{"text": "fine", "label": "positive"}\n{"text": "hm", "label": "neutral"}\n')
    unanswered = tmp_path / "unanswered.jsonl"
    unanswered.write_text('{"instruction": "Say hi."}\n')
    before_torch = [
        (["eval", str(classifier), "--data", str(SENTIMENT), "--generate"], "is a classification run"),
        (["eval", str(causal), "--data", str(SENTIMENT), "--metric", "exact"], "--metric: score generated answers"),
        (["eval", str(causal), "--data", str(tmp_path / "none.jsonl"), "--generate"], "none.jsonl: no such file"),
        (["run", "--set", 'data.label_words={0="good",1="Good"}'], "labels 0 and 1 share the word 'Good'"),
    ]
    before_model = [
        (["eval", str(causal), "--data", str(SENTIMENT), "--generate"], "no column 'instruction' or 'prompt' to"),
        (["eval", str(causal), "--data", str(unanswered), "--generate"], "no column 'output' to compare the answers"),
        (["eval", str(words), "--data", str(unlabelled), "--generate"], "no word for label 'neutral' of --data"),
    ]
    before = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    for cases, env in ((before_torch, {"PYTHONPATH": f"{no_torch}{os.pathsep}{ROOT}"}), (before_model, None)):
        for args, fragment in cases:
            result = finetui(*args, cwd=tmp_path, env=env)
            assert result.returncode == 2, (args, result.stderr)
            assert result.stderr.count("\n") == 1 and fragment in result.stderr, (args, result.stderr)
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == before


def test_samples_and_the_generation_metric_at_each_evaluation(tmp_path: Path) -> None:
    prompts = ["Say hello.", "Repeat the word apple 2 times."]
    splits = {"train": str(INSTRUCTIONS / "train.jsonl"), "validation": str(INSTRUCTIONS / "validation.jsonl")}
    config = {
        "model": {"id": "builtin:tiny-llama"},
        "data": splits | {"max_length": 256, "max_train_samples": 16, "max_eval_samples": 4, "max_leak": 1.0},
        "strategy": {"kind": "lora"},
        "train": {"max_steps": 3, "eval_steps": 1, "batch_size": 8, "output_dir": str(tmp_path)}
        | {"sample_prompts": prompts, "generation_metric": "auto", "generation_max_new_tokens": 5},
    }
    sink = ListSink()
    result = run_training(build_config(config), sink)
    assert result.status == "finished", result.summary
    samples = [event for event in sink.events if isinstance(event, Samples)]
    assert [(s.step, s.index, s.prompt) for s in samples] == [
        (step, i, prompts[i]) for step in (1, 2, 3) for i in (0, 1)
    ]
    assert all(s.seconds > 0 for s in samples)
    validation = [event for event in sink.events if isinstance(event, Eval) and event.split == "validation"]
    assert [event.step for event in validation] == [1, 2, 3]
    for event in validation:  # the references are a few words: exact match, on the 4 validation rows
        assert 0.0 <= event.metrics["generation_exact"] <= 1.0 and event.metrics["generation_s"] > 0
    stored = [json.loads(line) for line in (result.run_dir / "events.jsonl").read_text().splitlines()]
    assert [e for e in stored if e["type"] == "samples"] == [s.to_dict() for s in samples]
    order = [event.type for event in sink.events if isinstance(event, Samples | Eval)]
    assert order[:3] == ["samples", "samples", "eval"]  # an evaluation's samples come before its eval event


def test_metric_for_best_model_keeps_the_best_checkpoint_and_ends_with_its_model(tmp_path: Path) -> None:
    splits = {"train": str(INSTRUCTIONS / "train.jsonl"), "validation": str(INSTRUCTIONS / "validation.jsonl")}
    steps = {"max_steps": 4, "eval_steps": 1, "save_steps": 1, "batch_size": 8, "lr": 5e-3, "output_dir": str(tmp_path)}
    config = {
        "model": {"id": "builtin:tiny-llama"},
        "data": splits | {"max_length": 256, "max_train_samples": 16, "max_eval_samples": 4, "max_leak": 1.0},
        "strategy": {"kind": "lora"},
        "train": steps
        | {"generation_metric": "exact", "generation_max_new_tokens": 4}
        | {"metric_for_best_model": "generation_exact"},
    }
    sink = ListSink()
    result = run_training(build_config(config), sink)
    assert result.status == "finished", result.summary
    scores = [
        (e.step, e.metrics["generation_exact"]) for e in sink.events if isinstance(e, Eval) and e.split == "validation"
    ]
    assert [step for step, _ in scores][:4] == [1, 2, 3, 4]
    best_score = max(score for _, score in scores[:4])
    best_step = next(step for step, score in scores if score == best_score)  # the first of equals stays best
    assert result.summary["best"] == {"metric": "generation_exact", "value": best_score, "step": best_step}
    kept = sorted(checkpoint_step(path) for path in complete_checkpoints(result.run_dir))
    assert kept == sorted({best_step, 3, 4})  # save_total_limit 2, and the best one
    final = load_file(str(result.run_dir / "model" / "adapter_model.safetensors"))
    for step in kept:
        saved = load_file(str(result.run_dir / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors"))
        same = all(torch.equal(final[name], saved[name]) for name in final)
        assert same == (step == best_step), step


def test_validation_rows_as_sample_prompts_of_a_label_word_run(tmp_path: Path) -> None:
    data = quickstart_data(("train", "validation"), max_length=256, max_eval_samples=8, label_words=True)
    train = {"max_steps": 1, "batch_size": 8, "output_dir": str(tmp_path), "sample_prompts": "validation:3"}
    config = build_config({"model": {"id": "builtin:tiny-llama"}, "data": data, "strategy": {"kind": "lora"}} | {
        "train": train | {"generation_metric": "exact"}})  # fmt: skip
    sink = ListSink()
    result = run_training(config, sink)
    assert result.status == "finished", result.summary
    validation = load_run_config(result.run_dir).data
    assert validation.label_words == {"negative": "negative", "positive": "positive"}  # true, resolved
    samples = [event for event in sink.events if isinstance(event, Samples)]
    texts = [json.loads(line)["text"] for line in (QUICKSTART_DATA / "validation.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(sample.prompt in texts for sample in samples)
    classifier = build_config({"model": {"id": "builtin:tiny-bert"}, "data": quickstart_data(), "train": train})
    with pytest.raises(ConfigError, match="a classifier generates no text"):
        run_training(classifier, ListSink())


@pytest.mark.slow
@needs_smollm2
@needs_shared
def test_smollm2_with_label_words_beats_its_own_zero_shot_answers(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct fine-tuned (LoRA) on 160 Rotten Tomatoes reviews as label words, scored on 60 reviews
    of the official validation file (never trained on) against the same model with the adapter off."""
    rotten = SHARED / "data" / "rotten_tomatoes"
    held_out = tmp_path / "held_out.jsonl"
    rows = (rotten / "validation.jsonl").read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 in text
    held_out.write_text("".join(f"{row}\n" for row in rows[::17][:60]), encoding="utf-8")
    data = {"train": str(rotten / "train.jsonl"), "max_train_samples": 160, "max_eval_samples": 16}
    config = {
        "model": {"id": "builtin:smollm2-135m"},
        "data": data | {"label_words": {"0": "negative", "1": "positive"}, "template": "chat", "max_length": 96},
        "strategy": {"kind": "lora", "r": 16, "target_modules": "all-linear"},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "output_dir": str(tmp_path)},
    }
    result = run_training(build_config(config), ListSink())
    assert result.status == "finished", result.summary
    loaded = load_run(result.run_dir)
    request = ge.check_request(loaded.config, str(held_out), None)
    settings = GenerationSettings(max_new_tokens=label_word_new_tokens(loaded.config.data, loaded.tokenizer))
    tuned, zero_shot = (ge.judge(loaded, request, settings, base=base) for base in (False, True))
    assert request.metric == "exact" and tuned.scored.rows == 60
    assert tuned.scored.score > zero_shot.scored.score, (tuned.outputs[:5], zero_shot.outputs[:5])
    assert tuned.labels is not None and tuned.labels.accuracy > 0.6
