"""`BitDropout`: nn.Dropout's distribution and gradient from cheaper masks, swapped into every LoRA layer."""

from __future__ import annotations

import torch
from torch import nn

from engine.config import ModelConfig, StrategyConfig
from engine.models import load_model
from engine.strategies.lora import LoraStrategy
from engine.training.cpu_dropout import BitDropout, use_bit_dropout


def test_bit_dropout_keeps_one_minus_p_scaled_and_passes_the_same_mask_back() -> None:
    dropout = BitDropout(0.1)
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002  # 1e6 draws: the standard error is 0.0003
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    torch.manual_seed(0)
    assert torch.equal(dropout(x), y)  # the torch generator decides, so a seed (or a resumed RNG state) repeats it
    assert not torch.equal(dropout(x), y)
    dropout.eval()
    assert dropout(x) is x


def test_every_lora_dropout_becomes_a_bit_dropout_and_the_adapters_still_train() -> None:
    model_config = ModelConfig(id="builtin:tiny-llama", task="causal")
    model = LoraStrategy(StrategyConfig(kind="lora", r=4, dropout=0.2), "causal").prepare(
        load_model(model_config, num_labels=None)
    )
    lora_layers = [
        module for module in model.modules() if isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict)
    ]
    assert use_bit_dropout(model) == len(lora_layers) > 0
    assert all(type(layer.lora_dropout["default"]) is BitDropout for layer in lora_layers)
    assert all(layer.lora_dropout["default"].p == 0.2 for layer in lora_layers)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_A" in name]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
