"""What every fine-tuning strategy looks like to the trainer, and the freezing they share.

A strategy decides which parameters of a loaded model learn: it may ask for a quantised load first
(`quantization_config`), then `prepare` freezes the model or wraps it in adapters and returns the module to
train. The trainer never needs to know which strategy it runs beyond `is_peft` (save an adapter, not the
whole model) and `trains_with_trainer` (feature extraction fits a classifier instead of running the Trainer).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from engine.config import ConfigError, StrategyConfig


class StrategyError(ConfigError):
    """A strategy setting that does not fit the model (too many layers, unknown target modules, no bitsandbytes)."""


class Strategy:
    """Base class: one subclass per `strategy.kind`."""

    kind: ClassVar[str]
    is_peft: ClassVar[bool] = False
    trains_with_trainer: ClassVar[bool] = True

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

    def prepare(self, model: PreTrainedModel) -> nn.Module:
        """Freeze or wrap the loaded model and return the module to train."""
        raise NotImplementedError

    def prepare_meta(self, model: PreTrainedModel) -> nn.Module:
        """`prepare` for a model built on the meta device from its config alone (`finetui inspect`)."""
        return self.prepare(model)


def train_only(model: nn.Module, module_names: Iterable[str]) -> nn.Module:
    """Freeze every parameter of `model` except those inside the named submodules."""
    model.requires_grad_(False)
    for name in module_names:
        model.get_submodule(name).requires_grad_(True)
    return model
