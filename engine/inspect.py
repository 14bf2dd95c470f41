"""A config's freeze map and memory estimate without loading weights (`finetui inspect`, the TUI's freeze map).

The model is built on PyTorch's meta device from its config alone and prepared by the strategy, so a 70B
model is mapped in seconds. QLoRA is mapped on the unquantised model (peft counts a 4-bit base the same
way) with the frozen linear weights costed as 4-bit storage.
"""

from __future__ import annotations

from typing import Any

from engine.config import RunConfig


def planned_device(setting: str) -> str:
    """The device `train.device` will train on: `cuda` when named, even without a GPU here (inspect plans runs for
    other machines); `auto` is a GPU when this machine has one."""
    import torch

    if setting == "cpu":
        return "cpu"
    return "cuda" if setting.startswith("cuda") or torch.cuda.is_available() else "cpu"


def planned_precision(precision: str, device: str) -> str:
    """`train.precision` resolved as a run resolves it; `auto` on a GPU that is not here is assumed to have bf16."""
    import torch

    if precision == "auto" and device == "cuda" and not torch.cuda.is_available():
        return "bf16"
    from engine.trainer import resolve_precision

    return resolve_precision(precision, device)


def inspect_config(config: RunConfig) -> dict[str, Any]:
    """`FreezeMap.to_dict()` of the config's model and strategy, plus `model`, `strategy`, `device` and `precision`.

    The model is built in the dtype the run will load it in on the planned device (`Strategy.load_dtype`): a full
    fine-tune trains fp32 weights whatever the checkpoint's dtype, LoRA keeps a bf16 base only under bf16.
    """
    from engine.distributed import sharding
    from engine.freeze_map import compute_freeze_map
    from engine.frozen_prefix import first_token_top_block
    from engine.models import build_meta_model, resolve_task
    from engine.strategies import get_strategy
    from engine.trainer import quiet_library_output

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
        first_token_top=first_token_top_block(model, config),
    )
    return {
        "model": config.model.id,
        "strategy": config.strategy.kind,
        "device": device,
        "precision": precision,
        **freeze_map.to_dict(),
    }
