"""Where things are inside a transformers model: its blocks, its output layers, its attention projections.

Strategies freeze or wrap parts of a model by name, and the freeze map groups parameters by the same parts.
Keeping these structural questions in one place means every strategy and view agrees on what "the last two
blocks" or "the head" is, for plain transformers models and for the same models wrapped by peft. All names
returned here are relative to `unwrap(model)`, the plain transformers model.
"""

from __future__ import annotations

from peft import PeftModel
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

# Attention projection pairs that LoRA adapts by default ("auto"), keyed by the leaf names that reveal them.
_ATTENTION_TARGETS: tuple[tuple[str, ...], ...] = (
    ("q_lin", "v_lin"),  # DistilBERT
    ("query", "value"),  # BERT, RoBERTa, MiniLM
    ("q_proj", "v_proj"),  # Llama, Mistral, Qwen, OPT, SmolLM
    ("c_attn",),  # GPT-2 (fused qkv)
)
_CLASSIFICATION_HEADS = ("pre_classifier", "classifier", "score")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper, or the model itself."""
    if isinstance(model, PeftModel):
        return model.get_base_model()
    return model


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Qualified name and ModuleList of the transformer blocks (e.g. `bert.encoder.layer`, `model.layers`).

    The blocks are the ModuleList of identically-typed children holding the most parameters, which picks
    `bert.encoder.layer`, `distilbert.transformer.layer`, `model.layers` or `transformer.h` without a table.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in unwrap(model).named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(parameter.numel() for parameter in module.parameters())
        if size > 0 and (best is None or size > best[0]):
            best = (size, name, module)
    if best is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no list of transformer blocks")
    return best[1], best[2]


def output_module_names(model: nn.Module, task: str) -> list[str]:
    """Qualified names of the output layers the `head` strategy trains.

    classification: `pre_classifier` + `classifier` (DistilBERT), `<base>.pooler` + `classifier` (BERT),
    `score` (Llama-like, GPT-2); causal: the output embedding, `lm_head`.
    """
    base = unwrap(model)
    if task == "causal":
        output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        name = _module_names(base).get(id(output)) if output is not None else None
        if not name:
            raise ValueError(f"{type(base).__name__} has no language-model head (is it a causal LM?)")
        return [name]
    if task != "classification":
        raise ValueError(f"unknown task {task!r}: expected classification or causal")
    names = [name for name in _CLASSIFICATION_HEADS if isinstance(getattr(base, name, None), nn.Module)]
    if not names:
        raise ValueError(f"{type(base).__name__} has no classification head (is it a sequence classifier?)")
    prefix = getattr(base, "base_model_prefix", "")
    backbone = getattr(base, prefix, None) if prefix else None
    if isinstance(getattr(backbone, "pooler", None), nn.Module):
        names.insert(0, f"{prefix}.pooler")
    return names


def auto_target_modules(model: nn.Module) -> list[str]:
    """Default LoRA targets: the attention query/value projections (`q_lin`/`v_lin`, `query`/`value`, ...).

    Known layouts are recognised by their module names; other architectures fall back to peft's own
    per-`model_type` defaults.
    """
    base = unwrap(model)
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    for targets in _ATTENTION_TARGETS:
        if leaf_names.issuperset(targets):
            return list(targets)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    fallback = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")
    if fallback and leaf_names.issuperset(fallback):
        return list(fallback)
    raise ValueError(
        f"no default LoRA target modules for {type(base).__name__}: set strategy.target_modules to a list of "
        "module names or to all-linear"
    )
