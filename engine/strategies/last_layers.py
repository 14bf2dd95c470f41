"""Between Finetuning I and II (Raschka): train the output layers plus the last `strategy.layers` blocks.

The lower blocks hold general language features and stay frozen; the top blocks, which specialise most
during fine-tuning, learn together with the head. Accuracy and cost grow with `layers`, from `head` (0) to
nearly `full` (all blocks). Pick it when full fine-tuning does not fit but the head alone is not enough.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers import PreTrainedModel

from engine.architecture import find_blocks, output_module_names
from engine.strategies.base import Strategy, StrategyError, train_only


class LastLayersStrategy(Strategy):
    kind: ClassVar[str] = "last_layers"
    caches_frozen_prefix: ClassVar[bool] = True

    def prepare(self, model: PreTrainedModel) -> nn.Module:
        try:
            blocks_name, blocks = find_blocks(model)
        except ValueError as exc:
            raise StrategyError(f"strategy.kind: last_layers needs transformer blocks ({exc}); use head") from None
        wanted = self.config.layers
        if wanted > len(blocks):
            raise StrategyError(
                f"strategy.layers: {wanted} is more than the model's {len(blocks)} blocks; "
                f"use 1 to {len(blocks)} (or strategy.kind = full)"
            )
        last_blocks = [f"{blocks_name}.{index}" for index in range(len(blocks) - wanted, len(blocks))]
        return train_only(model, [*output_module_names(model, self.task), *last_blocks])
