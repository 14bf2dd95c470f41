"""A config's freeze map and memory estimate without loading weights (`finetui inspect`, the TUI's freeze map).

The model is built on PyTorch's meta device from its config alone and prepared by the strategy, so a 70B
model is mapped in seconds. QLoRA is mapped on the unquantised model (peft counts a 4-bit base the same
way) with the frozen linear weights costed as 4-bit storage.
"""

from __future__ import annotations

from typing import Any

from engine.config import RunConfig
from engine.devices import planned_device, planned_precision
from engine.freeze_map import compute_freeze_map
from engine.library_logs import quiet_library_output
from engine.models import build_meta_model, resolve_task
from engine.parallel import sharding
from engine.strategies import get_strategy
from engine.training.frozen_prefix import first_token_top_block


def inspect_config(config: RunConfig) -> dict[str, Any]:
    """`FreezeMap.to_dict()` of the config's model and strategy, plus `model`, `strategy`, `device` and `precision`.

    The model is built in the dtype the run will load it in on the planned device (`Strategy.load_dtype`): a full
    fine-tune trains fp32 weights whatever the checkpoint's dtype, LoRA keeps a bf16 base only under bf16.
    """
    quiet_library_output()
    config = config.with_task(resolve_task(config.model))
    strategy = get_strategy(config.strategy, config.model.task)
    device = planned_device(config.train.device)
    precision = planned_precision(config.train.precision, device)
    num_labels = (config.model.num_labels or 2) if config.model.task == "classification" else None
    meta = build_meta_model(config.model, num_labels=num_labels, dtype=strategy.load_dtype(precision))
    model = strategy.prepare_meta(meta)
    freeze_map = compute_freeze_map(
        model,
        batch_size=config.train.batch_size,
        seq_len=config.data.max_length,
        gradient_checkpointing=config.train.gradient_checkpointing,
        frozen_linear_4bit=config.strategy.quant_type if config.strategy.kind == "qlora" else None,
        processes=config.train.nproc,
        sharding=sharding(config),
        precision=precision,
        device=device,
        eval_batch_size=config.train.eval_batch_size,
        first_token_top=first_token_top_block(model, config, strategy),
    )
    return {
        "model": config.model.id,
        "strategy": config.strategy.kind,
        "device": device,
        "precision": precision,
        **freeze_map.to_dict(),
    }
