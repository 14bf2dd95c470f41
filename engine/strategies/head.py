"""Finetuning I (Raschka): train only the output layers on top of a frozen pretrained model.

The backbone stays exactly as pretrained; only the classification head (DistilBERT `pre_classifier` +
`classifier`, BERT pooler + `classifier`, Llama `score`) or, for causal LMs, the `lm_head` learns. Cheap and
quick, a little better than feature extraction because the head trains end to end with the loss; pick it for
a fast baseline or when memory allows only a forward pass through the backbone.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers import PreTrainedModel

from engine.architecture import output_module_names
from engine.strategies.base import Strategy, train_only


class HeadStrategy(Strategy):
    kind: ClassVar[str] = "head"
    caches_frozen_prefix: ClassVar[bool] = True

    def prepare(self, model: PreTrainedModel) -> nn.Module:
        return train_only(model, output_module_names(model, self.task))
