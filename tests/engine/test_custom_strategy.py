"""The `custom` strategy trains exactly the freeze-map groups it lists, and inspect maps it the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.api import run_training
from engine.config import ConfigError, build_config, field_errors
from engine.freeze_map import compute_freeze_map
from engine.inspect import inspect_config
from engine.models import load_model
from engine.sinks import ListSink
from engine.strategies import get_strategy
from tests.conftest import quickstart_data

TOGGLED = ["bert.embeddings", "bert.encoder.layer.2", "classifier"]


def custom_config(tmp_path: Path, trainable: list[str]):
    return build_config(
        {
            "name": "tiny-custom",
            "model": {"id": "builtin:tiny-bert", "task": "classification"},
            "data": quickstart_data(("train", "validation"), max_train_samples=32, max_eval_samples=16),
            "strategy": {"kind": "custom", "trainable": trainable},
            "train": {"max_steps": 2, "batch_size": 8, "logging_steps": 1, "output_dir": str(tmp_path)},
        }
    )


def test_custom_trains_exactly_the_toggled_groups_and_inspect_agrees(tmp_path: Path) -> None:
    config = custom_config(tmp_path, TOGGLED)
    report = inspect_config(config)
    trainable_rows = {row["name"] for row in report["layers"] if row["trainable"]}
    assert trainable_rows == set(TOGGLED)
    assert all(row["trainable"] in (0, row["total"]) for row in report["layers"])

    model = get_strategy(config.strategy, "classification").prepare(load_model(config.model, num_labels=2))
    real = compute_freeze_map(model).to_dict()
    assert [(row["name"], row["total"], row["trainable"]) for row in real["layers"]] == [
        (row["name"], row["total"], row["trainable"]) for row in report["layers"]
    ]
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trained and all(name.startswith(tuple(f"{group}." for group in TOGGLED)) for name in trained)

    frozen_before = model.bert.encoder.layer[0].output.dense.weight.detach().clone()
    result = run_training(config, ListSink())
    assert result.status == "finished", result.summary
    assert result.summary["trainable_params"] == report["trainable_params"]
    assert result.summary["total_params"] == report["total_params"]
    saved = load_model(config.model.model_copy(update={"id": str(result.run_dir / "model")}), num_labels=2)
    assert torch.equal(saved.bert.encoder.layer[0].output.dense.weight, frozen_before)
    assert not torch.equal(
        saved.bert.encoder.layer[2].output.dense.weight, model.bert.encoder.layer[2].output.dense.weight
    )


def test_custom_needs_groups_the_model_has(tmp_path: Path) -> None:
    assert field_errors({"strategy": {"kind": "custom"}}) == {
        "strategy.trainable": "strategy.trainable: custom needs at least one freeze-map group "
        "(`finetui inspect` lists them)"
    }
    with pytest.raises(ConfigError, match=r"strategy.trainable: 'bert.encoder.layer.9' is not a freeze-map group"):
        inspect_config(custom_config(tmp_path, ["classifier", "bert.encoder.layer.9"]))


def test_field_errors_key_every_problem_by_field_in_the_cli_wording() -> None:
    data = {"train": {"lr": "fast", "batch_size": 0}, "strategy": {"r": 0, "target_modules": 5}, "bogus": 1}
    errors = field_errors(data)
    assert set(errors) == {"train.lr", "train.batch_size", "strategy.r", "strategy.target_modules", "bogus"}
    assert errors["strategy.r"] == "strategy.r: Input should be greater than or equal to 1 (got 0)"
    for key in ("train.lr", "strategy.r"):
        single = {"train": {"lr": "fast"}} if key == "train.lr" else {"strategy": {"r": 0}}
        with pytest.raises(ConfigError) as caught:
            build_config(single)
        assert errors[key] == str(caught.value)
    assert field_errors({"strategy": {"kind": "feature"}, "model": {"task": "causal"}}).keys() == {"strategy.kind"}
    assert field_errors({"train": {"lr": 1e-4}}) == {}
