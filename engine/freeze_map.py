"""The freeze map: which parts of a prepared model train, how many parameters each holds, what it will cost.

It is the first thing a run reports and the whole of `finetui inspect`, so it must be exact where it can be
(parameter counts match peft's `get_nb_trainable_parameters`, 4-bit weights included) and honest where it
cannot (the memory figure is labelled an estimate). It only reads a prepared model, real or on the meta
device, and never loads anything.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from engine.architecture import find_blocks, output_module_names, unwrap
from engine.models import new_weights

GroupKind = Literal["embeddings", "block", "head", "other"]
ADAMW_STATE_BYTES = 8  # two fp32 moments per trainable parameter
FOUR_BIT_BLOCK = 64  # bitsandbytes' 4-bit quantisation block size
# Activation elements a block keeps per token, as multiples of (hidden, intermediate), by whether its MLP is gated.
SAVED_PER_TOKEN = {False: (10.5, 2), True: (6.0, 4)}
# CPU overhead, measured by bench/memory.py (bench/MEMORY.md): glibc keeps and fragments the memory freed by each
# backward; libraries, thread pools and the Trainer take a fixed amount, and the loader a share of the weights.
FIRST_TOKEN_BLOCK_SHARE = 0.25
CPU_ACTIVATION_OVERHEAD = 0.25
CPU_FRAMEWORK_BYTES = 24 * 2**20
CPU_WEIGHTS_OVERHEAD = 0.25


@dataclass(frozen=True)
class LayerGroup:
    name: str
    kind: GroupKind
    total: int
    trainable: int
    dtype: str
    quantization: str | None
    new: bool = False
    """Newly initialised for this task (not in the checkpoint): a task head, a pooler the checkpoint lacked."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    total_bytes: int
    note: str
    overhead_bytes: int = 0  # allocator and framework (absent from freeze maps written before it was counted)


@dataclass(frozen=True)
class FreezeMap:
    layers: list[LayerGroup]
    total_params: int
    trainable_params: int
    trainable_percent: float
    memory: MemoryEstimate | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "trainable_percent": self.trainable_percent,
            "layers": [asdict(layer) for layer in self.layers],
            "memory": asdict(self.memory) if self.memory is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FreezeMap:
        memory = data.get("memory")
        return cls(
            layers=[LayerGroup(**layer) for layer in data["layers"]],
            total_params=data["total_params"],
            trainable_params=data["trainable_params"],
            trainable_percent=data["trainable_percent"],
            memory=MemoryEstimate(**memory) if memory is not None else None,
        )


def parameter_count(parameter: torch.Tensor) -> int:
    """Parameters a tensor stands for, as peft counts them: a packed 4-bit tensor holds 2 x itemsize per element."""
    if type(parameter).__name__ == "Params4bit":
        return parameter.numel() * 2 * parameter.element_size()
    return parameter.numel()


def _quantization(parameter: torch.Tensor) -> str | None:
    kind = type(parameter).__name__
    if kind == "Params4bit":
        return str(getattr(parameter, "quant_type", "4bit"))
    if kind == "Int8Params":
        return "int8"
    return None


def _storage_bytes(parameter: torch.Tensor, planned_4bit: bool = False) -> int:
    """Bytes a parameter occupies, with a 4-bit tensor's quantisation constants (absmax, nested absmax).

    `planned_4bit`: an unquantised weight costed as bitsandbytes will store it (half a byte per weight,
    one fp32 absmax per block of 64).
    """
    if planned_4bit:
        return parameter.numel() // 2 + 4 * (parameter.numel() // FOUR_BIT_BLOCK)
    size = parameter.numel() * parameter.element_size()
    state = getattr(parameter, "quant_state", None)
    if state is not None:
        for constants in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None)):
            if isinstance(constants, torch.Tensor):
                size += constants.numel() * constants.element_size()
    return size


def _relative_prefix(model: nn.Module) -> str:
    """How the unwrapped model's parameter names are prefixed in `model` (`base_model.model.` under peft)."""
    base = unwrap(model)
    if base is model:
        return ""
    name = next(name for name, module in model.named_modules() if module is base)
    return f"{name}." if name else ""


def _head_names(base: nn.Module) -> list[str]:
    for task in ("classification", "causal"):
        try:
            return output_module_names(base, task)
        except ValueError:
            continue
    return []


def _embedding_names(base: nn.Module, blocks_name: str) -> list[str]:
    """Input embedding modules: a BERT-style `embeddings` container, else every nn.Embedding outside the blocks."""
    names = {id(module): name for name, module in base.named_modules()}
    get_input = getattr(base, "get_input_embeddings", None)
    input_embeddings = get_input() if callable(get_input) else None
    input_name = names.get(id(input_embeddings), "") if input_embeddings is not None else ""
    parent = input_name.rpartition(".")[0]
    if parent.rpartition(".")[2] == "embeddings":
        return [parent]
    return [
        name
        for name, module in base.named_modules()
        if isinstance(module, nn.Embedding) and not name.startswith(f"{blocks_name}.")
    ]


def _group_of(name: str, heads: list[str], embeddings: list[str], blocks_name: str) -> tuple[str, GroupKind]:
    def inside(prefix: str) -> bool:
        return name == prefix or name.startswith(f"{prefix}.")

    for head in heads:
        if inside(head):
            return head, "head"
    for embedding in embeddings:
        if inside(embedding):
            return embedding, "embeddings"
    if blocks_name and name.startswith(f"{blocks_name}."):
        index = name[len(blocks_name) + 1 :].split(".", 1)[0]
        return f"{blocks_name}.{index}", "block"
    return name.rpartition(".")[0] or name, "other"


def parameter_groups(model: nn.Module) -> dict[str, tuple[str, GroupKind]]:
    """The freeze-map group (name, kind) of every parameter, keyed by its name in `model.named_parameters()`."""
    base = unwrap(model)
    prefix = _relative_prefix(model)
    try:
        blocks_name, _ = find_blocks(base)
    except ValueError:
        blocks_name = ""
    heads = _head_names(base)
    embeddings = _embedding_names(base, blocks_name)
    return {
        name: _group_of(name.removeprefix(prefix), heads, embeddings, blocks_name)
        for name, _ in model.named_parameters()
    }


def compute_freeze_map(
    model: nn.Module,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    gradient_checkpointing: bool = False,
    frozen_linear_4bit: str | None = None,
    processes: int = 1,
    sharding: str = "none",
    precision: str | None = None,
    device: str | None = None,
    eval_batch_size: int | None = None,
    first_token_top: bool = False,
) -> FreezeMap:
    """Group a prepared model's parameters (adapters in the group of the module they wrap) and estimate memory.

    Counts follow peft's `get_nb_trainable_parameters`: `model.named_parameters()` (tied weights once),
    4-bit tensors counted as 2 x itemsize parameters per stored element. The memory estimate is added
    when `batch_size` and `seq_len` are given (see `estimate_memory`). `frozen_linear_4bit` ("nf4", "fp4")
    maps an unquantised (meta) model as the 4-bit load will be: frozen linear weights outside the output
    layers are labelled and costed as 4-bit; counts do not change (peft counts both alike).
    """
    planned = (
        _planned_4bit_weights(model, _head_names(unwrap(model)), _relative_prefix(model))
        if frozen_linear_4bit
        else set()
    )
    layers = _layer_groups(model, planned, frozen_linear_4bit)
    total = sum(layer.total for layer in layers)
    trainable = sum(layer.trainable for layer in layers)
    memory = None
    if batch_size is not None and seq_len is not None:
        memory = estimate_memory(
            model,
            layers,
            batch_size,
            seq_len,
            gradient_checkpointing=gradient_checkpointing,
            planned_4bit=planned,
            processes=processes,
            sharding=sharding,
            precision=precision,
            device=device,
            eval_batch_size=eval_batch_size,
            first_token_top=first_token_top,
        )
    return FreezeMap(
        layers=layers,
        total_params=total,
        trainable_params=trainable,
        trainable_percent=100.0 * trainable / total if total else 0.0,
        memory=memory,
    )


def _layer_groups(model: nn.Module, planned: set[int], planned_quantization: str | None) -> list[LayerGroup]:
    """The parameters of `model` summed per freeze-map group, in the order the groups first appear."""
    group_of = parameter_groups(model)
    new = new_weights(unwrap(model))
    prefix = _relative_prefix(model)
    groups: dict[str, dict[str, Any]] = {}
    for full_name, parameter in model.named_parameters():
        group_name, kind = group_of[full_name]
        group = groups.setdefault(
            group_name,
            {
                "kind": kind,
                "total": 0,
                "trainable": 0,
                "dtypes": Counter(),
                "quantization": None,
                "new": new is not None,
            },
        )
        if group["new"] and _base_name(full_name.removeprefix(prefix)) not in new:  # type: ignore[operator]
            group["new"] = False
        count = parameter_count(parameter)
        group["total"] += count
        group["trainable"] += count if parameter.requires_grad else 0
        group["dtypes"][str(parameter.dtype).removeprefix("torch.")] += count
        group["quantization"] = group["quantization"] or _quantization(parameter)
        if id(parameter) in planned:
            group["quantization"] = planned_quantization
    return [
        LayerGroup(
            name=name,
            kind=group["kind"],
            total=group["total"],
            trainable=group["trainable"],
            dtype=group["dtypes"].most_common(1)[0][0],
            quantization=group["quantization"],
            new=group["new"],
        )
        for name, group in groups.items()
    ]


def _base_name(name: str) -> str:
    """A parameter's name in the plain model: peft's copies and wrappers (`modules_to_save.default.`,
    `base_layer.`, `original_module.`) left out."""
    for inner in (".modules_to_save.default.", ".original_module.", ".base_layer."):
        name = name.replace(inner, ".")
    return name


def _planned_4bit_weights(model: nn.Module, heads: list[str], prefix: str) -> set[int]:
    """ids of the weights a 4-bit load quantises: frozen nn.Linear weights outside the output layers."""
    planned = set()
    for full_name, module in model.named_modules():
        name = full_name.removeprefix(prefix)
        if not isinstance(module, nn.Linear) or module.weight.requires_grad:
            continue
        if any(name == head or name.startswith(f"{head}.") for head in heads):
            continue
        planned.add(id(module.weight))
    return planned


def _blocks_needing_backward(layers: list[LayerGroup]) -> tuple[int, int]:
    """(blocks that must keep activations, all blocks): every block from the first trainable one onward."""
    blocks = [layer for layer in layers if layer.kind == "block"]
    if any(layer.kind == "embeddings" and layer.trainable for layer in layers):
        return len(blocks), len(blocks)
    first = next((index for index, layer in enumerate(blocks) if layer.trainable), len(blocks))
    return len(blocks) - first, len(blocks)


def estimate_memory(
    model: nn.Module,
    layers: list[LayerGroup],
    batch_size: int,
    seq_len: int,
    *,
    gradient_checkpointing: bool = False,
    planned_4bit: set[int] | None = None,
    processes: int = 1,
    sharding: str = "none",
    precision: str | None = None,
    device: str | None = None,
    eval_batch_size: int | None = None,
    first_token_top: bool = False,
) -> MemoryEstimate:
    """Peak training memory of one process (one device), in bytes. `batch_size` is per device; `precision`
    (fp32, bf16) sets the activations' element size (default: the input embeddings' dtype); `device` (cpu, cuda)
    adds that device's allocator and framework overhead. Checked against measured peaks by `bench/memory.py`.

    - weights: every parameter's storage (4-bit tensors: packed bytes + quantisation constants).
    - gradients: one per trainable parameter, in the parameter's dtype.
    - optimizer: AdamW keeps two fp32 moments per trainable parameter (8 bytes each).
    - activations: what autograd keeps for the backward (`_activation_bytes`); a top block that computes the first
      token only above a cached frozen prefix (`first_token_top`, engine.training.frozen_prefix) keeps
      `FIRST_TOKEN_BLOCK_SHARE` of a block (keys and values of every token; measured); or, when more, one block's
      activations at `eval_batch_size` (default 2 x batch): the forward of frozen layers, evaluation (`_forward_bytes`).
    - overhead: on a CPU (`_cpu_overhead`), the allocator's share of the activations, the libraries and the loader.
    - `processes` > 1 (`engine.parallel.sharding`): plain DDP replicates everything and keeps a second copy of
      the gradients in its all-reduce buckets; ZeRO-1 divides the optimizer states by the process count, ZeRO-2 and
      FSDP shard_grad_op the gradients too, ZeRO-3 and FSDP full_shard the weights as well.
    """
    planned = planned_4bit or set()
    weights = sum(_storage_bytes(parameter, id(parameter) in planned) for parameter in model.parameters())
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    gradients = sum(parameter.numel() * parameter.element_size() for parameter in trainable)
    optimizer = ADAMW_STATE_BYTES * sum(parameter.numel() for parameter in trainable)
    backward_blocks, all_blocks = _blocks_needing_backward(layers)
    activations = _activation_bytes(
        model, batch_size, seq_len, backward_blocks, bool(trainable), gradient_checkpointing, precision, device
    )
    if first_token_top and backward_blocks and not gradient_checkpointing:
        activations -= int((1 - FIRST_TOKEN_BLOCK_SHARE) * activations / backward_blocks)
    activations = max(activations, _forward_bytes(model, eval_batch_size or 2 * batch_size, seq_len, precision))
    overhead = _cpu_overhead(model, weights, activations, planned, bool(trainable)) if device == "cpu" else 0
    weights, gradients, optimizer, parallel = _per_device(weights, gradients, optimizer, processes, sharding)
    checkpointing = ", gradient checkpointing" if gradient_checkpointing else ""
    note = (
        f"estimate{parallel} for batch {batch_size} x {seq_len} tokens: weights, gradients, AdamW states (2 x fp32 "
        f"per trainable parameter), activations of {backward_blocks}/{all_blocks} blocks{checkpointing}"
        f"{OVERHEAD_NOTE.get(device or '', '; excludes allocator and framework overhead')}"
    )
    return MemoryEstimate(
        weights_bytes=weights,
        gradients_bytes=gradients,
        optimizer_bytes=optimizer,
        activations_bytes=activations,
        overhead_bytes=overhead,
        total_bytes=weights + gradients + optimizer + activations + overhead,
        note=note,
    )


OVERHEAD_NOTE = {"cpu": "; overhead: CPU allocator and framework", "cuda": "; CUDA allocator overhead not included"}


def _per_device(
    weights: int, gradients: int, optimizer: int, processes: int, sharding: str
) -> tuple[int, int, int, str]:
    """Weights, gradients and optimizer states of one of `processes` devices, and how they are shared out."""
    if processes <= 1:
        return weights, gradients, optimizer, ""
    shard = {"none": 0, "optimizer": 1, "gradients": 2, "full": 3}[sharding]
    optimizer //= processes if shard >= 1 else 1
    gradients = gradients // processes if shard >= 2 else gradients * (2 if shard == 0 else 1)
    weights //= processes if shard >= 3 else 1
    shared = ("DDP buckets: gradients x 2", "optimizer sharded", "gradients, optimizer sharded", "all sharded")
    return weights, gradients, optimizer, f" per device of {processes} ({shared[shard]})"


def _cpu_overhead(model: nn.Module, weights: int, activations: int, planned_4bit: set[int], trains: bool) -> int:
    """What a CPU process holds beyond the parts, as measured (bench/MEMORY.md): `CPU_ACTIVATION_OVERHEAD` of the
    activations (glibc keeps the memory each backward frees, fragmented); when it trains (the Trainer, its
    optimizer and checkpoints; not `feature`), `CPU_FRAMEWORK_BYTES` plus `CPU_WEIGHTS_OVERHEAD` of the weights;
    and with 4-bit weights the fp32 checkpoint the loader read to quantise them, which stays resident."""
    parameters = list(model.parameters())
    quantised = any(id(parameter) in planned_4bit or _quantization(parameter) for parameter in parameters)
    loaded = 4 * sum(parameter_count(parameter) for parameter in parameters) if quantised else 0
    training = CPU_FRAMEWORK_BYTES + CPU_WEIGHTS_OVERHEAD * weights if trains else 0
    return int(CPU_ACTIVATION_OVERHEAD * activations + training + loaded)


def _activation_bytes(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    backward_blocks: int,
    trains: bool,
    gradient_checkpointing: bool,
    precision: str | None,
    device: str | None,
) -> int:
    """Bytes autograd keeps for the backward, with t = batch x sequence tokens, h = hidden, i = intermediate
    (MLP) size, a = heads, x = bytes per activation element (2 under bf16, else 4).

    Each block from the first trainable one on keeps x*t*(c_h*h + c_i*i), with (c_h, c_i) counted with saved-tensor
    hooks on MiniLM (BERT: 10.5, 2) and SmolLM2 (Llama, gated MLP: 6, 4); attention that materialises its
    probabilities (eager attention, or SDPA with attention dropout off CUDA) adds 3*x*a*s*t. With gradient
    checkpointing the blocks keep only their input (x*t*h each) plus one block's full activations while it is
    recomputed. A trained causal LM adds its fp32 logits, their log-softmax and gradient: 3*t*vocab*4.
    """
    base = unwrap(model)
    config = getattr(base, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 1)
    intermediate = int(getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None) or 4 * hidden)
    element = _element_bytes(base, precision)
    tokens = batch_size * seq_len
    per_hidden, per_intermediate = SAVED_PER_TOKEN[_gated_mlp(base, intermediate)]
    per_block = element * tokens * (per_hidden * hidden + per_intermediate * intermediate)
    if _materialises_attention(config, device):
        per_block += 3 * element * heads * seq_len * tokens
    per_block = int(per_block)
    if gradient_checkpointing and backward_blocks:
        activations = backward_blocks * tokens * hidden * element + per_block
    else:
        activations = backward_blocks * per_block
    get_output = getattr(base, "get_output_embeddings", None)
    if callable(get_output) and get_output() is not None and trains:
        activations += 3 * tokens * int(getattr(config, "vocab_size", 0) or 0) * 4
    return activations


def _forward_bytes(model: nn.Module, batch_size: int, seq_len: int, precision: str | None) -> int:
    """Peak of a forward without autograd (evaluation, the feature strategy, frozen layers computed once): about one
    block's activations, x*t*(c_h*h + c_i*i) for t = batch x sequence tokens, freed block by block."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    intermediate = int(getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None) or 4 * hidden)
    per_hidden, per_intermediate = SAVED_PER_TOKEN[_gated_mlp(base, intermediate)]
    element = _element_bytes(base, precision)
    return int(element * batch_size * seq_len * (per_hidden * hidden + per_intermediate * intermediate))


def _element_bytes(base: nn.Module, precision: str | None) -> int:
    """Bytes per activation element: 2 under bf16, 4 under fp32; without a precision, the input embeddings'."""
    if precision is not None:
        return 2 if precision == "bf16" else 4
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    return embeddings.weight.element_size() if embeddings is not None else 4


def _gated_mlp(base: nn.Module, intermediate: int) -> bool:
    """Whether a block's MLP is gated (Llama's gate_proj and up_proj both project to the intermediate size)."""
    try:
        _, blocks = find_blocks(base)
    except ValueError:
        return False
    widening = [m for m in blocks[0].modules() if isinstance(m, nn.Linear) and m.out_features == intermediate]
    return len(widening) >= 2


def _materialises_attention(config: Any, device: str | None) -> bool:
    """Whether attention keeps its (batch x heads x sequence x sequence) probabilities for the backward."""
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    dropout = getattr(config, "attention_probs_dropout_prob", None) or getattr(config, "attention_dropout", 0)
    if implementation == "eager":
        return True
    return implementation == "sdpa" and float(dropout or 0) > 0 and device != "cuda"
