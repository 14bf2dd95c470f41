"""Checks a run config can pass before anything heavy is imported or any run directory is created.

`finetui run` calls these before loading torch, so a typo in a path or an unwritable output directory costs
a fraction of a second and leaves nothing behind. Everything checked here is checked again, in more depth,
where the data or model is actually read; this module only catches what needs no library to see.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from engine.config import ConfigError, DataConfig, ModelConfig, RunConfig
from engine.parallel import check_parallel_config
from engine.runs import CONFIG_FILE
from engine.sources import check_hub_model, decode_text, file_format, looks_like_data_path, model_source


def check_data_file(role: str, source: str, data: DataConfig) -> None:
    """A local data file must exist, be a file, hold something, have a known format and decode in
    `data.encoding`; hub ids are left to the loader."""
    path = Path(source).expanduser()
    if not path.exists():
        if looks_like_data_path(source):
            raise ConfigError(f"data.{role}: {source}: no such file; check the path (relative to the working dir)")
        return
    if path.is_dir():
        raise ConfigError(f"data.{role}: {source}: is a directory; give a data file (csv, tsv, json, jsonl, parquet)")
    if path.stat().st_size == 0:
        raise ConfigError(f"data.{role}: {source}: the file is empty; give a file with rows")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"data.{role}: {source}: not readable (permissions)")
    try:
        if file_format(path, data.format) != "parquet":
            decode_text(path, path.read_bytes(), data.encoding)
    except ConfigError as exc:
        raise ConfigError(f"data.{role}: {exc}") from None


def check_output_dir(output_dir: Path) -> None:
    """The parent of new run directories: a writable directory (or creatable), and not itself a run."""
    path = output_dir.expanduser()
    if (path / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{path} is a run directory, and runs are never written into each other; "
            f"continue it with finetui run --resume {path}, or pick another --output-dir"
        )
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"train.output_dir: {probe} is a file, not a directory; choose another --output-dir")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir: {probe} is not writable; choose another --output-dir")


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def check_trackers(report_to: list[str]) -> None:
    """Every tracker in `train.report_to` has its package installed (the Trainer would fail only once it starts)."""
    for tracker in report_to:
        if not any(importlib.util.find_spec(package) for package in TRACKER_PACKAGES[tracker]):
            raise ConfigError(
                f"train.report_to: {tracker} is not installed; pip install 'finetui[{tracker}]' (or drop it)"
            )


def check_data_config(config: RunConfig) -> None:
    """Raise a one-line ConfigError for the data and model mistakes visible without loading anything."""
    data = config.data
    if not data.train:
        raise ConfigError("data.train: no training data; set it in the preset or with --set data.train=FILE")
    check_data_file("train", data.train, data)
    train_is_file = Path(data.train).expanduser().is_file()
    for role, source in (("validation", data.validation), ("test", data.test)):
        # With a hub dataset for train, validation/test may name its splits ("test").
        if source and (train_is_file or looks_like_data_path(source) or Path(source).expanduser().exists()):
            if not Path(source).expanduser().exists():
                raise ConfigError(f"data.{role}: {source}: no such file; check the path")
            check_data_file(role, source, data)
    check_model(config.model)


def check_model(model: ModelConfig) -> None:
    """The model id names something loadable: a builtin, a model folder or .gguf file, or a hub id that is
    reachable or cached."""
    if model_source(model.id).kind == "hub":
        check_hub_model(model.id, model.revision)


def check_run_config(config: RunConfig, output_dir: Path | None = None) -> None:
    """Raise a one-line ConfigError for the mistakes visible without loading anything."""
    check_data_config(config)
    check_parallel_config(config)
    check_trackers(config.train.report_to)
    check_output_dir(Path(output_dir or config.train.output_dir))
