"""What a new user hits in the first hour: causal eval, progress from the first step, one checkpoint per stop,
the pooler LoRA trains, encoder-decoder models, portable adapters with a real model card, thread settings,
an offline hub, and messages that say what to type next."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from rich.console import Console
from transformers import BertConfig, BertModel, T5Config

from engine.api import run_training
from engine.config import build_config, load_config
from engine.events import Checkpoint, Log, Progress, RunStarted, RunStopped, Step
from engine.inference.evaluate import evaluate_run
from engine.inspect import inspect_config
from engine.models import build_meta_model
from engine.presets import bundled_presets
from engine.sinks import ListSink
from engine.views import RichProgressSink, TextLogSink, fold_blocks
from tests.conftest import QUICKSTART_DATA, ROOT, needs_smollm2, quickstart_data

INSTRUCTIONS = ROOT / "tests" / "fixtures" / "run-0b7cde0" / "data"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def causal_config(tmp_path: Path, **train: object) -> dict[str, object]:
    data = {split: str(INSTRUCTIONS / f"{split}.jsonl") for split in ("train", "validation", "test")}
    settings = {"max_steps": 4, "batch_size": 8, "lr": 1e-3, "output_dir": str(tmp_path)} | train
    return {
        "name": "causal",
        "model": {"id": "builtin:tiny-llama"},
        "data": {**data, "max_length": 256, "max_leak": 1.0},  # the small instruction set repeats rows
        "strategy": {"kind": "lora", "r": 4},
        "train": settings,
    }


def test_eval_scores_a_causal_run(tmp_path: Path) -> None:
    result = run_training(build_config(causal_config(tmp_path)), ListSink())
    assert result.status == "finished", result.summary
    metrics = evaluate_run(result.run_dir, str(INSTRUCTIONS / "test.jsonl"))
    assert set(metrics) == {"loss", "perplexity", "examples"}
    assert metrics["examples"] == 10 and isinstance(metrics["examples"], int)
    assert metrics["loss"] == pytest.approx(result.summary["test"]["loss"], rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    printed = cli("eval", str(result.run_dir), "--data", str(INSTRUCTIONS / "test.jsonl"))
    assert printed.returncode == 0, printed.stderr
    assert "examples 10" in printed.stdout and "perplexity" in printed.stdout
    assert printed.stderr == ""  # no LOAD REPORT table, no library warnings


@pytest.mark.slow
@needs_smollm2
def test_eval_scores_a_smollm2_lora_run(tmp_path: Path) -> None:
    config = causal_config(tmp_path, max_steps=2, batch_size=2)
    config["model"] = {"id": "builtin:smollm2-135m"}
    config["data"] = {**config["data"], "max_length": 96, "max_train_samples": 8, "max_eval_samples": 4}  # type: ignore[dict-item]
    result = run_training(build_config(config), ListSink())
    assert result.status == "finished", result.summary
    metrics = evaluate_run(result.run_dir, str(INSTRUCTIONS / "test.jsonl"))
    assert metrics["examples"] == 10
    assert 0 < metrics["loss"] < 10  # a pretrained model: far below the ~10.8 of a uniform guess over 49,152 tokens


def test_progress_moves_from_the_first_step_and_the_last_loss_is_logged(tmp_path: Path) -> None:
    sink = ListSink()
    result = run_training(build_config(causal_config(tmp_path, max_steps=3, logging_steps=10)), sink)
    assert result.status == "finished"
    positions = [event for event in sink.events if isinstance(event, Step | Progress)]
    assert isinstance(positions[0], Progress) and positions[0].step == 1  # before any loss is logged
    assert positions[0].max_steps == 3 and positions[0].samples_per_second > 0
    assert [step.step for step in sink.of_type(Step)] == [3]  # the last step's loss, whatever logging_steps is


def test_a_stop_writes_one_checkpoint(tmp_path: Path) -> None:
    stop = threading.Event()

    class StopAtStep2(ListSink):
        def emit(self, event: object) -> None:
            super().emit(event)  # type: ignore[arg-type]
            if isinstance(event, Step | Progress) and event.step >= 2:
                stop.set()

    config = {
        "name": "stop",
        "model": {"id": "builtin:tiny-bert"},
        "data": quickstart_data(max_train_samples=96),
        "strategy": {"kind": "head"},
        "train": {"epochs": 1, "batch_size": 8, "logging_steps": 1, "output_dir": str(tmp_path)},
    }
    sink = StopAtStep2()
    result = run_training(build_config(config), sink, stop_event=stop)
    assert result.status == "stopped"
    [stopped] = sink.of_type(RunStopped)
    assert 2 <= stopped.step < 12  # in the middle of the epoch, whose end would save again
    assert [event.step for event in sink.of_type(Checkpoint)] == [stopped.step]
    assert sorted(path.name for path in (result.run_dir / "checkpoints").iterdir()) == [f"checkpoint-{stopped.step}"]


def write_checkpoint_index(folder: Path, config: BertConfig, *, pooler: bool) -> Path:
    """A folder as the hub has bert-base: its config and the weight names of its checkpoint (no weights needed)."""
    folder.mkdir()
    config.architectures = ["BertModel"]
    config.save_pretrained(folder)
    names = [name for name, _ in build_meta_model_names(config) if pooler or not name.startswith("pooler.")]
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, "x")}))
    return folder


def build_meta_model_names(config: BertConfig) -> list[tuple[str, object]]:
    with torch.device("meta"):
        return list(BertModel(config).named_parameters())


def test_lora_trains_the_pooler_only_when_the_checkpoint_lacks_one(tmp_path: Path) -> None:
    bert_base = BertConfig()  # bert-base-uncased's shape
    settings = ["strategy.kind=lora", "strategy.r=8", 'strategy.target_modules=["query", "key"]', "model.num_labels=2"]
    with_pooler = write_checkpoint_index(tmp_path / "bert-base", bert_base, pooler=True)
    report = inspect_config(build_config({"model": {"id": str(with_pooler)}}, settings))
    meta = build_meta_model(build_config({"model": {"id": str(with_pooler)}}).model, num_labels=2)
    peft_model = get_peft_model(
        meta,
        LoraConfig(r=8, target_modules=["query", "key"], modules_to_save=["classifier"], task_type=TaskType.SEQ_CLS),
    )
    assert report["trainable_params"] == peft_model.get_nb_trainable_parameters()[0] == 296_450
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["bert.pooler"]["trainable"] == 0 and not rows["bert.pooler"]["new"]
    assert rows["classifier"]["new"]

    without_pooler = write_checkpoint_index(tmp_path / "no-pooler", bert_base, pooler=False)
    report = inspect_config(build_config({"model": {"id": str(without_pooler)}}, settings))
    rows = {row["name"]: row for row in report["layers"]}
    assert report["trainable_params"] == 296_450 + 768 * 768 + 768  # the new pooler trains too
    assert rows["bert.pooler"]["new"] and rows["bert.pooler"]["trainable"] == 768 * 768 + 768


def test_encoder_decoder_models_are_refused_with_one_line(tmp_path: Path) -> None:
    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=100).save_pretrained(tmp_path / "t5")
    run = ["run", "--set", f"data.train={QUICKSTART_DATA / 'train.jsonl'}", "--output-dir", str(tmp_path / "runs")]
    for args in (["inspect"], run):
        result = cli(*args, "--model", str(tmp_path / "t5"))
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0 and "is an encoder-decoder model (t5)" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_builtin_adapter_names_its_hub_base_and_has_a_model_card(tmp_path: Path) -> None:
    config = {
        "name": "card",
        "model": {"id": "builtin:minilm-l6"},
        "data": quickstart_data(max_train_samples=16, max_eval_samples=8),
        "strategy": {"kind": "lora"},
        "train": {"max_steps": 1, "batch_size": 8, "output_dir": str(tmp_path)},
    }
    result = run_training(build_config(config), ListSink())
    assert result.status == "finished", result.summary
    model_dir = result.run_dir / "model"
    adapter = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    card = (model_dir / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card and "library_name: peft" in card
    assert "- Strategy: `lora` (r = 8" in card and "- train: `train.jsonl`: 16 examples" in card
    assert f"| validation | accuracy | {result.summary['validation']['accuracy']:.4f} |" in card


def test_omp_num_threads_is_respected(tmp_path: Path) -> None:
    data = quickstart_data(max_train_samples=16, max_eval_samples=8)
    sets = [f"data.{key}={json.dumps(value)}" for key, value in data.items()]
    args = ["run", "--model", "builtin:tiny-bert", "--strategy", "head", "--json", "--output-dir", str(tmp_path)]
    result = cli(*args, *(f"--set={item}" for item in [*sets, "train.max_steps=1"]), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    messages = [event["message"] for event in map(json.loads, result.stdout.splitlines()) if event["type"] == "log"]
    assert any(message.endswith("fp32, 1 CPU thread)") for message in messages), messages


def test_an_unreachable_hub_fails_at_once_without_retries(tmp_path: Path) -> None:
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {key: value for key, value in os.environ.items() if key not in offline}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: like a machine without network
    model = ["inspect", "--model", "nobody-xyz/no-such-model"]
    data = ["data", "--model", "builtin:tiny-bert", "--set", "data.train=nobody-xyz/no-such-dataset"]
    model_error, data_error = (
        subprocess.run(
            [sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
        )
        for args in (model, data)
    )
    assert model_error.returncode == 2
    assert model_error.stderr.strip().splitlines() == [
        "finetui: error: model.id: nobody-xyz/no-such-model: the Hugging Face hub is not reachable (offline?) and "
        "this model is not in the local cache; give --model a local model folder (for inspect, a folder holding its "
        "config.json is enough)"
    ]
    assert data_error.returncode == 2
    assert data_error.stderr.strip().splitlines() == [
        "finetui: error: data.train: nobody-xyz/no-such-dataset: the Hugging Face hub is not reachable (offline?) and "
        "this dataset is not in the local cache; give a local data file"
    ]


def test_a_list_setting_given_one_name_shows_the_quoted_form() -> None:
    result = cli("inspect", "--model", "builtin:tiny-bert", "--set", "strategy.trainable=model.layers.3")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("""as a list: --set 'strategy.trainable=["model.layers.3"]'""")


def test_a_stop_message_ends_with_the_command_that_continues_the_run() -> None:
    started = RunStarted(run_dir="runs/x-1", name="x", model="m", strategy="head", task="classification", config={})
    stopped = RunStopped(step=61, checkpoint="runs/x-1/checkpoints/checkpoint-61")
    text = io.StringIO()
    log = TextLogSink(text)
    log.emit(started)
    log.emit(stopped)
    assert text.getvalue().rstrip().endswith("; continue with: finetui run --resume runs/x-1")
    console = Console(file=io.StringIO(), width=200)
    view = RichProgressSink(console)
    view.emit(started)
    view.emit(stopped)
    assert console.file.getvalue().rstrip().endswith("continue with: finetui run --resume runs/x-1")  # type: ignore[attr-defined]


def test_the_progress_line_fits_80_columns_with_its_elapsed_time() -> None:
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    view = RichProgressSink(console)
    for step in range(1, 81):
        view.emit(
            Step(step=step, max_steps=80, epoch=step / 80, loss=0.0284, lr=2e-5, grad_norm=1.0, samples_per_second=73.0,
                 tokens_per_second=2000.0, elapsed_s=step * 0.4, eta_s=(80 - step) * 0.4)
        )  # fmt: skip
    view.emit(Log(level="info", message="done"))
    view._stop_progress()
    lines = [line for line in console.file.getvalue().replace("\r", "\n").splitlines() if "step 80/80" in line]  # type: ignore[attr-defined]
    last = lines[-1].replace("\x1b[2K", "")
    assert len(last) <= 80 and "…" not in last, last
    assert "100%" in last and "0:00:0" in last and "loss 0.0284" in last and "73.0 samples/s" in last


def test_identical_blocks_fold_into_one_row() -> None:
    block = {"kind": "block", "total": 10, "trainable": 2, "dtype": "float16", "quantization": None}
    layers = [
        {"name": "model.embed_tokens", "kind": "embeddings", "total": 5, "trainable": 0, "dtype": "float16"},
        *({**block, "name": f"model.layers.{index}"} for index in range(32)),
        {"name": "lm_head", "kind": "head", "total": 5, "trainable": 0, "dtype": "float16"},
    ]
    folded = fold_blocks(layers)
    assert [row["name"] for row in folded] == ["model.embed_tokens", "model.layers.0-31 ×32", "lm_head"]
    assert (folded[1]["total"], folded[1]["trainable"]) == (320, 64)
    different = [*layers[:3], {**layers[3], "trainable": 0}, *layers[4:]]
    assert [row["name"] for row in fold_blocks(different)][:5] == [
        "model.embed_tokens",
        "model.layers.0",
        "model.layers.1",
        "model.layers.2",
        "model.layers.3-31 ×29",
    ]


def test_the_7b_qlora_preset_fits_in_the_memory_its_comment_claims(shared_configs: Path) -> None:
    """The preset, the README and the estimate agree: on a GPU at the seed recipe's batch 4 x 512, with gradient
    checkpointing, the estimate stays under the free memory the preset asks for (less room for the CUDA context)."""
    preset = next(path for path in bundled_presets() if path.stem == "llama2-7b-qlora-alpaca")
    claimed_gb = float(re.search(r"~(\d+) GB free", preset.read_text()).group(1))
    llama = str(shared_configs / "meta-llama__Llama-2-7b-hf")
    config = load_config(preset, [f"model.id={llama}", "train.device=cuda"])
    memory = inspect_config(config)["memory"]
    assert config.train.gradient_checkpointing and (config.train.batch_size, config.data.max_length) == (4, 512)
    assert memory["total_bytes"] + 2**30 <= claimed_gb * 10**9
    assert f"~{claimed_gb:.0f} GB" in (ROOT / "README.md").read_text()
