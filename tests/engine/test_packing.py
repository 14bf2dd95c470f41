"""`data.packing`: causal examples packed into one row train exactly as if each were alone (no cross-attention)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.api import run_training
from engine.config import DataConfig, ModelConfig, build_config
from engine.data import DataError, check_packing, prepare_data
from engine.events import Log, Step
from engine.models import load_model, load_tokenizer
from engine.sinks import ListSink

ROWS = [
    '{"instruction": "Say hi", "output": "hi there"}',
    '{"instruction": "Count to three", "input": "slowly", "output": "one, two, three"}',
    '{"instruction": "Name a colour", "output": "blue"}',
    '{"instruction": "Spell cat", "output": "c a t"}',
]


@pytest.fixture
def alpaca(tmp_path: Path) -> Path:
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(ROWS * 4) + "\n", encoding="utf-8")
    return path


def test_packed_batch_has_the_loss_and_logits_of_separate_examples(alpaca: Path) -> None:
    model_config = ModelConfig(id="builtin:tiny-llama", task="causal")
    tokenizer = load_tokenizer(model_config)
    padded = prepare_data(
        DataConfig(train=str(alpaca), validation=str(alpaca)), task="causal", tokenizer=tokenizer, seed=0
    )
    packed = prepare_data(
        DataConfig(train=str(alpaca), validation=str(alpaca), packing=True), task="causal", tokenizer=tokenizer, seed=0
    )
    rows = [padded.train[index] for index in range(4)]
    packed_batch = packed.collator(rows)
    assert packed_batch["input_ids"].shape == (1, sum(len(row["input_ids"]) for row in rows))
    assert "attention_mask" not in packed_batch
    model = load_model(model_config, num_labels=None).eval()
    with torch.no_grad():
        packed_out = model(**packed_batch)
        padded_out = model(**padded.collator(rows))
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(packed_out.logits[0, start : start + len(alone)], alone, rtol=1e-4, atol=1e-5)
            start += len(alone)
        # What `use_cache=False` in the batch prevents: with a KV cache the mask ignores the restarting positions.
        with_cache = model(**{key: value for key, value in packed_batch.items() if key != "use_cache"}).logits
    first = len(rows[0]["input_ids"])
    assert not torch.allclose(with_cache[0, first:], packed_out.logits[0, first:], atol=1e-3)
    assert float(packed_out.loss) == pytest.approx(float(padded_out.loss), rel=1e-5)


def test_packing_trains_and_is_refused_where_it_cannot_work(tmp_path: Path, alpaca: Path) -> None:
    config = build_config(
        {
            "model": {"id": "builtin:tiny-llama"},
            # validated on its own training rows on purpose: the data gate is told to allow it
            "data": {"train": str(alpaca), "validation": str(alpaca), "packing": True, "max_leak": 1.0},
            "strategy": {"kind": "full"},
            "train": {"epochs": 2, "batch_size": 4, "lr": 3e-3, "logging_steps": 1, "output_dir": str(tmp_path)},
        }
    )
    sink = ListSink()
    result = run_training(config, sink)
    assert result.status == "finished", result.summary.get("error")
    steps = sink.of_type(Step)
    assert len(steps) == 8 and all(step.tokens_per_second > 0 for step in steps)
    assert steps[-1].loss < steps[0].loss
    assert not [event for event in sink.of_type(Log) if event.level == "warning" and "token" in event.message]

    with pytest.raises(DataError, match=r"data\.packing: not supported for .bert. models"):
        check_packing("bert")
    tokenizer = load_tokenizer(ModelConfig(id="builtin:tiny-bert"))
    quickstart = Path(__file__).resolve().parents[2] / "presets" / "data" / "quickstart" / "train.jsonl"
    with pytest.raises(DataError, match=r"data\.packing: packs causal LM examples"):
        prepare_data(
            DataConfig(train=str(quickstart), packing=True), task="classification", tokenizer=tokenizer, seed=0
        )
