"""The README.md that travels with a trained model: what it was trained from, how, on what, and how well.

Written into a run's `model/` folder (replacing peft's empty template) and into exported folders, so that a
model found on disk, or on the hub, says where it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from engine.config import RunConfig

STRATEGY_SETTINGS = {
    "lora": ("r", "alpha", "dropout", "target_modules"),
    "dora": ("r", "alpha", "dropout", "target_modules"),
    "qlora": ("r", "alpha", "dropout", "target_modules", "quant_type", "double_quant"),
    "last_layers": ("layers",),
    "feature": ("pooling", "classifier_c"),
    "custom": ("trainable",),
}


def finetui_version() -> str:
    try:
        return metadata.version("finetui")
    except metadata.PackageNotFoundError:
        return "unknown"


def model_card(
    config: RunConfig, summary: dict[str, Any], *, base_model: str, adapter: bool, export: Sequence[str] = ()
) -> str:
    """Markdown with hub metadata up front: base model, strategy and its settings, data, metrics, versions, and
    for an exported folder, how it was exported and checked (`export`: paragraphs)."""
    strategy = config.strategy
    settings = ", ".join(f"{key} = {getattr(strategy, key)!r}" for key in STRATEGY_SETTINGS.get(strategy.kind, ()))
    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    counts = f"{trainable:,} of {total:,}" if isinstance(trainable, int) and isinstance(total, int) else "not recorded"
    lines = [
        "---",
        f"base_model: {base_model}",
        f"library_name: {'peft' if adapter else 'transformers'}",
        "tags: [finetui, " + strategy.kind + "]",
        "---",
        "",
        f"# {config.name}",
        "",
        f"Fine-tuned from `{base_model}` with finetui {finetui_version()} ({config.model.task}).",
        "",
        f"- Strategy: `{strategy.kind}`" + (f" ({settings})" if settings else ""),
        f"- Trainable parameters: {counts}",
        f"- Training: {_training_line(config, summary)}",
        "",
        "## Data",
        "",
        *_data_lines(config, summary),
        "",
        "## Metrics",
        "",
        *_metric_lines(summary),
    ]
    if export:
        lines += ["", "## Export", "", *export]
    return "\n".join(lines) + "\n"


def _training_line(config: RunConfig, summary: dict[str, Any]) -> str:
    train = config.train
    steps = summary.get("steps")
    done = f"{steps} steps" if steps is not None else f"{train.epochs:g} epochs"
    processes = int(summary.get("processes") or 1)
    batch = f"batch {train.batch_size} x {train.grad_accum} accumulation" + (
        f" x {processes} processes" if processes > 1 else ""
    )
    return (
        f"{done}, {batch}, lr {train.lr:g} ({train.scheduler}), max length {config.data.max_length}, "
        f"seed {train.seed}, {summary.get('precision', train.precision)} on {summary.get('device', train.device)}"
    )


def _data_lines(config: RunConfig, summary: dict[str, Any]) -> list[str]:
    counts = {
        "train": summary.get("train_examples"),
        "validation": summary.get("validation_examples"),
        "test": summary.get("test_examples"),
    }
    sources = {"train": config.data.train, "validation": config.data.validation, "test": config.data.test}
    lines = []
    for split, source in sources.items():
        if source or counts[split]:
            where = Path(source).name if source and Path(source).exists() else (source or "carved from train")
            rows = f": {counts[split]:,} examples" if counts[split] else ""
            lines.append(f"- {split}: `{where}`{rows}")
    if summary.get("label_names"):
        lines.append(f"- labels: {', '.join(map(str, summary['label_names']))}")
    return lines


def _metric_lines(summary: dict[str, Any]) -> list[str]:
    lines = ["| split | metric | value |", "|---|---|---|"]
    for split in ("validation", "test"):
        for name, value in (summary.get(split) or {}).items():
            lines.append(f"| {split} | {name} | {value:.4f} |")
    return lines if len(lines) > 2 else ["(no evaluation recorded)"]
