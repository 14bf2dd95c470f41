"""Fine-tuning strategies by `strategy.kind`: which parameters learn, and how the model is loaded for it.

feature (frozen embeddings + logistic regression), head (Finetuning I: output layers), last_layers (output
layers + the top blocks), full (Finetuning II: everything), lora, dora and qlora (peft adapters), and custom
(exactly the freeze-map groups listed in `strategy.trainable`).
"""

from __future__ import annotations

from engine.config import StrategyConfig
from engine.strategies.base import Strategy, StrategyError
from engine.strategies.custom import CustomStrategy
from engine.strategies.feature import FeatureStrategy
from engine.strategies.full import FullStrategy
from engine.strategies.head import HeadStrategy
from engine.strategies.last_layers import LastLayersStrategy
from engine.strategies.lora import DoraStrategy, LoraStrategy
from engine.strategies.qlora import QloraStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    strategy.kind: strategy
    for strategy in (
        FeatureStrategy,
        HeadStrategy,
        LastLayersStrategy,
        FullStrategy,
        LoraStrategy,
        DoraStrategy,
        QloraStrategy,
        CustomStrategy,
    )
}


def get_strategy(config: StrategyConfig, task: str) -> Strategy:
    """The strategy object for `config.kind`, set up for `task` (classification or causal)."""
    return STRATEGIES[config.kind](config, task)


__all__ = ["STRATEGIES", "Strategy", "StrategyError", "get_strategy"]
