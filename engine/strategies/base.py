"""What every fine-tuning strategy looks like to the trainer, and the freezing they share.

A strategy decides which parameters of a loaded model learn: `load_model` loads it the way the strategy needs
(4-bit for QLoRA, a bf16 frozen base for adapters on GPUs), then `prepare` freezes the model or wraps it in
adapters and returns the module to train. The training session knows a strategy only by what it declares:
`is_peft` (save an adapter, not the whole model), `trains_with_trainer` (feature extraction fits a classifier
instead of running the Trainer) and `caches_frozen_prefix` (its frozen lower layers can be computed once).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from engine.config import ConfigError, ModelConfig, StrategyConfig
from engine.models import load_model


class StrategyError(ConfigError):
    """A strategy setting that does not fit the model (too many layers, unknown target modules, no bitsandbytes)."""


class Strategy:
    """Base class: one subclass per `strategy.kind`."""

    kind: ClassVar[str]
    is_peft: ClassVar[bool] = False
    trains_with_trainer: ClassVar[bool] = True
    caches_frozen_prefix: ClassVar[bool] = False
    """Whole layers train on top of frozen ones (`train.cache_frozen` can compute the frozen part once)."""

    def __init__(self, config: StrategyConfig, task: str) -> None:
        self.config = config
        self.task = task

    def quantization_config(self, *, on_cuda: bool) -> Any | None:
        """The `quantization_config` to load the model with; None loads it unquantised."""
        return None

    def load_dtype(self, precision: str) -> torch.dtype:
        """The dtype the weights load in: bf16 for the frozen base of an adapter under bf16; fp32 otherwise (weights
        that train stay fp32, and bf16 precision autocasts the computation)."""
        return torch.bfloat16 if precision == "bf16" and self.is_peft else torch.float32

    def load_model(
        self,
        model: ModelConfig,
        *,
        num_labels: int | None,
        label_names: list[str] | None,
        device: str,
        precision: str,
        device_map: str | None = None,
    ) -> PreTrainedModel:
        """Load the model as this strategy trains it: quantised when `quantization_config` says so, and adapter
        strategies keep a frozen bf16 base when training in bf16."""
        return load_model(
            model,
            num_labels=num_labels if self.task == "classification" else None,
            label_names=label_names,
            quantization_config=self.quantization_config(on_cuda=device == "cuda"),
            dtype=self.load_dtype(precision),
            device_map=device_map,
        )

    def prepare(self, model: PreTrainedModel) -> nn.Module:
        """Freeze or wrap the loaded model and return the module to train."""
        raise NotImplementedError

    def name_base(self, saved: Path, base_id: str) -> None:
        """Make the model saved in `saved` name its base model `base_id` (a saved adapter points at the model it
        adapts; the other strategies save whole models)."""

    def prepare_meta(self, model: PreTrainedModel) -> nn.Module:
        """`prepare` for a model built on the meta device from its config alone (`finetui inspect`)."""
        return self.prepare(model)


def train_only(model: nn.Module, module_names: Iterable[str]) -> nn.Module:
    """Freeze every parameter of `model` except those inside the named submodules."""
    model.requires_grad_(False)
    for name in module_names:
        model.get_submodule(name).requires_grad_(True)
    return model
