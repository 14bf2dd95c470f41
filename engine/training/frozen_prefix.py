"""Frozen work done once: for `head` and `last_layers` on encoder classifiers, run the frozen layers one time.

When the embeddings and the lower blocks are frozen, their output for an example never changes during
training (in eval mode, without dropout, they are a fixed function of the tokens). So instead of recomputing
them at every step of every epoch, their output at the frozen/trainable boundary is computed once per example
(under `torch.inference_mode`, batched by length) and kept in RAM; the Trainer then runs only the top part.

How the top part runs: the model's own `forward` is called with the embeddings replaced by a pass-through that
returns the cached states and the block list cut to the trainable blocks. Everything above the boundary (the
attention mask, the top blocks, pooler, dropout, classifier, loss) is the model's own code on the model's own
modules, so the result equals training the whole model with the frozen part in eval mode (a test checks the
losses), dropout in the top part works as usual, and checkpoints and the final `model/` are the full model.
BERT and DistilBERT classify from the first token only: for `head` only that token's state is kept, and for
`last_layers` the last block computes keys and values for every token but queries, attention output and
feed-forward for the first token only (the rows nobody reads are never computed; `FirstTokenBlock`).

Supported: BERT-style and DistilBERT sequence classifiers (`SUPPORTED_MODEL_TYPES`). Causal LMs (rotary
position embeddings, per-token heads) and adapters fall back to the normal path, with a log line saying why;
so does a cache that would not fit in `RAM_SHARE` of the available memory.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import psutil
import torch
from datasets import Dataset
from peft import PeftModel
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from engine.architecture import find_blocks
from engine.config import RunConfig
from engine.data import PreparedData
from engine.events import Log
from engine.sinks import EventSink
from engine.strategies import Strategy

SUPPORTED_MODEL_TYPES = ("bert", "distilbert")
RAM_SHARE = 0.5
ROW_COLUMN = "frozen_row"
STATES_KEY = "frozen_states"
_MODEL_INPUTS = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class PrefixPlan:
    """Where the boundary is: the first block that trains (`boundary`) of `blocks_path`, below the embeddings."""

    embeddings_path: str
    blocks_path: str
    boundary: int
    num_blocks: int
    hidden_size: int
    first_token_only: bool


def plan_prefix(model: nn.Module, task: str) -> tuple[PrefixPlan | None, str]:
    """The frozen prefix of a prepared model, or None and the reason it cannot be cached."""
    if task != "classification":
        return None, "the frozen-layer cache supports classification encoders only; causal LMs recompute"
    if isinstance(model, PeftModel):
        return None, "adapters sit inside the frozen layers; nothing to cache"
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return None, f"the frozen-layer cache supports {', '.join(SUPPORTED_MODEL_TYPES)} models, not {model_type!r}"
    prefix = model.base_model_prefix
    blocks_path, blocks = find_blocks(model)
    embeddings = getattr(getattr(model, prefix), "embeddings", None)
    if not isinstance(embeddings, nn.Module) or _trains(embeddings):
        return None, "the embeddings train; nothing below them to cache"
    boundary = next((index for index, block in enumerate(blocks) if _trains(block)), len(blocks))
    config = model.config
    plan = PrefixPlan(
        embeddings_path=f"{prefix}.embeddings",
        blocks_path=blocks_path,
        boundary=boundary,
        num_blocks=len(blocks),
        hidden_size=int(config.hidden_size),
        first_token_only=boundary == len(blocks),
    )
    return plan, ""


def first_token_top_block(model: nn.Module, config: RunConfig, strategy: Strategy) -> bool:
    """Whether the run will train its top block on the first token only (`last_layers` above a cached prefix)."""
    if not config.train.cache_frozen or not strategy.caches_frozen_prefix:
        return False
    plan, _ = plan_prefix(model, config.model.task)
    return plan is not None and plan.boundary < plan.num_blocks


def _trains(module: nn.Module) -> bool:
    return any(parameter.requires_grad for parameter in module.parameters())


def estimated_bytes(plan: PrefixPlan, splits: list[Dataset], dtype: torch.dtype) -> int:
    """RAM the cached states take: one vector per token (per example with `first_token_only`)."""
    vectors = sum(
        len(split) if plan.first_token_only else sum(len(ids) for ids in split["input_ids"]) for split in splits
    )
    return vectors * plan.hidden_size * torch.finfo(dtype).bits // 8


def ram_budget() -> int:
    return int(RAM_SHARE * psutil.virtual_memory().available)


class _PassThrough(nn.Module):
    """Stands in for the embeddings: returns the cached boundary states it was handed."""

    def __init__(self) -> None:
        super().__init__()
        self.states: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        assert self.states is not None
        return self.states


@contextmanager
def _swapped(model: nn.Module, plan: PrefixPlan, blocks: nn.ModuleList, embeddings: nn.Module | None) -> Iterator[None]:
    """Temporarily replace the block list (and the embeddings) of `model`."""
    blocks_parent, blocks_name = _parent(model, plan.blocks_path)
    embeddings_parent, embeddings_name = _parent(model, plan.embeddings_path)
    original_blocks = getattr(blocks_parent, blocks_name)
    original_embeddings = getattr(embeddings_parent, embeddings_name)
    setattr(blocks_parent, blocks_name, blocks)
    if embeddings is not None:
        setattr(embeddings_parent, embeddings_name, embeddings)
    try:
        yield
    finally:
        setattr(blocks_parent, blocks_name, original_blocks)
        setattr(embeddings_parent, embeddings_name, original_embeddings)


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return model.get_submodule(parent), name


class BoundaryStates:
    """The boundary states of every example of every split, in one flat tensor with row offsets.

    The tensor is allocated whole before the states are computed and filled in place: a small copy per example,
    allocated between the large short-lived tensors of each forward, would pin the allocator's freed memory
    (150 MB more resident memory for MiniLM's first tokens of 416 examples at batch 32 x 64).
    """

    def __init__(self, lengths: list[int], hidden_size: int, dtype: torch.dtype) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(np.array(lengths, dtype=np.int64))])
        self.flat = torch.empty((int(self.offsets[-1]), hidden_size), dtype=dtype)

    def put(self, row: int, states: torch.Tensor) -> None:
        start = int(self.offsets[row])
        self.flat[start : start + len(states)] = states

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def batch(self, rows: list[int], width: int) -> torch.Tensor:
        """(len(rows), width, hidden) with each row's states first and zeros after (padding)."""
        out = self.flat.new_zeros((len(rows), width, self.flat.shape[-1]))
        for index, row in enumerate(rows):
            start, end = int(self.offsets[row]), int(self.offsets[row + 1])
            count = min(end - start, width)
            out[index, :count] = self.flat[start : start + count]
        return out


@torch.inference_mode()
def compute_states(
    model: nn.Module,
    plan: PrefixPlan,
    splits: list[Dataset],
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    *,
    batch_size: int,
    autocast_dtype: torch.dtype | None,
    check_stop: Callable[[], None],
) -> BoundaryStates:
    """Run the embeddings and the frozen blocks once over `splits` (in eval mode, longest examples first)."""
    base = getattr(model, model.base_model_prefix)
    device = next(model.parameters()).device
    blocks = model.get_submodule(plan.blocks_path)
    prefix_blocks = nn.ModuleList(list(blocks)[: plan.boundary])
    was_training = model.training
    model.eval()
    lengths = [len(ids) for split in splits for ids in split["input_ids"]]
    kept = [1 if plan.first_token_only else length for length in lengths]
    states = BoundaryStates(kept, plan.hidden_size, next(model.parameters()).dtype)
    first_row = 0
    try:
        with _swapped(model, plan, prefix_blocks, None):
            for split in splits:
                order = np.argsort([-length for length in lengths[first_row : first_row + len(split)]], kind="stable")
                for start in range(0, len(order), batch_size):
                    check_stop()
                    rows = [int(index) for index in order[start : start + batch_size]]
                    features = collator([{key: split[row][key] for key in _MODEL_INPUTS} for row in rows])
                    inputs = {key: value.to(device) for key, value in features.items()}
                    with torch.autocast(
                        device.type, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)
                    ):
                        hidden = base(**inputs).last_hidden_state
                    hidden = hidden.to(next(model.parameters()).dtype).cpu()
                    for position, row in enumerate(rows):
                        states.put(first_row + row, hidden[position, : kept[first_row + row]])
                first_row += len(split)
    finally:
        model.train(was_training)
    return states


def with_rows(splits: list[Dataset]) -> list[Dataset]:
    """Each split with a `frozen_row` column: the global index of its examples in the BoundaryStates."""
    out, start = [], 0
    for split in splits:
        out.append(split.add_column(ROW_COLUMN, list(range(start, start + len(split)))))
        start += len(split)
    return out


class BoundaryCollator:
    """The run's collator plus the cached boundary states of the batch's rows (`frozen_states`)."""

    def __init__(
        self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]], states: BoundaryStates, plan: PrefixPlan
    ):
        self.collator = collator
        self.states = states
        self.plan = plan

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [int(feature[ROW_COLUMN]) for feature in features]
        batch = self.collator(
            [{key: value for key, value in feature.items() if key != ROW_COLUMN} for feature in features]
        )
        width = 1 if self.plan.first_token_only else int(batch["input_ids"].shape[1])
        batch[STATES_KEY] = self.states.batch(rows, width)
        return batch


class FirstTokenBlock(nn.Module):
    """A BERT or DistilBERT block computing its output at the first token only (the one the classifier reads).

    Same weights, same arithmetic for that token as the block itself: keys and values from every token, the query,
    attention output, residuals, layer norms and feed-forward for the first token. Returns (batch, 1, hidden).
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        first = hidden_states[:, :1]
        if hasattr(self.block, "sa_layer_norm"):  # DistilBERT's TransformerBlock
            attention = self.block.attention
            context = _first_query_attention(
                attention, attention.q_lin, attention.k_lin, attention.v_lin, hidden_states, attention_mask
            )
            attended = self.block.sa_layer_norm(attention.out_lin(context) + first)
            return self.block.output_layer_norm(self.block.ffn(attended) + attended)
        attention = self.block.attention.self  # BERT's BertLayer
        context = _first_query_attention(
            attention, attention.query, attention.key, attention.value, hidden_states, attention_mask
        )
        return self.block.feed_forward_chunk(self.block.attention.output(context, first))


def _first_query_attention(
    attention: nn.Module,
    query: nn.Module,
    key: nn.Module,
    value: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Multi-head attention of the first token over all tokens, through the model's attention implementation."""
    batch = hidden_states.shape[0]
    head_size = attention.attention_head_size

    def heads(states: torch.Tensor, projection: nn.Module) -> torch.Tensor:
        return projection(states).view(batch, states.shape[1], -1, head_size).transpose(1, 2)

    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] > 1:
        attention_mask = attention_mask[:, :, :1]
    eager = sys.modules[type(attention).__module__].eager_attention_forward
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager)
    context, _ = interface(
        attention,
        heads(hidden_states[:, :1], query),
        heads(hidden_states, key),
        heads(hidden_states, value),
        attention_mask,
        dropout=attention.dropout.p if attention.training else 0.0,
        scaling=attention.scaling,
    )
    return context.reshape(batch, 1, -1)


def install(model: nn.Module, plan: PrefixPlan) -> None:
    """Make `model(frozen_states=..., attention_mask=..., labels=...)` run only the part above the boundary.

    Calls without `frozen_states` run the whole model as before.
    """
    original = type(model).forward
    stub = _PassThrough()
    top_blocks = list(model.get_submodule(plan.blocks_path))[plan.boundary :]
    if top_blocks:
        top_blocks[-1] = FirstTokenBlock(top_blocks[-1])

    def forward(
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        frozen_states: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if frozen_states is None:
            return original(model, input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if plan.first_token_only or attention_mask is None:
            attention_mask = torch.ones(frozen_states.shape[:2], dtype=torch.long, device=frozen_states.device)
        stub.states = frozen_states
        try:
            with _swapped(model, plan, nn.ModuleList(top_blocks), stub):
                return original(
                    model, inputs_embeds=frozen_states, attention_mask=attention_mask, labels=labels, **kwargs
                )
        finally:
            stub.states = None

    model.forward = forward  # type: ignore[method-assign]


def cache_frozen_prefix(
    model: nn.Module,
    prepared: PreparedData,
    sink: EventSink,
    *,
    task: str,
    device: str,
    precision: str,
    batch_size: int,
    check_stop: Callable[[], None],
) -> PreparedData:
    """The run's data with cached boundary states, `model` set up to train on them; or `prepared` unchanged.

    Logs what is cached and its size before building it, or why the normal path is used.
    """
    plan, reason = plan_prefix(model, task)
    if plan is None:
        sink.emit(Log(level="info", message=f"frozen layers run at every step: {reason}"))
        return prepared
    splits = [split for split in (prepared.train, prepared.validation, prepared.test) if split is not None]
    dtype = next(model.parameters()).dtype
    size, budget = estimated_bytes(plan, splits, dtype), ram_budget()
    examples = sum(len(split) for split in splits)
    if size > budget:
        sink.emit(
            Log(
                level="warning",
                message=f"frozen-layer cache of {size / 2**20:,.0f} MB does not fit the RAM budget of "
                f"{budget / 2**20:,.0f} MB ({RAM_SHARE:.0%} of the available memory): frozen layers run at every step",
            )
        )
        return prepared
    sink.emit(
        Log(
            level="info",
            message=f"computing the frozen layers once ({describe(plan)}) for {examples:,} examples: "
            f"{size / 2**20:,.1f} MB in RAM",
        )
    )
    if device == "cuda":
        model.to(device)
    states = compute_states(
        model,
        plan,
        splits,
        prepared.collator,
        batch_size=batch_size,
        autocast_dtype=torch.bfloat16 if precision == "bf16" else None,
        check_stop=check_stop,
    )
    install(model, plan)
    rowed = iter(with_rows(splits))
    return replace(
        prepared,
        train=next(rowed),
        validation=next(rowed),
        test=next(rowed) if prepared.test is not None else None,
        collator=BoundaryCollator(prepared.collator, states, plan),
    )


def describe(plan: PrefixPlan) -> str:
    if plan.first_token_only:
        return f"the whole backbone ({plan.num_blocks} blocks), first token"
    return f"embeddings + blocks 0-{plan.boundary - 1} of {plan.num_blocks}" if plan.boundary else "embeddings"
