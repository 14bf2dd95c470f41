"""The on-disk caches: tokenised data and feature embeddings are reused for the same inputs and only for them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import cache as cache_lib
from engine.api import run_training
from engine.config import DataConfig, ModelConfig, build_config
from engine.data import prepare_data
from engine.data_report import check_data
from engine.events import Log
from engine.models import load_tokenizer, resolve_model
from engine.sinks import ListSink
from tests.conftest import QUICKSTART_DATA, quickstart_data


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, finetui_cache: Path) -> Path:
    """A cache of this test's own, with the session's built models linked in (so they are not rebuilt)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (finetui_cache / "models").mkdir(exist_ok=True)
    (cache / "models").symlink_to(finetui_cache / "models")
    monkeypatch.setenv("FINETUI_CACHE", str(cache))
    return cache


def data_config(train: Path, **extra: Any) -> DataConfig:
    return DataConfig(
        train=str(train), validation=str(QUICKSTART_DATA / "validation.jsonl"), **({"max_length": 32} | extra)
    )


def test_tokenised_data_is_reused_for_the_same_inputs_only(tmp_path: Path, private_cache: Path) -> None:
    tokenizer = load_tokenizer(ModelConfig(id="builtin:tiny-bert"))
    train = tmp_path / "train.jsonl"
    shutil.copy(QUICKSTART_DATA / "train.jsonl", train)

    first = prepare_data(data_config(train), task="classification", tokenizer=tokenizer, seed=1, cache=True)
    again = prepare_data(data_config(train), task="classification", tokenizer=tokenizer, seed=1, cache=True)
    assert not first.from_cache and again.from_cache
    assert len(list((private_cache / cache_lib.TOKENISED).iterdir())) == 1
    for role in ("train", "validation"):
        assert getattr(again, role).to_dict() == getattr(first, role).to_dict()
    assert (again.label_names, again.num_labels) == (first.label_names, first.num_labels)
    batch = again.collator([again.train[index] for index in range(4)])
    assert batch["input_ids"].shape[1] == max(len(again.train[index]["input_ids"]) for index in range(4))

    uncached = prepare_data(data_config(train), task="classification", tokenizer=tokenizer, seed=1)
    assert not uncached.from_cache
    misses = [
        prepare_data(data_config(train), task="classification", tokenizer=tokenizer, seed=2, cache=True),
        prepare_data(data_config(train, max_length=16), task="classification", tokenizer=tokenizer, seed=1, cache=True),
    ]
    assert not any(prepared.from_cache for prepared in misses)
    train.write_text(train.read_text(encoding="utf-8").replace("a", "b", 1), encoding="utf-8")
    edited = prepare_data(data_config(train), task="classification", tokenizer=tokenizer, seed=1, cache=True)
    assert not edited.from_cache
    assert edited.train.to_dict() != first.train.to_dict() or edited.validation.to_dict() != first.validation.to_dict()
    assert len(list((private_cache / cache_lib.TOKENISED).iterdir())) == 4


def test_cached_causal_data_keeps_its_findings(tmp_path: Path, private_cache: Path) -> None:
    tokenizer = load_tokenizer(ModelConfig(id="builtin:tiny-llama"))
    rows = ['{"prompt": "%s", "response": "ok"}' % ("x" * length) for length in (3, 5, 40, 50)]
    train = tmp_path / "causal.jsonl"
    train.write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = DataConfig(train=str(train), validation=str(train), max_length=20, template="none", max_leak=1.0)
    first = prepare_data(config, task="causal", tokenizer=tokenizer, seed=0, cache=True)
    again = prepare_data(config, task="causal", tokenizer=tokenizer, seed=0, cache=True)
    assert again.from_cache and len(again.train) == len(first.train) == 2
    warnings = check_data(config, first.encoded)
    assert check_data(config, again.encoded) == warnings
    assert warnings[:2] == [
        "data.train: 2 of 4 rows left out: 2 response truncated away (rows 3, 4)",
        "data.validation: 2 of 4 rows left out: 2 response truncated away (rows 3, 4)",
    ]
    assert again.train["labels"] == first.train["labels"]


def test_fingerprints_follow_their_inputs(tmp_path: Path, private_cache: Path) -> None:
    bert, llama = (load_tokenizer(ModelConfig(id=f"builtin:{name}")) for name in ("tiny-bert", "tiny-llama"))
    assert cache_lib.tokenizer_fingerprint(bert) == cache_lib.tokenizer_fingerprint(bert)
    assert cache_lib.tokenizer_fingerprint(bert) != cache_lib.tokenizer_fingerprint(llama)
    folder = tmp_path / "model"
    shutil.copytree(resolve_model("builtin:tiny-bert").path, folder)
    before = cache_lib.model_fingerprint(ModelConfig(id=str(folder)))
    assert cache_lib.model_fingerprint(ModelConfig(id=str(folder))) == before
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes() + b"\0")
    assert cache_lib.model_fingerprint(ModelConfig(id=str(folder))) != before
    assert cache_lib.token_ids_digest([[1, 2], [3]]) != cache_lib.token_ids_digest([[1], [2, 3]])


def feature_config(tmp_path: Path, **strategy: Any) -> Any:
    return build_config(
        {
            "name": "feature",
            "model": {"id": "builtin:tiny-bert", "task": "classification"},
            "data": quickstart_data(("train", "validation")),
            "strategy": {"kind": "feature"} | strategy,
            "train": {"output_dir": str(tmp_path)},
        }
    )


def test_feature_rerun_skips_the_backbone(tmp_path: Path, private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first_sink = ListSink()
    first = run_training(feature_config(tmp_path), first_sink)
    assert first.status == "finished", first.summary.get("error")
    cached = sorted((private_cache / cache_lib.FEATURES).glob("*.npy"))
    assert len(cached) == 2  # train and validation

    def no_backbone(*args: Any, **kwargs: Any) -> np.ndarray:
        raise AssertionError("the backbone ran although the embeddings are cached")

    from engine.strategies.feature import FeatureStrategy

    monkeypatch.setattr(FeatureStrategy, "embed", staticmethod(no_backbone))
    sink = ListSink()
    again = run_training(feature_config(tmp_path, classifier_c=0.5), sink)
    assert again.status == "finished", again.summary.get("error")
    messages = [event.message for event in sink.of_type(Log)]
    assert "tokenised data from the cache (tokenised/)" in messages
    assert "train embeddings from the cache (features/)" in messages
    assert "validation embeddings from the cache (features/)" in messages
    assert not any("from the cache" in event.message for event in first_sink.of_type(Log))
    assert again.summary["validation"]["accuracy"] == pytest.approx(first.summary["validation"]["accuracy"], abs=0.1)

    other_pooling = run_training(feature_config(tmp_path, pooling="cls"), ListSink())
    assert other_pooling.status == "failed"  # embed is patched out: a new pooling is a cache miss
    assert "the backbone ran" in other_pooling.summary["error"]
