"""Hand-picked: train exactly the freeze-map groups listed in `strategy.trainable`, freeze everything else.

The groups are the rows of the freeze map (`bert.embeddings`, `bert.encoder.layer.5`, `classifier`, ...), named
by the same rules (`engine.freeze_map`), so a map toggled row by row in the TUI is trained exactly as shown.
Pick it to try a split that no other strategy gives (say the embeddings and the top block, or every other
block), or to reproduce such a split from a saved preset.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers import PreTrainedModel

from engine.freeze_map import parameter_groups
from engine.strategies.base import Strategy, StrategyError

_LISTED_IN_ERRORS = 8


class CustomStrategy(Strategy):
    kind: ClassVar[str] = "custom"
    caches_frozen_prefix: ClassVar[bool] = True

    def prepare(self, model: PreTrainedModel) -> nn.Module:
        groups = {name: group for name, (group, _kind) in parameter_groups(model).items()}
        wanted = set(self.config.trainable)
        known = list(dict.fromkeys(groups.values()))
        unknown = [name for name in self.config.trainable if name not in known]
        if unknown:
            shown = ", ".join(known[:_LISTED_IN_ERRORS]) + (", ..." if len(known) > _LISTED_IN_ERRORS else "")
            raise StrategyError(
                f"strategy.trainable: {unknown[0]!r} is not a freeze-map group of this model (groups: {shown})"
            )
        model.requires_grad_(False)
        for name, parameter in model.named_parameters():
            if groups[name] in wanted:
                parameter.requires_grad_(True)
        return model
