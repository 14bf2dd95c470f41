"""Blocks, output layers and LoRA targets of BERT, DistilBERT, Llama and GPT-2, plain and peft-wrapped."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
)

from engine.architecture import auto_target_modules, find_blocks, output_module_names, unwrap

TINY_CONFIGS: dict[str, PretrainedConfig] = {
    "bert": BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64
    ),
    "distilbert": DistilBertConfig(vocab_size=100, dim=32, n_layers=3, n_heads=2, hidden_dim=64),
    "llama": LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "gpt2": GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=2, bos_token_id=1, eos_token_id=2),
}

DISTILBERT_HEAD = ["pre_classifier", "classifier"]
CASES = [
    # (config, task, blocks, output modules, auto targets)
    ("bert", "classification", "bert.encoder.layer", ["bert.pooler", "classifier"], ["query", "value"]),
    (
        "distilbert",
        "classification",
        "distilbert.transformer.layer",
        ["pre_classifier", "classifier"],
        ["q_lin", "v_lin"],
    ),
    ("llama", "classification", "model.layers", ["score"], ["q_proj", "v_proj"]),
    ("llama", "causal", "model.layers", ["lm_head"], ["q_proj", "v_proj"]),
    ("gpt2", "classification", "transformer.h", ["score"], ["c_attn"]),
    ("gpt2", "causal", "transformer.h", ["lm_head"], ["c_attn"]),
]


def build(config_name: str, task: str) -> nn.Module:
    auto_class = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    return auto_class.from_config(TINY_CONFIGS[config_name])


@pytest.mark.parametrize(("config_name", "task", "blocks", "outputs", "targets"), CASES)
def test_plain_model_structure(
    config_name: str, task: str, blocks: str, outputs: list[str], targets: list[str]
) -> None:
    model = build(config_name, task)
    blocks_name, block_list = find_blocks(model)
    assert blocks_name == blocks
    assert block_list is model.get_submodule(blocks)
    assert len(block_list) == 3
    assert output_module_names(model, task) == outputs
    for name in outputs:
        model.get_submodule(name)
    assert auto_target_modules(model) == targets


@pytest.mark.parametrize(("config_name", "task", "blocks", "outputs", "targets"), CASES)
def test_peft_wrapped_model_gives_base_relative_names(
    config_name: str, task: str, blocks: str, outputs: list[str], targets: list[str]
) -> None:
    model = build(config_name, task)
    modules_to_save = outputs if task == "classification" else None
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=targets, modules_to_save=modules_to_save))
    assert unwrap(wrapped) is model
    blocks_name, block_list = find_blocks(wrapped)
    assert blocks_name == blocks
    assert len(block_list) == 3
    assert output_module_names(wrapped, task) == outputs
    assert auto_target_modules(wrapped) == targets


def test_unwrap_returns_a_plain_model_itself() -> None:
    model = build("bert", "classification")
    assert unwrap(model) is model


def test_bert_without_pooler_trains_only_the_classifier() -> None:
    model = build("bert", "classification")
    model.bert.pooler = None
    assert output_module_names(model, "classification") == ["classifier"]


def test_find_blocks_prefers_the_biggest_uniform_module_list() -> None:
    model = nn.Module()
    model.small = nn.ModuleList([nn.Linear(2, 2) for _ in range(5)])
    model.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])
    model.mixed = nn.ModuleList([nn.Linear(64, 64), nn.LayerNorm(64)])
    name, blocks = find_blocks(model)
    assert name == "blocks"
    assert blocks is model.blocks


def test_missing_structures_raise_value_error() -> None:
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        find_blocks(plain)
    with pytest.raises(ValueError, match="no default LoRA target modules"):
        auto_target_modules(plain)
    causal = build("llama", "causal")
    with pytest.raises(ValueError, match="no classification head"):
        output_module_names(causal, "classification")
    with pytest.raises(ValueError, match="no language-model head"):
        output_module_names(build("bert", "classification"), "causal")
    with pytest.raises(ValueError, match="unknown task"):
        output_module_names(causal, "translation")
