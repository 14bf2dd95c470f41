"""`data.packing`: causal examples packed into one row train exactly as if each were alone (no cross-attention)."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from engine.api import run_training
from engine.config import DataConfig, ModelConfig, StrategyConfig, build_config
from engine.data import DataError, check_packing, prepare_data
from engine.events import Log, Step
from engine.models import load_model, load_tokenizer
from engine.sinks import ListSink
from engine.strategies.lora import LoraStrategy
from engine.training import packed_attention

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


def test_packed_attention_runs_each_example_alone_with_the_same_numbers(
    alpaca: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`use_packed_attention`: sdpa per example instead of the masked row; logits, loss and LoRA gradients agree."""
    model_config = ModelConfig(id="builtin:tiny-llama", task="causal")
    tokenizer = load_tokenizer(model_config)
    packed = prepare_data(
        DataConfig(train=str(alpaca), validation=str(alpaca), packing=True), task="causal", tokenizer=tokenizer, seed=0
    )
    rows = [packed.train[index] for index in range(4)]
    batch = packed.collator(rows)
    assert batch["cu_seq_lens_q"].tolist() == [0, *itertools.accumulate(len(row["input_ids"]) for row in rows)]
    query_lengths: list[int] = []

    def counting_sdpa(module: torch.nn.Module, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        query_lengths.append(query.shape[2])
        return sdpa_attention_forward(module, query, *args, **kwargs)

    monkeypatch.setattr(packed_attention, "sdpa_attention_forward", counting_sdpa)

    def outputs(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return out.logits.detach(), out.loss.detach(), grads

    masked_model = LoraStrategy(StrategyConfig(kind="lora", r=4), "causal").prepare(
        load_model(model_config, num_labels=None)
    )
    masked_model.eval()  # no dropout: both must compute the same function
    torch.manual_seed(0)
    for name, parameter in masked_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)  # B starts at 0: make the adapters count
    packed_model = copy.deepcopy(masked_model)
    packed_attention.use_packed_attention(packed_model)
    assert packed_model.get_base_model().config._attn_implementation == packed_attention.PACKED_SDPA

    masked_logits, masked_loss, masked_grads = outputs(masked_model, batch)
    assert not query_lengths
    packed_logits, packed_loss, packed_grads = outputs(packed_model, batch)
    layers = packed_model.get_base_model().config.num_hidden_layers
    assert query_lengths == [len(row["input_ids"]) for row in rows] * layers  # one sdpa per example and layer
    torch.testing.assert_close(packed_logits, masked_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_loss, masked_loss, rtol=1e-6, atol=1e-6)
    for packed_grad, masked_grad in zip(packed_grads, masked_grads, strict=True):
        torch.testing.assert_close(packed_grad, masked_grad, rtol=1e-4, atol=1e-6)
    start = 0
    with torch.no_grad():
        for row in rows:
            alone = masked_model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(packed_logits[0, start : start + len(alone)], alone, rtol=1e-4, atol=1e-5)
            start += len(alone)
        # A padded batch takes transformers' own sdpa path: bit for bit the same as the unswitched model.
        padded = prepare_data(
            DataConfig(train=str(alpaca), validation=str(alpaca)), task="causal", tokenizer=tokenizer, seed=0
        ).collator(rows)
        assert torch.equal(packed_model(**padded).logits, masked_model(**padded).logits)
