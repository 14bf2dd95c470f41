"""What a model id or a data source names (a builtin, a local folder, a `.gguf` file, a data file, a hub id),
decided from the string and the file system alone.

It imports no torch, so `finetui run` rejects a mistyped path before the heavy libraries load
(`engine.preflight`), and `engine.models` and `engine.data` classify sources by the very same rules when they
load them.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engine.config import ConfigError

BUILTIN_PREFIX = "builtin:"
FORMAT_BY_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class ModelError(ConfigError):
    """The model could not be found or loaded; the message is one line meant for people."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: `path` is a folder (a hub id for kind "hub", the name for an unbuilt builtin)."""

    kind: Literal["builtin", "local", "gguf", "hub"]
    path: str
    gguf_file: str | None = None


def model_source(model_id: str) -> ModelSource:
    """Classify `model_id`; a ModelError when it names a path that holds no model or is no hub id either."""
    if model_id.startswith(BUILTIN_PREFIX):
        return ModelSource("builtin", model_id.removeprefix(BUILTIN_PREFIX))
    path = Path(model_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.id: {model_id} holds no model (no config.json); point it at a model folder")
        return ModelSource("local", str(path))
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model.id: {model_id} is a file; expected a model folder or a .gguf file")
        return ModelSource("gguf", str(path.parent), path.name)
    looks_like_path = model_id.startswith((".", "/", "~")) or model_id.endswith(".gguf")
    if looks_like_path or not HUB_ID.fullmatch(model_id):
        raise ModelError(f"model.id: {model_id} does not exist; give a model folder, a .gguf file or a hub id")
    return ModelSource("hub", model_id)


def looks_like_data_path(source: str) -> bool:
    """Whether a data source is meant as a local path (rather than a hub dataset id or a split name)."""
    return (
        source.startswith(("/", ".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix.lower() in FORMAT_BY_SUFFIX
    )


def unknown_format_message(suffix: str) -> str:
    return f"cannot tell the format from the extension {suffix!r}; set data.format to csv, tsv, json, jsonl or parquet"


def is_hub_dataset(source: str) -> bool:
    """Whether `source` names a hub dataset (no such local path, and shaped like `name` or `owner/name`)."""
    return (
        not Path(source).expanduser().exists() and not looks_like_data_path(source) and bool(HUB_ID.fullmatch(source))
    )


HUB_PROBE_TIMEOUT_S = 3.0


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers (never when HF_HUB_OFFLINE is set). Asked once per process, so that an
    offline machine fails at once instead of retrying every request with back-off for half a minute."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # no network, no DNS, a proxy refusing: all mean the same here
        return False
    return True


def offline_hub_message(model_id: str) -> str:
    return (
        f"model.id: {model_id}: the Hugging Face hub is not reachable (offline?) and this model is not in the local "
        "cache; give --model a local model folder (for inspect, a folder holding its config.json is enough)"
    )


def check_hub_model(model_id: str, revision: str | None = None) -> None:
    """A hub model must be reachable or already in the local cache (a ModelError otherwise, found in seconds)."""
    from huggingface_hub import try_to_load_from_cache

    if hub_reachable():
        return
    if not isinstance(try_to_load_from_cache(model_id, "config.json", revision=revision), str):
        raise ModelError(offline_hub_message(model_id))
