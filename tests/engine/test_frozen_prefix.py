"""The frozen-layer cache: training the top part on cached boundary states equals training the whole model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from engine.api import run_training
from engine.config import StrategyConfig, build_config
from engine.data import prepare_data
from engine.events import Log, Step
from engine.inference.evaluate import evaluate_run
from engine.models import load_model, load_tokenizer
from engine.sinks import ListSink
from engine.strategies import get_strategy
from engine.training import frozen_prefix
from engine.training import session as session_lib
from tests.conftest import QUICKSTART_DATA, quickstart_data


def config_for(tmp_path: Path, model: str, kind: str, cache: bool, name: str) -> Any:
    return build_config(
        {
            "name": name,
            "model": {"id": model, "task": "classification"},
            "data": quickstart_data(max_train_samples=48, max_eval_samples=24),
            "strategy": {"kind": kind, "layers": 1},
            "train": {
                "epochs": 2,
                "batch_size": 8,
                "lr": 3e-3,
                "logging_steps": 1,
                "cache_frozen": cache,
                "output_dir": str(tmp_path),
            },
        }
    )


def _pin_eval(module: torch.nn.Module) -> None:
    """Keep `module` in eval mode whatever `model.train()` says (the reference: a deterministic frozen part)."""
    module.eval()
    module.train = lambda mode=True: module  # type: ignore[method-assign,assignment]


def _frozen_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    plan, reason = frozen_prefix.plan_prefix(model, "classification")
    assert plan is not None, reason
    blocks = list(model.get_submodule(plan.blocks_path))
    return [model.get_submodule(plan.embeddings_path), *blocks[: plan.boundary]]


def _messages(sink: ListSink) -> list[str]:
    return [event.message for event in sink.of_type(Log)]


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        ("builtin:tiny-bert", "last_layers"),
        ("builtin:tiny-bert", "head"),
        ("builtin:tiny-distilbert", "last_layers"),
        ("builtin:tiny-distilbert", "head"),
    ],
)
def test_cached_top_part_trains_like_the_whole_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, kind: str
) -> None:
    build_trainer = session_lib.build_trainer
    # With `last_layers` the cached last block draws dropout masks for the first token only (the rows it computes),
    # so step-by-step equality needs dropout off there; `head` keeps dropout and matches mask for mask.
    without_dropout = kind == "last_layers"

    def build(config: Any, model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if config.name == "reference":
            for module in _frozen_modules(model):
                _pin_eval(module)
        if without_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        return build_trainer(config, model, *args, **kwargs)

    monkeypatch.setattr(session_lib, "build_trainer", build)
    reference_sink = ListSink()
    reference = run_training(config_for(tmp_path, model, kind, False, "reference"), reference_sink)
    cached_sink = ListSink()
    cached = run_training(config_for(tmp_path, model, kind, True, "cached"), cached_sink)
    assert reference.status == cached.status == "finished", (reference.summary, cached.summary)

    assert any(message.startswith("computing the frozen layers once") for message in _messages(cached_sink))
    assert not any("frozen layers once" in message for message in _messages(reference_sink))
    reference_losses = [step.loss for step in reference_sink.of_type(Step)]
    cached_losses = [step.loss for step in cached_sink.of_type(Step)]
    assert len(cached_losses) == len(reference_losses) == 12  # 48 examples / 8 x 2 epochs, one event per step
    assert cached_losses == pytest.approx(reference_losses, rel=1e-4, abs=1e-5)
    assert len(set(cached_losses)) > 1  # it trained
    for split in ("validation", "test"):
        assert cached.summary[split]["loss"] == pytest.approx(reference.summary[split]["loss"], rel=1e-4)
        assert cached.summary[split]["accuracy"] == reference.summary[split]["accuracy"]
    # The saved model is the full model with the trained weights: the same tensors as the reference's.
    saved = load_file(str(cached.run_dir / "model" / "model.safetensors"))
    expected = load_file(str(reference.run_dir / "model" / "model.safetensors"))
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(saved[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    scored = evaluate_run(cached.run_dir, str(QUICKSTART_DATA / "test.jsonl"))
    expected_scores = evaluate_run(reference.run_dir, str(QUICKSTART_DATA / "test.jsonl"))
    assert scored["examples"] == expected_scores["examples"] == 80.0
    assert scored["loss"] == pytest.approx(expected_scores["loss"], rel=1e-4)


def _prepared_tiny_bert(kind: str, model_id: str = "builtin:tiny-bert", layers: int = 1) -> tuple[torch.nn.Module, Any]:
    config = config_for(Path("."), model_id, kind, True, "unit")
    tokenizer = load_tokenizer(config.model)
    prepared = prepare_data(config.data, task="classification", tokenizer=tokenizer, seed=0)
    model = load_model(config.model, num_labels=prepared.num_labels)
    return get_strategy(StrategyConfig(kind=kind, layers=layers), "classification").prepare(model), prepared


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("model_id", ["builtin:tiny-bert", "builtin:tiny-distilbert"])
def test_the_top_part_on_cached_states_equals_the_whole_model(model_id: str, attention: str) -> None:
    model, prepared = _prepared_tiny_bert("last_layers", model_id, layers=2)
    model.set_attn_implementation(attention)
    plan, _ = frozen_prefix.plan_prefix(model, "classification")
    assert plan is not None and plan.boundary == plan.num_blocks - 2 and not plan.first_token_only
    states = frozen_prefix.compute_states(
        model, plan, [prepared.train], prepared.collator, batch_size=16, autocast_dtype=None, check_stop=lambda: None
    )
    assert len(states) == len(prepared.train)
    assert states.nbytes == frozen_prefix.estimated_bytes(plan, [prepared.train], torch.float32)
    frozen_prefix.install(model, plan)
    collator = frozen_prefix.BoundaryCollator(prepared.collator, states, plan)
    rows = frozen_prefix.with_rows([prepared.train])[0]
    batch = collator([rows[index] for index in range(8)])
    assert batch[frozen_prefix.STATES_KEY].shape == (*batch["input_ids"].shape, 32)
    assert not batch["attention_mask"].all()  # padded rows: the mask reaches the first-token-only last block

    model.train()
    first = model(**batch).logits
    second = model(**batch).logits
    assert not torch.allclose(first, second)  # dropout draws new masks in the trainable blocks
    model.eval()
    with torch.no_grad():
        cached = model(**batch).logits
        whole = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(cached, whole, rtol=1e-4, atol=1e-5)
    assert torch.equal(cached, model(**batch).logits.detach())


def test_what_is_not_cached_says_why() -> None:
    full, _ = _prepared_tiny_bert("full")
    assert frozen_prefix.plan_prefix(full, "classification") == (
        None,
        "the embeddings train; nothing below them to cache",
    )
    lora, _ = _prepared_tiny_bert("lora")
    assert frozen_prefix.plan_prefix(lora, "classification")[0] is None
    head, _ = _prepared_tiny_bert("head")
    plan, _ = frozen_prefix.plan_prefix(head, "classification")
    assert plan is not None and plan.first_token_only and plan.boundary == plan.num_blocks == 4
    plan, reason = frozen_prefix.plan_prefix(head, "causal")
    assert plan is None and "classification encoders only" in reason


def test_a_cache_over_the_ram_budget_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frozen_prefix, "ram_budget", lambda: 1024)
    sink = ListSink()
    result = run_training(config_for(tmp_path, "builtin:tiny-bert", "last_layers", True, "budget"), sink)
    assert result.status == "finished", result.summary.get("error")
    warnings = [event.message for event in sink.of_type(Log) if event.level == "warning"]
    assert any("does not fit the RAM budget of 0 MB" in message for message in warnings)
    assert not any(message.startswith("computing the frozen layers once") for message in _messages(sink))
    assert len(sink.of_type(Step)) == 12


def test_llama_classifier_falls_back_with_a_reason(tmp_path: Path) -> None:
    sink = ListSink()
    result = run_training(config_for(tmp_path, "builtin:tiny-llama", "head", True, "llama"), sink)
    assert result.status == "finished", result.summary.get("error")
    assert "frozen layers run at every step: the frozen-layer cache supports bert, distilbert models, not 'llama'" in (
        _messages(sink)
    )
