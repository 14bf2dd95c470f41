"""Using what a run trained (issue 11): answers, base against fine-tuned, label probabilities, chat turns, and
exports that plain transformers loads and that answer as the run does.

The runs are trained once per module on the tiny models with a learning rate high enough that the adapters change
the answers (so that "the merged export answers as the adapter does" could fail)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.api import run_training
from engine.config import ConfigError, build_config, config_to_dict
from engine.events import ExportProgress
from engine.inference import export as export_lib
from engine.inference.export import ExportMismatch, export_run
from engine.inference.loading import LoadedRun, load_run
from engine.inference.predict import Chat, answer, label_probabilities, prompt_ids, request_rows
from engine.sampling import GenerationSettings
from engine.sinks import ListSink
from tests.conftest import ROOT, needs_smollm2, quickstart_data
from tests.engine.test_old_runs import relocated_fixture

INSTRUCTIONS = ROOT / "tests" / "fixtures" / "run-0b7cde0" / "data"
GREEDY = GenerationSettings(max_new_tokens=16)
ROWS = [{"instruction": "Repeat the word apple 2 times."}, {"instruction": "Say hello."}]


def train(
    folder: Path,
    kind: str,
    *,
    strategy: dict[str, Any] | None = None,
    model: str = "builtin:tiny-llama",
    data: dict[str, Any] | None = None,
    **settings: Any,
) -> Path:
    """A finished tiny run: tiny-llama on the instruction fixture unless `model` and `data` say otherwise (the
    fixture's validation rows repeat training rows: `max_leak` lets them, these tests use runs, not their scores)."""
    splits = {"train": str(INSTRUCTIONS / "train.jsonl"), "validation": str(INSTRUCTIONS / "validation.jsonl")}
    config = {
        "name": kind,
        "model": {"id": model},
        "data": data or splits | {"max_length": 256, "max_train_samples": 16, "max_eval_samples": 4, "max_leak": 1.0},
        "strategy": {"kind": kind} | (strategy or {}),
        "train": {"max_steps": 2, "batch_size": 8, "lr": 2e-2, "output_dir": str(folder)} | settings,
    }
    result = run_training(build_config(config), ListSink())
    assert result.status == "finished", result.summary
    return result.run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("runs")
    adapters = {"r": 8, "target_modules": "all-linear"}
    classification = {"model": "builtin:tiny-bert", "data": quickstart_data(("train", "validation"))}
    return {
        "lora": train(folder, "lora", strategy=adapters),
        "qlora": train(folder, "qlora", strategy=adapters),
        "full": train(folder, "full", lr=1e-3),
        "classifier": train(folder, "lora", lr=1e-3, **classification),
        "feature": train(folder, "feature", **classification),
    }


@pytest.fixture(scope="module")
def lora(runs: dict[str, Path]) -> LoadedRun:
    return load_run(runs["lora"])


def test_the_adapter_changes_the_answers_and_the_base_answers_in_the_same_load(lora: LoadedRun) -> None:
    tuned = answer(lora, ROWS, GREEDY)
    base = answer(lora, ROWS, GREEDY, base=True)
    assert [reply.token_ids for reply in tuned] != [reply.token_ids for reply in base]
    again = answer(lora, ROWS, GREEDY)
    assert [reply.token_ids for reply in again] == [reply.token_ids for reply in tuned]  # the adapter is back on


def test_a_full_run_loads_its_base_beside_after_a_memory_check(
    runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_run(runs["full"])
    monkeypatch.setattr("psutil.virtual_memory", lambda: type("Memory", (), {"available": 500_000})())
    with pytest.raises(
        ConfigError, match=r"the base model needs 7\d\d\.\d KiB beside the fine-tuned one and 488\.3 KiB"
    ):
        answer(loaded, ROWS, GREEDY, base=True)
    monkeypatch.undo()
    base = answer(loaded, ROWS, GREEDY, base=True)
    tuned = answer(loaded, ROWS, GREEDY)
    assert [reply.token_ids for reply in base] != [reply.token_ids for reply in tuned]
    assert loaded.notes[-1].startswith("base model loaded beside the fine-tuned one")


def test_a_stopped_run_answers_from_its_last_checkpoint(tmp_path: Path) -> None:
    loaded = load_run(relocated_fixture(tmp_path))
    assert loaded.notes == ["the run has no final model: using its last checkpoint, checkpoint-3 (step 3)"]
    (reply,) = answer(loaded, request_rows(loaded, prompt="Repeat the word river 3 times."), GREEDY)
    assert reply.tokens > 0


def test_label_probabilities_from_a_fine_tuned_classifier_and_a_feature_classifier(runs: dict[str, Path]) -> None:
    texts = ["a wonderful, moving film", "dull and far too long"]
    for kind in ("classifier", "feature"):
        loaded = load_run(runs[kind])
        answers = label_probabilities(loaded, texts)
        for reply in answers:
            assert set(reply.probabilities) == set(loaded.label_names or [])
            assert sum(reply.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
            assert reply.label == max(reply.probabilities, key=reply.probabilities.__getitem__)
        assert answers[0].probabilities != answers[1].probabilities


def test_chat_turns_follow_the_training_template_or_the_chat_template(lora: LoadedRun) -> None:
    chat = Chat(lora, GREEDY)
    first = chat.reply("Repeat the word apple 2 times.")
    cfg, tokenizer = lora.config.data, lora.tokenizer
    opening = prompt_ids(cfg, tokenizer, {"instruction": "Repeat the word apple 2 times."})
    second = prompt_ids(cfg, tokenizer, {"instruction": "Again."})
    assert chat.prompt_ids("Again.") == [*opening, *first.token_ids, tokenizer.eos_token_id, *second]
    chat.reset()
    assert chat.prompt_ids("Again.") == second
    chat_config = lora.config.model_copy(update={"data": cfg.model_copy(update={"template": "chat"})})
    chatty = Chat(dataclasses.replace(lora, config=chat_config), GREEDY)
    reply = chatty.reply("Hi")
    turns = [("user", "Hi"), ("assistant", reply.text), ("user", "Bye")]
    expected = tokenizer.apply_chat_template(
        [{"role": role, "content": content} for role, content in turns], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(chatty.prompt_ids("Bye")) == expected


def plain_transformers(folder: Path, prompts: list[list[int]], tmp_path: Path, *, classifier: bool = False) -> Any:
    """Load `folder` in a process where finetui's packages and peft cannot be imported; greedy answers (or label
    ids) for `prompts` as plain transformers gives them."""
    fake = tmp_path / "no-finetui"
    for package in ("peft", "engine", "tui"):
        (fake / package).mkdir(parents=True, exist_ok=True)
        (fake / package / "__init__.py").write_text(f"raise ImportError('{package} is not installed here')\n")
    auto = "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"
    script = f"""
import json, sys, torch
for name in ("peft", "engine", "tui"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        sys.exit(f"{{name}} imported")
from transformers import {auto}, AutoTokenizer
model = {auto}.from_pretrained(sys.argv[1]).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
out = []
for ids in json.loads(sys.argv[2]):
    inputs = torch.tensor([ids])
    if {classifier}:
        out.append(int(model(inputs).logits.argmax()))
    else:
        out.append(model.generate(inputs, max_new_tokens=16)[0, len(ids):].tolist())
print(json.dumps({{"answers": out, "chat_template": bool(tokenizer.chat_template)}}))
"""
    env = {**os.environ, "PYTHONPATH": str(fake)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder), json.dumps(prompts)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_a_merged_export_loads_with_plain_transformers_and_answers_as_the_adapter(
    runs: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    loaded = load_run(runs[kind])
    prompts = [prompt_ids(loaded.config.data, loaded.tokenizer, row) for row in ROWS]
    expected = [reply.token_ids for reply in answer(loaded, ROWS, GREEDY)]
    assert expected != [reply.token_ids for reply in answer(loaded, ROWS, GREEDY, base=True)]
    sink = ListSink()
    out = tmp_path / "export"
    result = export_run(runs[kind], out, sink=sink)
    assert (result.same_greedy, result.merged, result.published, result.dtype) == (True, True, True, "fp32")
    assert result.max_logprob_diff <= result.tolerance == (1e-2 if kind == "qlora" else 1e-3)
    assert [event.stage for event in sink.events if isinstance(event, ExportProgress)] == list(export_lib.STAGES)
    files = sorted(path.name for path in out.iterdir())
    assert "model.safetensors" in files and not [name for name in files if name.endswith((".bin", ".pt", ".pth"))]
    assert "adapter_config.json" not in files
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"  # never 4-bit weights
    card = (out / "README.md").read_text()
    assert f"Strategy: `{kind}`" in card and "## Export" in card and "train: `train.jsonl`" in card
    if kind == "lora":  # in a process without finetui and peft
        plainly = plain_transformers(out, prompts, tmp_path)
        assert plainly["chat_template"]
        answers = plainly["answers"]
    else:
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        answers = [model.generate(torch.tensor([ids]), max_new_tokens=16)[0, len(ids) :].tolist() for ids in prompts]
    eos = AutoTokenizer.from_pretrained(out).eos_token_id
    assert [ids[:-1] if ids and ids[-1] == eos else ids for ids in answers] == expected


def test_a_classifier_export_predicts_as_the_run(runs: dict[str, Path], tmp_path: Path) -> None:
    loaded = load_run(runs["classifier"])
    texts = ["a wonderful, moving film", "dull and far too long", "fine"]
    result = export_run(runs["classifier"], tmp_path / "export")
    assert result.same_greedy and result.max_logprob_diff <= 1e-3
    ids = [loaded.tokenizer(text)["input_ids"] for text in texts]
    plainly = plain_transformers(tmp_path / "export", ids, tmp_path, classifier=True)["answers"]
    names = loaded.label_names or []
    assert [names[label] for label in plainly] == [reply.label for reply in label_probabilities(loaded, texts)]
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert list(config["id2label"].values()) == names


def test_an_adapter_only_export_and_a_failed_check_that_publishes_nothing(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = export_run(runs["lora"], tmp_path / "adapter", adapter_only=True)
    assert (result.same_greedy, result.merged, result.dtype) == (True, False, "adapter")
    files = {path.name for path in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    assert "library_name: peft" in (tmp_path / "adapter" / "README.md").read_text()
    monkeypatch.setitem(export_lib.TOLERANCE, "fp32", -1.0)  # any difference, even none, is then too much
    with pytest.raises(ExportMismatch, match="nothing was written to --out") as failed:
        export_run(runs["lora"], tmp_path / "refused" / "nested" / "out")
    assert failed.value.result.same_greedy and not failed.value.result.published
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]  # no folders, no staging left


def test_exports_that_cannot_be_are_refused_before_loading(runs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    cases = [
        (runs["feature"], tmp_path / "new", {}, "feature strategy's classifier is a scikit-learn model"),
        (runs["full"], tmp_path / "new", {"adapter_only": True}, "--adapter-only: full-"),
        (runs["lora"], tmp_path / "taken", {}, "exists and is not an empty folder"),
        (runs["lora"], tmp_path / "new", {"adapter_only": True, "dtype": "bf16"}, "--dtype: an adapter is written"),
    ]
    for run_dir, out, options, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            export_run(run_dir, out, **options)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken"]


# the command line


def finetui(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tui.launcher", *args],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=900,
    )  # fmt: skip


def run_folder(folder: Path, task: str, *, model: bool) -> Path:
    """A run directory as the engine writes it, without training: its config, and an (empty) model/ folder."""
    folder.mkdir(parents=True)
    config = build_config({"model": {"id": "builtin:tiny-llama", "task": task}, "data": {"train": "t.jsonl"}})
    (folder / "config.toml").write_text(tomli_w.dumps(config_to_dict(config)))
    if model:
        (folder / "model").mkdir()
    return folder


def test_bad_input_is_one_line_exit_2_before_torch_loads_and_changes_nothing(tmp_path: Path) -> None:
    causal = run_folder(tmp_path / "causal", "causal", model=True)
    empty = run_folder(tmp_path / "no-model", "causal", model=False)
    classifier = run_folder(tmp_path / "classifier", "classification", model=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    no_torch = tmp_path / "no-torch"
    (no_torch / "torch").mkdir(parents=True)
    (no_torch / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    cases = [
        (["generate", str(empty), "--prompt", "hi"], "no model and no checkpoint to load (run status: unknown)"),
        (["chat", str(classifier)], "is a classification run: chat needs a causal LM"),
        (["generate", str(causal), "--prompt", "  "], "the prompt is empty"),
        (["generate", str(causal), "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens: Input should be"),
        (["chat", str(causal), "--max-new-tokens", "-3"], "max_new_tokens: Input should be greater than"),
        (["export", str(causal), "--out", str(tmp_path / "taken")], "exists and is not an empty folder"),
        (["generate", str(classifier), "--prompt", "hi", "--compare"], "--base and --compare are for causal LMs"),
        (["generate", str(causal), "--data", str(tmp_path / "none.jsonl")], "none.jsonl: no such file"),
    ]
    before = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    for args, fragment in cases:
        result = finetui(*args, cwd=tmp_path, env={"PYTHONPATH": f"{no_torch}{os.pathsep}{ROOT}"})
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and fragment in result.stderr, (args, result.stderr)
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == before


def test_generate_prints_the_json_contract_for_each_model_and_writes_predictions(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    compared = finetui("generate", str(runs["lora"]), "--prompt", "Say hello.", "--compare", "--json",
                       "--max-new-tokens", "8")  # fmt: skip
    assert compared.returncode == 0, compared.stderr
    (record,) = [json.loads(line) for line in compared.stdout.splitlines()]
    assert {"prompt", "output", "tokens", "tokens_per_second"} <= set(record) and record["prompt"] == "Say hello."
    assert set(record["base"]) == {"output", "tokens", "tokens_per_second"} and record["model"] == "fine-tuned"
    assert 0 < record["tokens"] <= 8 and record["tokens_per_second"] > 0
    data = INSTRUCTIONS / "test.jsonl"
    written = finetui("generate", str(runs["lora"]), "--data", str(data), "--max-new-tokens", "4", cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert [p["prompt"] for p in predictions] == [row["instruction"] for row in rows]
    assert [p["reference"] for p in predictions] == [row["output"] for row in rows]
    assert all(isinstance(p["output"], str) and p["tokens"] <= 4 for p in predictions)
    labelled = finetui("generate", str(runs["feature"]), "--prompt", "a wonderful film", "--json")
    assert labelled.returncode == 0, labelled.stderr
    (record,) = [json.loads(line) for line in labelled.stdout.splitlines()]
    assert "output" not in record and sum(record["label_probabilities"].values()) == pytest.approx(1.0)
    assert set(record["label_probabilities"]) == {"negative", "positive"}


def test_chat_streams_turns_ctrl_c_stops_an_answer_and_ctrl_d_ends_with_0(runs: dict[str, Path]) -> None:
    chat = subprocess.Popen(
        [sys.executable, "-m", "tui.launcher", "chat", str(runs["lora"]), "--max-new-tokens", "600"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert chat.stdin is not None and chat.stdout is not None
    chat.stdin.write("/base\nTell me a story.\n")
    chat.stdin.flush()
    assert chat.stdout.read(1)  # the base model's answer is streaming (it never says an end token)
    chat.send_signal(signal.SIGINT)
    # then the fine-tuned model again, a cleared conversation, one more message, and the end of input (Ctrl-D)
    stdout, stderr = chat.communicate("/base\n/reset\nRepeat the word apple 2 times.\n", timeout=900)
    assert chat.returncode == 0, stderr
    assert "(now answering: base model)" in stderr and "(now answering: fine-tuned model)" in stderr
    assert "stopped)" in stderr and "(conversation cleared)" in stderr
    assert stderr.count(" tokens/s, ") == 2  # two answers: the stopped one and the fine-tuned one
    assert "Traceback" not in stderr and stdout


def test_export_json_contract(runs: dict[str, Path], tmp_path: Path) -> None:
    result = finetui("export", str(runs["classifier"]), "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"out", "same_greedy", "max_logprob_diff"} <= set(report)
    assert report["out"] == str(tmp_path / "out") and report["same_greedy"] is True
    assert 0 <= report["max_logprob_diff"] <= 1e-3


@pytest.mark.slow
@needs_smollm2
def test_a_smollm2_lora_run_exports_a_folder_plain_transformers_answers_the_same_from(tmp_path: Path) -> None:
    splits = {"train": str(INSTRUCTIONS / "train.jsonl"), "validation": str(INSTRUCTIONS / "validation.jsonl")}
    data = splits | {"template": "chat", "max_length": 96, "max_train_samples": 8, "max_eval_samples": 2}
    data["max_leak"] = 1.0
    run_dir = train(tmp_path, "lora", model="builtin:smollm2-135m", data=data, max_steps=3, batch_size=4, lr=1e-3)
    loaded = load_run(run_dir)
    expected = [reply.text for reply in answer(loaded, ROWS, GREEDY)]
    result = export_run(run_dir, tmp_path / "export")
    assert (result.same_greedy, result.merged, result.published) == (True, True, True)
    prompts = [prompt_ids(loaded.config.data, loaded.tokenizer, row) for row in ROWS]
    plainly = plain_transformers(tmp_path / "export", prompts, tmp_path)
    assert plainly["chat_template"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert [tokenizer.decode(ids, skip_special_tokens=True) for ids in plainly["answers"]] == expected
