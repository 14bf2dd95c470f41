"""Finetuning II (Raschka): update every parameter of the pretrained model.

Almost always the most accurate strategy and the gold standard to compare others against, but it needs
gradients and two AdamW states for every weight (about four times the model's size in memory) and saves a
whole model per run. Pick it for small models, or when accuracy matters more than memory and time.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers import PreTrainedModel

from engine.strategies.base import Strategy


class FullStrategy(Strategy):
    kind: ClassVar[str] = "full"

    def prepare(self, model: PreTrainedModel) -> nn.Module:
        return model.requires_grad_(True)
