"""Freeze-map counts against peft's and published numbers; grouping; the memory estimate; JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

from engine.architecture import output_module_names
from engine.config import ModelConfig, build_config
from engine.freeze_map import (
    CPU_ACTIVATION_OVERHEAD,
    CPU_FRAMEWORK_BYTES,
    CPU_WEIGHTS_OVERHEAD,
    FreezeMap,
    compute_freeze_map,
)
from engine.inspect import inspect_config
from engine.models import build_meta_model, load_model
from tests.conftest import SHARED, needs_shared

CONFIGS = SHARED / "configs"
LLAMA_7B = ModelConfig(id=str(CONFIGS / "meta-llama__Llama-2-7b-hf"), task="causal")
DISTILBERT = ModelConfig(id=str(CONFIGS / "distilbert__distilbert-base-uncased"))


def train_only(model: nn.Module, prefixes: list[str]) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad = any(name == prefix or name.startswith(f"{prefix}.") for prefix in prefixes)


@needs_shared
@pytest.mark.parametrize(
    ("rank", "trainable", "total"), [(8, 4_194_304, 6_742_609_920), (64, 33_554_432, 6_771_970_048)]
)
def test_llama_7b_lora_counts_match_peft(rank: int, trainable: int, total: int) -> None:
    model = get_peft_model(
        build_meta_model(LLAMA_7B, num_labels=None),
        LoraConfig(r=rank, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert model.get_nb_trainable_parameters() == (trainable, total)
    freeze_map = compute_freeze_map(model)
    assert (freeze_map.trainable_params, freeze_map.total_params) == (trainable, total)
    assert freeze_map.trainable_percent == pytest.approx(100 * trainable / total)
    blocks = [layer for layer in freeze_map.layers if layer.kind == "block"]
    assert [layer.name for layer in blocks] == [f"model.layers.{index}" for index in range(32)]
    assert {layer.trainable for layer in blocks} == {trainable // 32}
    assert [(layer.name, layer.kind, layer.trainable) for layer in freeze_map.layers if layer.kind != "block"] == [
        ("model.embed_tokens", "embeddings", 0),
        ("model.norm", "other", 0),
        ("lm_head", "head", 0),
    ]
    assert freeze_map.memory is None


@needs_shared
def test_distilbert_head_only() -> None:
    model = build_meta_model(DISTILBERT, num_labels=2)
    train_only(model, output_module_names(model, "classification"))
    freeze_map = compute_freeze_map(model)
    assert (freeze_map.trainable_params, freeze_map.total_params) == (592_130, 66_955_010)
    rows = {layer.name: layer for layer in freeze_map.layers}
    assert rows["pre_classifier"].trainable == 590_592
    assert rows["classifier"].trainable == 1_538
    assert rows["distilbert.embeddings"].kind == "embeddings"
    assert rows["distilbert.embeddings"].trainable == 0
    assert sum(layer.kind == "block" for layer in freeze_map.layers) == 6


def test_four_bit_tiny_llama_with_lora_matches_peft() -> None:
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = load_model(
        ModelConfig(id="builtin:tiny-llama", task="causal"), num_labels=None, quantization_config=quantization
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    freeze_map = compute_freeze_map(model, batch_size=2, seq_len=16)
    assert (freeze_map.trainable_params, freeze_map.total_params) == model.get_nb_trainable_parameters()
    assert freeze_map.trainable_params == 4 * 8 * (64 + 64 + 64 + 32)  # 4 blocks x (q: 64->64, v: 64->32)
    blocks = [layer for layer in freeze_map.layers if layer.kind == "block"]
    assert {layer.quantization for layer in blocks} == {"nf4"}
    assert {layer.trainable for layer in blocks} == {8 * (64 + 64 + 64 + 32)}
    packed = sum(p.numel() for p in model.parameters() if type(p).__name__ == "Params4bit")
    memory = freeze_map.memory
    assert memory is not None
    assert memory.weights_bytes > packed  # packed 4-bit bytes plus their quantisation constants


def test_classification_lora_counts_the_saved_head_copies() -> None:
    model = load_model(ModelConfig(id="builtin:tiny-bert"), num_labels=2)
    heads = output_module_names(model, "classification")
    model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=heads, task_type="SEQ_CLS")
    )
    freeze_map = compute_freeze_map(model)
    assert (freeze_map.trainable_params, freeze_map.total_params) == model.get_nb_trainable_parameters()
    rows = {layer.name: layer for layer in freeze_map.layers}
    pooler = 32 * 32 + 32
    classifier = 32 * 2 + 2
    assert (rows["bert.pooler"].total, rows["bert.pooler"].trainable) == (2 * pooler, pooler)
    assert (rows["classifier"].total, rows["classifier"].trainable) == (2 * classifier, classifier)
    assert rows["bert.embeddings"].trainable == 0


def test_tied_weights_counted_once() -> None:
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    unique = {id(parameter): parameter.numel() for parameter in model.parameters()}
    freeze_map = compute_freeze_map(model)
    assert freeze_map.total_params == sum(unique.values()) == model.num_parameters()
    assert "lm_head" not in {layer.name for layer in freeze_map.layers}


def test_memory_estimate_formulas() -> None:
    model = load_model(ModelConfig(id="builtin:tiny-bert"), num_labels=2)
    total = sum(parameter.numel() for parameter in model.parameters())
    train_only(model, output_module_names(model, "classification"))
    head_only = compute_freeze_map(model, batch_size=8, seq_len=64)
    memory = head_only.memory
    assert memory is not None
    assert memory.weights_bytes == 4 * total
    assert memory.gradients_bytes == 4 * head_only.trainable_params
    assert memory.optimizer_bytes == 8 * head_only.trainable_params
    # nothing below the head needs a backward: the peak is a forward at the eval batch (2 x 8) through one block,
    # 1024 tokens x 4 bytes x (10.5 x 32 + 2 x 64)
    assert memory.activations_bytes == 4 * 1024 * (336 + 128) == 1_900_544
    assert memory.overhead_bytes == 0  # no device given: no allocator or framework overhead
    parts = memory.weights_bytes + memory.gradients_bytes + memory.optimizer_bytes + memory.activations_bytes
    assert memory.total_bytes == parts
    assert "estimate" in memory.note

    train_only(model, ["bert.encoder.layer.3", *output_module_names(model, "classification")])
    last_block = compute_freeze_map(model, batch_size=8, seq_len=64).memory
    # tiny BERT: hidden 32, intermediate 64, 4 heads, attention dropout 0.1 (SDPA keeps the probabilities on a CPU);
    # 512 tokens x 4 bytes x (10.5 x 32 + 2 x 64) + 3 x 4 bytes x 4 heads x 64 x 512 tokens
    per_block = 4 * 512 * (336 + 128) + 3 * 4 * 4 * 64 * 512
    assert last_block is not None
    assert last_block.activations_bytes == per_block == 2_523_136
    assert "1/4 blocks" in last_block.note

    train_only(model, [""] + [name for name, _ in model.named_parameters()])
    full = compute_freeze_map(model, batch_size=8, seq_len=64).memory
    checkpointed = compute_freeze_map(model, batch_size=8, seq_len=64, gradient_checkpointing=True).memory
    assert full is not None and checkpointed is not None
    assert full.activations_bytes == 4 * per_block
    assert checkpointed.activations_bytes == 4 * 8 * 64 * 32 * 4 + per_block
    assert "gradient checkpointing" in checkpointed.note
    on_cuda = compute_freeze_map(model, batch_size=8, seq_len=64, precision="bf16", device="cuda").memory
    assert on_cuda is not None  # bf16 activations, and SDPA's fused kernels keep no probabilities on CUDA
    assert on_cuda.activations_bytes == 4 * 2 * 512 * (336 + 128)
    on_cpu = compute_freeze_map(model, batch_size=8, seq_len=64, precision="fp32", device="cpu").memory
    assert on_cpu is not None
    weights_share = CPU_WEIGHTS_OVERHEAD * full.weights_bytes
    overhead = CPU_ACTIVATION_OVERHEAD * full.activations_bytes + CPU_FRAMEWORK_BYTES + weights_share
    assert on_cpu.overhead_bytes == int(overhead)
    assert on_cpu.total_bytes == full.total_bytes + on_cpu.overhead_bytes
    model.requires_grad_(False)  # `feature`: a forward at the eval batch, no Trainer
    frozen = compute_freeze_map(model, batch_size=8, seq_len=64, precision="fp32", device="cpu").memory
    assert frozen is not None and frozen.activations_bytes == 4 * 1024 * (336 + 128)
    assert frozen.overhead_bytes == int(CPU_ACTIVATION_OVERHEAD * frozen.activations_bytes)


def test_the_estimate_prices_weights_in_the_dtype_training_uses(shared_configs: Path) -> None:
    """Llama-2-7B's checkpoint is fp16, but `full` trains fp32 weights (16 bytes a parameter with AdamW), and LoRA
    keeps a bf16 base only on a GPU."""
    llama = str(shared_configs / "meta-llama__Llama-2-7b-hf")

    def inspect(strategy: str, device: str) -> dict:
        overrides = [f"model.id={json.dumps(llama)}", f"strategy.kind={strategy}", f"train.device={device}"]
        return inspect_config(build_config({"train": {"batch_size": 1}, "data": {"max_length": 512}}, overrides))

    full = inspect("full", "cpu")
    memory = full["memory"]
    assert (full["device"], full["precision"]) == ("cpu", "fp32")
    assert memory["weights_bytes"] == memory["gradients_bytes"] == 4 * full["total_params"]
    assert memory["optimizer_bytes"] == 8 * full["total_params"]
    assert memory["total_bytes"] > 16 * full["total_params"]  # was 12 x (fp16 weights and gradients): 27 GB short
    assert inspect("full", "cuda")["memory"]["weights_bytes"] == memory["weights_bytes"]  # bf16 autocasts fp32 weights

    lora_gpu, lora_cpu = inspect("lora", "cuda"), inspect("lora", "cpu")
    assert lora_gpu["precision"] == "bf16"
    frozen = lora_gpu["total_params"] - lora_gpu["trainable_params"]
    assert lora_gpu["memory"]["weights_bytes"] == 2 * frozen + 4 * lora_gpu["trainable_params"]
    assert lora_cpu["memory"]["weights_bytes"] == 4 * lora_cpu["total_params"]  # train.device=cpu: fp32

    qlora = inspect("qlora", "cuda")
    rows = {layer["name"]: layer for layer in qlora["layers"]}
    assert rows["model.embed_tokens"]["dtype"] == "float32"  # prepare_model_for_kbit_training casts it up
    assert rows["model.layers.0"]["quantization"] == "nf4"


@needs_shared
def test_llama_7b_lora_memory_is_plausible() -> None:
    model = get_peft_model(
        build_meta_model(LLAMA_7B, num_labels=None, dtype=torch.bfloat16),
        LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    memory = compute_freeze_map(model, batch_size=1, seq_len=512, gradient_checkpointing=True).memory
    assert memory is not None
    gib = 2**30
    assert 12.5 * gib < memory.weights_bytes < 12.6 * gib  # 6.74 B x 2 bytes (LoRA weights in fp32)
    assert memory.optimizer_bytes == 8 * 4_194_304
    assert 0.2 * gib < memory.activations_bytes < 1 * gib  # 32 block inputs + one block + fp32 logits
    assert 12.8 * gib < memory.total_bytes < 14 * gib


@needs_shared
def test_json_round_trip() -> None:
    model = build_meta_model(DISTILBERT, num_labels=2)
    train_only(model, output_module_names(model, "classification"))
    freeze_map = compute_freeze_map(model, batch_size=4, seq_len=32)
    data = json.loads(json.dumps(freeze_map.to_dict()))
    assert set(data) == {"total_params", "trainable_params", "trainable_percent", "layers", "memory"}
    old_memory = {key: value for key, value in data["memory"].items() if key != "overhead_bytes"}
    assert FreezeMap.from_dict({**data, "memory": old_memory}).memory is not None  # written before overhead
    assert set(data["layers"][0]) == {"name", "kind", "total", "trainable", "dtype", "quantization", "new"}
    assert FreezeMap.from_dict(data) == freeze_map
    without_memory = compute_freeze_map(model)
    assert without_memory.to_dict()["memory"] is None
    assert FreezeMap.from_dict(without_memory.to_dict()) == without_memory
