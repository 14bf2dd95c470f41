"""Every user mistake through the real CLI: one line on stderr naming the problem and what to do, exit code 2,
no traceback, and nothing left behind but (for mistakes found once data or model are read) a run directory
marked failed.

The cases run as subprocesses, four at a time, once per module; each test then checks its own case.
Mistakes visible in the config, the paths or the output directory are caught before torch is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT


@dataclass(frozen=True)
class Case:
    args: list[str]
    fragment: str
    leaves_failed_run: bool = False  # found after the run directory exists (data read, model loaded)
    env: dict[str, str] = field(default_factory=dict)


def _write_files(work: Path) -> dict[str, Path]:
    files = {
        "good": work / "good.jsonl",
        "empty": work / "empty.jsonl",
        "malformed": work / "malformed.jsonl",
        "latin1": work / "latin1.csv",
        "columns": work / "columns.csv",
        "one_class": work / "one_class.csv",
        "surrogate": work / "surrogate.jsonl",
        "txt": work / "data.txt",
        "trec": work / "TREC.train",
        "leaky_validation": work / "leaky_validation.jsonl",
        "bad_toml": work / "bad.toml",
    }
    files["good"].write_text("".join(json.dumps({"text": f"s {i}", "label": i % 2}) + "\n" for i in range(20)))
    files["empty"].write_text("")
    files["malformed"].write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c" "label": 0}\n')
    files["latin1"].write_bytes("text,label\ncafé au lait,1\nbad,0\n".encode("latin-1"))
    files["columns"].write_text("sentence,label\nhello,1\nbye,0\nok,1\nno,0\n")
    files["one_class"].write_text("text,label\na,1\nb,1\nc,1\n")
    files["surrogate"].write_text(
        '{"text": "a", "label": 0}\n{"text": "b \\ud800", "label": 1}\n{"text": "c", "label": 0}\n'
    )
    files["txt"].write_text("some text\n")
    files["trec"].write_text("DESC:manner How did serfdom develop ?\nHUM:ind Who killed Gandhi ?\n")
    files["leaky_validation"].write_text(json.dumps({"text": "s 3", "label": 1}) + "\n")
    files["bad_toml"].write_text('name = "x"\n[train]\nlr = = 3\n')
    (work / "no_model").mkdir()
    (work / "t5").mkdir()
    (work / "t5" / "config.json").write_text('{"model_type": "t5", "is_encoder_decoder": true}')
    (work / "a_file").write_text("x")
    fake = work / "fake_bnb" / "bitsandbytes"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libbitsandbytes_cpu.so: cannot open shared object file')\n")
    files["fake_bnb"] = fake.parent
    no_torch = work / "no_torch" / "torch"
    no_torch.mkdir(parents=True)
    (no_torch / "__init__.py").write_text("raise ImportError('torch was imported before the bad input was found')\n")
    files["no_torch"] = no_torch.parent
    finished = work / "runs" / "done-20240101-000000"
    finished.mkdir(parents=True)
    (finished / "config.toml").write_text('name = "done"\n')
    (finished / "summary.json").write_text('{"status": "finished"}\n')
    files["finished_run"] = finished
    with_model = work / "runs" / "kept-20240101-000000"
    (with_model / "model").mkdir(parents=True)
    (with_model / "config.toml").write_text('name = "kept"\n')
    (with_model / "summary.json").write_text('{"status": "finished"}\n')
    files["run_with_model"] = with_model
    return files


TINY = ("--model", "builtin:tiny-bert", "--strategy", "head", "--set", "train.max_steps=1")


def _cases(work: Path) -> dict[str, Case]:
    files = _write_files(work)

    def run(name: str, *args: str, train: Path | str | None = None) -> list[str]:
        data = ["--set", f"data.train={json.dumps(str(train))}"] if train is not None else []
        return ["run", *args, *data, "--output-dir", str(work / "out" / name)]

    # Mistakes in the command line, the preset or the paths are found before torch is imported: these cases run
    # with a `torch` that fails to import.
    before_torch = {
        **_config_cases(files, run),
        **_path_cases(work, files, run),
        **_model_and_folder_cases(work, files, run),
    }
    no_torch = {"PYTHONPATH": str(files["no_torch"])}
    return {
        **{name: replace(case, env={**case.env, **no_torch}) for name, case in before_torch.items()},
        **_loading_cases(files, run),
        **_model_loading_cases(files, run),
    }


def _config_cases(f: dict[str, Path], run: Any) -> dict[str, Case]:
    """Found before anything is loaded, in the preset or the command line: no run directory."""
    return {
        "preset_not_found": Case(run("preset_not_found", "no-such-preset"), "no such preset file or bundled preset"),
        "toml_syntax_error": Case(
            run("toml_syntax_error", str(f["bad_toml"])), "TOML syntax error: Invalid value (at line 3, column 6)"
        ),
        "unknown_strategy": Case(
            run("unknown_strategy", "--strategy", "magic", train=f["good"]), "strategy.kind: Input should be"
        ),
        "unknown_field": Case(run("unknown_field", "--set", "train.lrr=1", train=f["good"]), "train.lrr: unknown key"),
        "unknown_section": Case(
            run("unknown_section", "--set", "trainer.lr=1", train=f["good"]), "trainer: unknown key"
        ),
        "malformed_set": Case(run("malformed_set", "--set", "train.lr", train=f["good"]), "expected section.key=value"),
        "r_out_of_range": Case(
            run("r_out_of_range", "--set", "strategy.r=0", train=f["good"]),
            "strategy.r: Input should be greater than or equal to 1",
        ),
        "lr_out_of_range": Case(
            run("lr_out_of_range", "--set", "train.lr=5", train=f["good"]),
            "train.lr: Input should be less than or equal to 1",
        ),
        "max_length_out_of_range": Case(
            run("max_length_out_of_range", "--set", "data.max_length=4", train=f["good"]),
            "data.max_length: Input should be greater than or equal to 8",
        ),
        "fp16_refused": Case(
            run("fp16_refused", "--set", "train.precision=fp16", train=f["good"]), "pure fp16 training diverges"
        ),
        "no_training_data": Case(run("no_training_data", "--strategy", "head"), "data.train: no training data"),
    }


def _path_cases(work: Path, f: dict[str, Path], run: Any) -> dict[str, Case]:
    """Found before anything is loaded, in the data files: no run directory."""
    tiny = TINY
    return {
        "missing_data_file": Case(
            run("missing_data_file", *tiny, train=work / "nope.jsonl"), "nope.jsonl: no such file"
        ),
        "missing_validation_file": Case(
            run("missing_validation_file", *tiny, "--set", "data.validation=./val.jsonl", train=f["good"]),
            "data.validation: ./val.jsonl: no such file",
        ),
        "data_is_a_directory": Case(run("data_is_a_directory", *tiny, train=work), "is a directory; give a data file"),
        "empty_file": Case(run("empty_file", *tiny, train=f["empty"]), "empty.jsonl: the file is empty"),
        "unknown_file_format": Case(
            run("unknown_file_format", *tiny, train=f["trec"]),
            "cannot tell the format from the extension '.train'; its lines look like `COARSE:fine text`: "
            'set data.format = "lines"',
        ),
        "non_utf8_text": Case(
            run("non_utf8_text", *tiny, train=f["latin1"]),
            'not UTF-8 text (byte 0xe9 at offset 14); it looks like latin-1: set data.encoding = "latin-1"',
        ),
    }


def _model_and_folder_cases(work: Path, f: dict[str, Path], run: Any) -> dict[str, Case]:
    """Found before anything is loaded, in the model id and the folders, or when the model's config is read: no
    run directory."""
    tiny = TINY
    return {
        "model_dir_without_model": Case(
            run("model_dir_without_model", "--model", str(work / "no_model"), train=f["good"]),
            "holds no model (no config.json)",
        ),
        "model_path_missing": Case(
            run("model_path_missing", "--model", "./no/such/model", train=f["good"]), "./no/such/model does not exist"
        ),
        "model_file_not_gguf": Case(
            run("model_file_not_gguf", "--model", str(f["txt"]), train=f["good"]),
            "is a file; expected a model folder or a .gguf file",
        ),
        "unwritable_output_dir": Case(
            [
                "run",
                *tiny,
                "--set",
                f"data.train={json.dumps(str(f['good']))}",
                "--output-dir",
                str(work / "a_file" / "runs"),
            ],
            "a_file is a file, not a directory",
        ),
        "output_dir_is_a_run": Case(
            ["run", *tiny, "--set", f"data.train={json.dumps(str(f['good']))}", "--output-dir", str(f["finished_run"])],
            "is a run directory, and runs are never written into each other",
        ),
        "resume_finished_run": Case(
            ["run", "--resume", str(f["finished_run"])], "the run already finished; nothing to resume"
        ),
        "resume_not_a_run": Case(["run", "--resume", str(work)], "not a finetui run directory"),
        "resume_with_overrides": Case(
            ["run", "--resume", str(f["finished_run"]), "--set", "train.lr=1"],
            "--resume cannot change train.lr (it must match the checkpoint)",
        ),
        "attach_not_a_run": Case(["attach", str(work)], "not a finetui run directory"),
        "encoder_decoder_model": Case(
            ["inspect", "--model", str(work / "t5")], "is an encoder-decoder model (t5); finetui fine-tunes encoders"
        ),
        "inspect_unknown_field": Case([*("inspect", *tiny[:2]), "--set", "train.lrr=1"], "train.lrr: unknown key"),
        "eval_run_without_model": Case(
            ["eval", str(f["finished_run"]), "--data", str(f["good"])], "no model and no checkpoint to load"
        ),
        "eval_missing_data_file": Case(
            ["eval", str(f["run_with_model"]), "--data", str(work / "nope.jsonl")], "nope.jsonl: no such file"
        ),
        # found when the model's config is read: no run directory either
        "hub_model_not_found_offline": Case(
            run("hub_model_not_found_offline", "--model", "nobody-xyz/no-such-model", train=f["good"]),
            "nobody-xyz/no-such-model: the Hugging Face hub is not reachable (offline?)",
        ),
    }


def _loading_cases(f: dict[str, Path], run: Any) -> dict[str, Case]:
    """Found when the data is read: a run directory marked failed."""
    tiny = TINY
    return {
        "wrong_columns": Case(
            run("wrong_columns", *tiny, train=f["columns"]),
            "no column 'text' (columns: sentence, label); set data.text_field",
            True,
        ),
        "malformed_jsonl_line": Case(
            run("malformed_jsonl_line", *tiny, train=f["malformed"]), "malformed.jsonl: line 3 is not valid JSON", True
        ),
        "invalid_unicode_escape": Case(
            run("invalid_unicode_escape", *tiny, train=f["surrogate"]), "line 2 holds an invalid Unicode escape", True
        ),
        "labels_of_one_class": Case(
            run("labels_of_one_class", *tiny, train=f["one_class"]), "holds one class only", True
        ),
        "validation_rows_in_train": Case(
            run(
                "validation_rows_in_train",
                *tiny,
                "--set",
                f"data.validation={json.dumps(str(f['leaky_validation']))}",
                train=f["good"],
            ),
            "data.validation: 1 of 1 rows (100.0%) also occur in train (row 1); set data.dedupe = true",
            True,
        ),
    }


def _model_loading_cases(f: dict[str, Path], run: Any) -> dict[str, Case]:
    """Found when the model is loaded and prepared: a run directory marked failed."""
    return {
        "layers_more_than_blocks": Case(
            run(
                "layers_more_than_blocks",
                "--model",
                "builtin:tiny-bert",
                "--strategy",
                "last_layers",
                "--set",
                "strategy.layers=9",
                train=f["good"],
            ),
            "strategy.layers: 9 is more than the model's 4 blocks; use 1 to 4",
            True,
        ),
        "target_modules_not_in_model": Case(
            run(
                "target_modules_not_in_model",
                "--model",
                "builtin:tiny-bert",
                "--strategy",
                "lora",
                "--set",
                'strategy.target_modules=["q_proj"]',
                train=f["good"],
            ),
            "q_proj matches no linear layer of the model",
            True,
        ),
        "qlora_without_bitsandbytes": Case(
            run("qlora_without_bitsandbytes", "--model", "builtin:tiny-llama", "--strategy", "qlora", train=f["good"]),
            "qlora cannot use bitsandbytes",
            True,
            {"PYTHONPATH": str(f["fake_bnb"])},
        ),
    }


def _run(case: Case) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **case.env}
    return subprocess.run(
        [sys.executable, "-m", "tui.launcher", *case.args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def outcomes(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Case, subprocess.CompletedProcess[str], Path]]:
    work = tmp_path_factory.mktemp("bad-input")
    cases = _cases(work)
    # The cases that import torch first, so that the quick ones fill the gaps instead of trailing behind.
    order = sorted(cases, key=lambda name: not (cases[name].leaves_failed_run or name.startswith("hub_")))
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(order, pool.map(_run, [cases[name] for name in order]), strict=True))
    return {name: (cases[name], results[name], work / "out" / name) for name in cases}


CASE_NAMES = [
    "preset_not_found", "toml_syntax_error", "unknown_strategy", "unknown_field", "unknown_section", "malformed_set",
    "r_out_of_range", "lr_out_of_range", "max_length_out_of_range", "fp16_refused", "no_training_data",
    "missing_data_file", "missing_validation_file", "data_is_a_directory", "empty_file", "model_dir_without_model",
    "model_path_missing", "model_file_not_gguf", "unwritable_output_dir", "output_dir_is_a_run",
    "unknown_file_format",
    "resume_finished_run", "resume_not_a_run", "resume_with_overrides", "attach_not_a_run",
    "encoder_decoder_model", "inspect_unknown_field", "eval_run_without_model", "eval_missing_data_file",
    "hub_model_not_found_offline", "wrong_columns", "malformed_jsonl_line", "non_utf8_text",
    "invalid_unicode_escape", "labels_of_one_class", "validation_rows_in_train",
    "layers_more_than_blocks", "target_modules_not_in_model", "qlora_without_bitsandbytes",
]  # fmt: skip


def test_the_case_list_is_complete(tmp_path: Path) -> None:
    assert sorted(_cases(tmp_path)) == sorted(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing_half_done(
    name: str, outcomes: dict[str, tuple[Case, subprocess.CompletedProcess[str], Path]]
) -> None:
    case, result, output_dir = outcomes[name]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("finetui: error: ")
    assert case.fragment in lines[0], lines[0]
    runs = sorted(output_dir.iterdir()) if output_dir.is_dir() else []
    if case.leaves_failed_run:
        assert len(runs) == 1, runs
        summary = json.loads((runs[0] / "summary.json").read_text())
        assert summary["status"] == "failed" and summary["reason"] == "bad_input"
        assert f"(run directory: {runs[0]})" in lines[0]
        assert not (runs[0] / "pid").exists() and not (runs[0] / "checkpoints").exists()
    else:
        assert runs == [], runs
