"""Attention for packed causal batches on CPUs: each example attends to itself alone, at its own cost.

`data.packing` turns a batch into one row. transformers keeps the examples apart with a block-diagonal mask built
from the restarting position ids, and sdpa then computes attention over the whole row (T^2 for a row of T tokens;
with 4 examples of 112 tokens that is 4x the work of the examples alone) and cannot use its causal kernel, which
skips the upper triangle, or share the key/value heads of grouped-query attention without copying them.

`PackingCollator` also hands the model the examples' boundaries (`cu_seq_lens_q`, the FlashAttention keyword
transformers passes down to every attention layer). The attention registered here runs sdpa with `is_causal` on
each example's slice of the row and concatenates the results: the same numbers as the masked row, without the
work between examples. Any other batch (padded, no boundaries, a KV cache, a GPU tensor, where FlashAttention's
varlen kernels are the better tool) goes to transformers' own sdpa unchanged, so switching a model to this
implementation never changes what it computes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "finetui_packed_sdpa"


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa per packed example when the batch carries example boundaries, transformers' sdpa otherwise."""
    bounds = kwargs.pop("cu_seq_lens_q", None)
    packed = (
        bounds is not None
        and bounds.device.type == "cpu"
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == int(bounds[-1])
        and getattr(module, "is_causal", True)
    )
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # `split` rather than slicing: its backward is one concatenation, not a zero-filled row per example.
    lengths = torch.diff(bounds).tolist()
    parts = [
        sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)
        if q.shape[2]
    ]
    return torch.cat(parts, dim=1), None


def use_packed_attention(model: nn.Module) -> None:
    """Switch a transformers model (or a peft model around one) whose attention is sdpa to `packed_sdpa_attention`."""
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # other batches still get sdpa's mask
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation == "sdpa":
        base.set_attn_implementation(PACKED_SDPA)
