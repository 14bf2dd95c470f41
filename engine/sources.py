"""What a model id or a data source names (a builtin, a local folder, a `.gguf` file, a data file, a hub id),
decided from the string and the file system alone, and how a data file's bytes become text.

It imports no torch, so `finetui run` rejects a mistyped path, a file of unknown format or one in another text
encoding before the heavy libraries load (`engine.preflight`), and `engine.models` and `engine.data` classify
and decode sources by the very same rules when they load them.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from engine.config import ConfigError

BUILTIN_PREFIX = "builtin:"
FORMAT_BY_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
TREC_LINE_PATTERN = r"^(?P<label>[^:]+):\S+ (?P<text>.+)$"
_COARSE_FINE_LINE = re.compile(r"[A-Z]+:\S+ \S")
_PEEK_BYTES = 65536


class ModelError(ConfigError):
    """The model could not be found or loaded; the message is one line meant for people."""


class DataError(ConfigError):
    """Training data that cannot be used as given: the message is one line saying what to fix."""


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
        config: Any = None
        with contextlib.suppress(ValueError):  # transformers reports a config.json it cannot read
            config = json.loads((path / "config.json").read_text())
        if isinstance(config, dict):
            check_not_encoder_decoder(model_id, config)
        return ModelSource("local", str(path))
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model.id: {model_id} is a file; expected a model folder or a .gguf file")
        return ModelSource("gguf", str(path.parent), path.name)
    looks_like_path = model_id.startswith((".", "/", "~")) or model_id.endswith(".gguf")
    if looks_like_path or not HUB_ID.fullmatch(model_id):
        raise ModelError(f"model.id: {model_id} does not exist; give a model folder, a .gguf file or a hub id")
    return ModelSource("hub", model_id)


def check_not_encoder_decoder(model_id: str, config: dict[str, Any]) -> None:
    """Refuse T5-like models: finetui's strategies and templates know encoders and decoders only."""
    if config.get("is_encoder_decoder"):
        raise ModelError(
            f"model.id: {model_id} is an encoder-decoder model ({config.get('model_type')}); finetui fine-tunes "
            "encoders (BERT-like) and decoders (Llama-like): pick one of those"
        )


def looks_like_data_path(source: str) -> bool:
    """Whether a data source is meant as a local path (rather than a hub dataset id or a split name)."""
    return (
        source.startswith(("/", ".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix.lower() in FORMAT_BY_SUFFIX
    )


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


def file_format(path: Path, fmt: str) -> str:
    """The format of a local data file: `fmt`, or with `auto` the one its extension names.

    A file without a data extension (TREC's `.train`, a `.txt`) gets a DataError naming `data.format`; when its
    first line looks like `COARSE:fine text` or holds tabs, the message gives the setting that reads it.
    """
    if fmt != "auto":
        return fmt
    kind = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if kind is not None:
        return kind
    with path.open("rb") as handle:
        head = handle.read(_PEEK_BYTES).decode("utf-8", errors="replace")
    first = next((line for line in head.splitlines() if line.strip()), "")
    if _COARSE_FINE_LINE.match(first):
        advice = (
            'its lines look like `COARSE:fine text`: set data.format = "lines" and '
            f"data.line_pattern = '{TREC_LINE_PATTERN}'"
        )
    elif "\t" in first:
        advice = 'its lines hold tabs: set data.format = "tsv"'
    else:
        advice = (
            'set data.format = "lines" for one example per line (data.line_pattern names the columns; '
            "the default reads `LABEL text`), or csv, tsv, json, jsonl or parquet"
        )
    raise DataError(f"{path}: cannot tell the format from the extension {path.suffix!r}; {advice}")


def decode_text(path: Path, raw: bytes, encoding: str) -> str:
    """A data file's bytes as text in `encoding` (UTF-8 with or without a byte-order mark).

    Bytes that are not valid in it give a DataError naming the encoding they most likely are and
    `data.encoding`, so the file is read as it is.
    """
    utf8 = codecs.lookup(encoding).name == "utf-8"
    try:
        return raw.decode("utf-8-sig" if utf8 else encoding)
    except UnicodeDecodeError as exc:
        likely, shown = likely_encoding(raw), "UTF-8" if utf8 else encoding
        raise DataError(
            f"{path}: not {shown} text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            f'it looks like {likely}: set data.encoding = "{likely}"'
        ) from None


def likely_encoding(raw: bytes) -> str:
    """A best guess at the encoding of text bytes: utf-16 (by its byte-order mark), utf-8, cp1252 or latin-1.

    Windows-1252 and Latin-1 differ only in bytes 0x80-0x9f (printable in cp1252, control codes in Latin-1).
    """
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    try:
        raw.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    if any(0x80 <= byte <= 0x9F for byte in raw):
        try:
            raw.decode("cp1252")
            return "cp1252"
        except UnicodeDecodeError:
            pass
    return "latin-1"
