"""A config's freeze map and memory estimate without loading weights (`finetui inspect`, the TUI's freeze map).

The model is built on PyTorch's meta device from its config alone and prepared by the strategy, so a 70B
model is mapped in seconds. QLoRA is mapped on the unquantised model (peft counts a 4-bit base the same
way) with the frozen linear weights costed as 4-bit storage.
"""

from __future__ import annotations

from typing import Any

from engine.config import RunConfig
from engine.freeze_map import compute_freeze_map
from engine.library_logs import quiet_library_output
from engine.models import build_meta_model, resolve_task
from engine.parallel import sharding
from engine.strategies import get_strategy


def inspect_config(config: RunConfig) -> dict[str, Any]:
    """`FreezeMap.to_dict()` of the config's model and strategy, plus `model` and `strategy` keys."""
    quiet_library_output()
    config = config.with_task(resolve_task(config.model))
    strategy = get_strategy(config.strategy, config.model.task)
    num_labels = (config.model.num_labels or 2) if config.model.task == "classification" else None
    model = strategy.prepare_meta(build_meta_model(config.model, num_labels=num_labels))
    freeze_map = compute_freeze_map(
        model,
        batch_size=config.train.batch_size,
        seq_len=config.data.max_length,
        gradient_checkpointing=config.train.gradient_checkpointing,
        frozen_linear_4bit=config.strategy.quant_type if config.strategy.kind == "qlora" else None,
        processes=config.train.nproc,
        sharding=sharding(config),
    )
    return {"model": config.model.id, "strategy": config.strategy.kind, **freeze_map.to_dict()}
