"""engine.data_report and `finetui data`: exact counts on fixtures with known problems, the gate, the loss mask."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.api import run_training
from engine.config import DataConfig, ModelConfig, RunConfig, build_config
from engine.data import DataError, encode_data, prepare_data
from engine.data_report import build_report, check_data, length_histogram, report_of
from engine.events import Log
from engine.models import load_tokenizer
from engine.runs import read_summary
from engine.sinks import ListSink
from tests.conftest import ROOT

TRAIN = [
    {"text": "a fine film", "label": "pos"},  # 1
    {"text": "a dull film", "label": "neg"},  # 2
    {"text": "A  Fine film", "label": "pos"},  # 3: row 1 once normalised
    {"text": "a fine film", "label": "pos"},  # 4: row 1 exactly
    {"text": "", "label": "neg"},  # 5: empty text
    {"text": "no label", "label": None},  # 6: missing label
    {"text": "long " * 100, "label": "neg"},  # 7: 102 tokens with [CLS] and [SEP]
    {"text": "shared with validation", "label": "pos"},  # 8
    {"text": "shared with test", "label": "neg"},  # 9
    {"text": "great", "label": "pos"},  # 10
    {"text": "awful", "label": "neg"},  # 11
    {"text": "fine", "label": "pos"},  # 12
]
VALIDATION = [
    {"text": "Shared with  validation", "label": "pos"},  # train row 8, normalised
    {"text": "brand new", "label": "neg"},
    {"text": "meh", "label": "neutral"},  # a label train never has
    {"text": "another", "label": "pos"},
]
TEST = [
    {"text": "shared with test", "label": "neg"},  # train row 9
    {"text": "x", "label": "pos"},
    {"text": "y", "label": "neg"},
    {"text": "z", "label": "pos"},
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def problem_data(tmp_path: Path) -> dict[str, Any]:
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", TRAIN),
        "validation": write_jsonl(tmp_path / "validation.jsonl", VALIDATION),
        "test": write_jsonl(tmp_path / "test.jsonl", TEST),
        "max_length": 16,
    }


@pytest.fixture(scope="module")
def bert_tokenizer() -> Any:
    return load_tokenizer(ModelConfig(id="builtin:tiny-bert"))


@pytest.fixture(scope="module")
def llama_tokenizer() -> Any:
    return load_tokenizer(ModelConfig(id="builtin:tiny-llama"))


def test_a_fixture_with_known_problems_gives_exact_counts(problem_data: dict[str, Any]) -> None:
    config = build_config({"model": {"id": "builtin:tiny-bert"}, "data": problem_data})
    report = build_report(config).to_dict()
    train, validation, test = report["train"], report["validation"], report["test"]
    assert (train["rows"], validation["rows"], test["rows"]) == (12, 4, 4)
    assert train["dropped"] == {
        "count": 2,
        "reasons": {"empty text": {"count": 1, "rows": [5]}, "missing label": {"count": 1, "rows": [6]}},
    }
    assert validation["dropped"] == {"count": 1, "reasons": {"label unseen in training": {"count": 1, "rows": [3]}}}
    assert test["dropped"] == {"count": 0, "reasons": {}}
    assert (train["labels"], validation["labels"], test["labels"]) == (
        {"neg": 4, "pos": 6},
        {"neg": 1, "pos": 2},
        {"neg": 2, "pos": 2},
    )
    assert (validation["baseline_accuracy"], test["baseline_accuracy"]) == (pytest.approx(2 / 3), 0.5)
    assert (train["truncated"], train["tokens_lost"], train["length_percentiles"]["max"]) == (0.1, 86, 102)
    assert report["duplicates"] == {
        "exact": 1,
        "normalised": 2,
        "examples": [{"rows": [1, 3], "text": "A Fine film"}, {"rows": [1, 4], "text": "a fine film"}],
    }
    assert report["leaked"] == {"validation": 1, "test": 1}
    assert report["error"] == (
        "data.validation: 1 of 4 rows (25.0%) also occur in train (row 1); "
        "set data.dedupe = true to drop them from train, or data.max_leak = 0.25 to allow it"
    )
    assert report["warnings"] == [
        "data.train: 2 of 12 rows left out: 1 empty text (row 5); 1 missing label (row 6)",
        "data.validation: 1 of 4 rows left out: 1 label unseen in training (row 3)",
        "data.train: 2 rows repeat an earlier row (1 exactly); data.dedupe = true drops them",
        "data.train: 1 example (10.0%) is longer than max_length 16 (86 tokens of text cut off); "
        "95 % fit in 102 tokens, 99 % in 102",
    ]
    assert set(report) >= {"train", "validation", "test", "duplicates", "leaked"}
    for split in (train, validation, test):
        assert set(split) >= {"rows", "dropped", "labels", "truncated", "length_percentiles"}


def test_the_gate_refuses_leaks_and_dedupe_or_max_leak_lets_it_pass(
    problem_data: dict[str, Any], bert_tokenizer: Any
) -> None:
    def gate(**settings: Any) -> list[str]:
        cfg = DataConfig(**problem_data, **settings)
        return check_data(cfg, encode_data(cfg, task="classification", tokenizer=bert_tokenizer, seed=0))

    with pytest.raises(DataError) as leaked:
        gate()
    assert str(leaked.value).startswith("data.validation: 1 of 4 rows (25.0%) also occur in train")
    within = gate(max_leak=0.25)
    assert "data.validation: 1 of 4 rows (25.0%) also occur in train (row 1), within data.max_leak 0.25" in within
    deduped = gate(dedupe=True)
    assert "data.dedupe: removed 4 train rows (2 duplicates, 2 also in validation or test)" in deduped
    assert not any("also occur in train" in warning for warning in deduped)
    cfg = DataConfig(**problem_data, dedupe=True)
    encoded = encode_data(cfg, task="classification", tokenizer=bert_tokenizer, seed=0)
    assert encoded.removed == {"duplicates": [3, 4], "also in validation or test": [8, 9]}
    assert sorted(encoded.splits["train"]["row"]) == [0, 1, 4, 5, 6, 9, 10, 11]
    assert encoded.leaked == {
        "validation": {"count": 0, "rows": [], "examples": []},
        "test": {"count": 0, "rows": [], "examples": []},
    }
    leaky = encode_data(DataConfig(**problem_data), task="classification", tokenizer=bert_tokenizer, seed=0)
    assert leaky.leaked["test"] == {"count": 1, "rows": [1], "examples": ["shared with test"]}


def test_a_carved_validation_leaks_what_train_repeats(tmp_path: Path, bert_tokenizer: Any) -> None:
    rows = [{"text": f"review {index % 50}", "label": index % 2} for index in range(100)]  # every text twice
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", rows), validation_fraction=0.2)
    encoded = encode_data(cfg, task="classification", tokenizer=bert_tokenizer, seed=0)
    assert encoded.carved and encoded.duplicates["normalised"] == 50
    with pytest.raises(DataError) as error:
        check_data(cfg, encoded)
    assert "(carved from train: train repeats these rows)" in str(error.value)
    deduped = DataConfig(train=cfg.train, validation_fraction=0.2, dedupe=True)
    clean = encode_data(deduped, task="classification", tokenizer=bert_tokenizer, seed=0)
    assert (len(clean.splits["train"]), len(clean.splits["validation"])) == (40, 10)
    assert clean.leaked["validation"]["count"] == 0


def test_no_rows_left_and_every_response_truncated_away_are_refused(
    tmp_path: Path, llama_tokenizer: Any, bert_tokenizer: Any
) -> None:
    rows = [{"prompt": "p" * 30, "response": "r" * 5}, {"prompt": "q" * 40, "response": "s" * 5}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = DataConfig(train=path, validation=path, template="none", max_length=16, max_leak=1.0)
    with pytest.raises(DataError) as truncated:
        check_data(cfg, encode_data(cfg, task="causal", tokenizer=llama_tokenizer, seed=0))
    # <s> + 40 prompt bytes + "\n" + 5 response bytes + </s>: both examples are whole at 48 tokens
    assert str(truncated.value) == (
        "data.train: every response is truncated away: the prompts fill max_length 16; "
        "raise data.max_length (48 keeps 95 % of the examples whole)"
    )
    empty = write_jsonl(tmp_path / "e.jsonl", [{"text": "", "label": 0}, {"text": None, "label": 1}])
    labels = write_jsonl(tmp_path / "l.jsonl", [{"text": f"t{index}", "label": index % 2} for index in range(6)])
    cfg = DataConfig(train=labels, validation=empty)
    with pytest.raises(DataError) as nothing:
        check_data(cfg, encode_data(cfg, task="classification", tokenizer=bert_tokenizer, seed=0))
    assert str(nothing.value) == (
        "data.validation: no rows remain of 2: 2 empty text (rows 1, 2); check data.text_field names the text column"
    )


def test_the_rendered_loss_mask_is_the_collators_labels(tmp_path: Path, llama_tokenizer: Any) -> None:
    rows = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5, since 2 + 3 = 5." * 20},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    for template in ("alpaca", "chat"):
        cfg = DataConfig(train=path, validation=path, template=template, max_length=200, max_leak=1.0)
        prepared = prepare_data(cfg, task="causal", tokenizer=llama_tokenizer, seed=0)
        report = report_of(cfg, prepared.encoded, llama_tokenizer)
        assert report.example is not None
        first = int(np.argmin(prepared.encoded.splits["train"]["row"]))  # the example shown: the file's first
        batch = prepared.collator([prepared.train[first], *(prepared.train[i] for i in range(len(prepared.train)))])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        assert "".join(text for text, loss in report.example if loss) == llama_tokenizer.decode(
            [token for token, label in zip(ids, labels, strict=True) if label != -100]
        )
        assert "".join(text for text, _ in report.example) == llama_tokenizer.decode(
            [token for token, mask in zip(ids, batch["attention_mask"][0].tolist(), strict=True) if mask]
        )


def test_length_histogram_marks_max_length() -> None:
    bins = length_histogram(np.array([3, 5, 9, 70, 200]), 64)
    assert bins[:2] == [("1-8", 2, False), ("9-16", 1, False)]
    assert [label for label, _, beyond in bins if beyond] == ["65-98", "99-132", "133-166", "167-200"]
    assert sum(count for _, count, _ in bins) == 5


def test_run_is_gated_and_records_the_warnings(tmp_path: Path, problem_data: dict[str, Any]) -> None:
    def run(**data: Any) -> Any:
        config = RunConfig.model_validate(
            {
                "name": "gated",
                "model": {"id": "builtin:tiny-bert", "task": "classification"},
                "data": problem_data | data,
                "strategy": {"kind": "head"},
                "train": {"max_steps": 2, "batch_size": 4, "output_dir": str(tmp_path / "runs")},
            }
        )
        sink = ListSink()
        return run_training(config, sink), sink

    refused, _ = run()
    assert (refused.status, refused.exit_code, refused.summary["reason"]) == ("failed", 2, "bad_input")
    assert refused.summary["error"].startswith("data.validation: 1 of 4 rows (25.0%) also occur in train")
    result, sink = run(dedupe=True)
    assert result.status == "finished", result.summary.get("error")
    warnings = read_summary(result.run_dir)["warnings"]
    assert "data.dedupe: removed 4 train rows (2 duplicates, 2 also in validation or test)" in warnings
    logged = [event.message for event in sink.of_type(Log) if event.level == "warning"]
    assert all(warning in logged for warning in warnings)


def finetui(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tui.launcher", *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )


def test_finetui_data_prints_json_and_exits_2_when_run_would_refuse(problem_data: dict[str, Any]) -> None:
    sets = [item for key, value in problem_data.items() for item in ("--set", f"data.{key}={json.dumps(value)}")]
    refused = finetui("data", "--model", "builtin:tiny-bert", *sets, "--json")
    assert refused.returncode == 2
    report = json.loads(refused.stdout)
    assert report["leaked"] == {"validation": 1, "test": 1}
    lines = refused.stderr.strip().splitlines()
    assert lines[-1] == f"finetui: error: {report['error']}"
    passed = finetui("data", "--model", "builtin:tiny-bert", *sets, "--set", "data.dedupe=true")
    assert passed.returncode == 0, passed.stderr
    assert "rows shared with train: validation 0, test 0" in passed.stdout
    assert "data.dedupe: removed 4 train rows" in passed.stdout
    assert all(len(line) <= 80 for line in passed.stdout.splitlines())
    quickstart = finetui("data", "quickstart", "--model", "builtin:tiny-bert", "--json")
    assert quickstart.returncode == 0, quickstart.stderr
    summary = json.loads(quickstart.stdout)
    assert [summary[role]["rows"] for role in ("train", "validation", "test")] == [320, 80, 80]
    assert summary["train"]["labels"] == {"negative": 160, "positive": 160}
