"""What finetui computes once and keeps on disk: cache keys and the cache's layout, in one place.

Two kinds of work repeat from run to run with the same inputs: tokenising a data file, and embedding it with a
frozen model for the `feature` strategy. Both are kept under `engine.models.cache_dir()`:

    tokenised/<key>/{train,validation,test}/ + meta.json   encoded splits: every row, and why some are left out
    features/<key>.npy                                      pooled embeddings of one tokenised split

A key is a digest of everything the result depends on (file contents, tokenizer, settings, the cache format
version), so a changed input never hits a stale entry; entries are written to a temporary name and renamed
into place, so a reader sees a complete entry or none. Deleting the folders is always safe.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import ModelConfig
from engine.fsio import write_atomic
from engine.models import cache_dir, resolve_model

CACHE_FORMAT = 1
TOKENISED = "tokenised"
FEATURES = "features"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def digest(*parts: Any) -> str:
    """A short stable hex digest of JSON-serialisable parts (plus the cache format version)."""
    text = json.dumps([CACHE_FORMAT, *parts], sort_keys=True, default=str, ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def file_digest(path: str | Path) -> str:
    """Digest of a file's bytes (a renamed or touched file with the same content keeps its key)."""
    return file_sha256(path)[:32]


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks; computed once per process while the file's size and mtime stay
    (the tokenised-data key and the run's environment.json share it)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _sha256(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def model_fingerprint(cfg: ModelConfig) -> str:
    """Identity of a model's weights: config and weight files (size, mtime) of a local folder, or hub id + revision.

    A hub model is keyed by id and revision only: pin `model.revision` to a commit when the hub copy may change.
    """
    source = resolve_model(cfg.id)
    if source.kind == "hub":
        return digest("hub", source.path, cfg.revision)
    folder = Path(source.path)
    config = folder / "config.json"
    weights = sorted(
        (entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
        for entry in folder.iterdir()
        if entry.suffix in _WEIGHT_SUFFIXES and (source.gguf_file is None or entry.name == source.gguf_file)
    )
    return digest(source.kind, str(folder.resolve()), file_digest(config) if config.is_file() else None, weights)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identity of a tokenizer: its full serialised form (fast tokenizers), special tokens, template and limit.

    The truncation and padding state of a fast tokenizer changes with each call, so it is left out.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = {
            key: value for key, value in json.loads(backend.to_str()).items() if key not in ("truncation", "padding")
        }
        body = json.dumps(state, sort_keys=True)
    else:
        body = str(sorted(tokenizer.get_vocab().items()))
    return digest(
        type(tokenizer).__name__,
        hashlib.sha256(body.encode("utf-8")).hexdigest(),
        getattr(tokenizer, "chat_template", None),
        tokenizer.special_tokens_map,
        tokenizer.model_max_length,
        tokenizer.padding_side,
    )


def token_ids_digest(rows: Iterable[list[int]]) -> str:
    """Digest of a tokenised split's `input_ids` (order and boundaries included)."""
    hasher = hashlib.blake2b()
    for ids in rows:
        array = np.asarray(ids, dtype=np.int64)
        hasher.update(np.int64(len(array)).tobytes())
        hasher.update(array.tobytes())
    return hasher.hexdigest()[:32]


def tokenised_dir(key: str) -> Path:
    return cache_dir() / TOKENISED / key


def features_path(key: str) -> Path:
    return cache_dir() / FEATURES / f"{key}.npy"


def save_array(path: Path, array: np.ndarray) -> None:
    """Write one `.npy` cache entry atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_atomic(path, buffer.getvalue())


def load_array(path: Path) -> np.ndarray | None:
    """A `.npy` cache entry, or None when it is missing or unreadable (then it is simply recomputed)."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
