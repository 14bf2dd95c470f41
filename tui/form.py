"""The setup form's model: which preset keys the setup screen edits, and how their text becomes preset values.

The app keeps the current setup as a raw preset dict (what a preset TOML holds). Every field edits one dotted
key of it; `engine.config.field_errors` validates the whole dict with the same pydantic models as the CLI, and
each message is shown under the field it names. Keys the form does not show (a preset's `description`,
`data.format`, ...) are kept as they are.
"""

from __future__ import annotations

import os
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from engine.config import RunConfig, config_to_dict

FieldKind = Literal["text", "column", "optional", "number", "optional_number", "choice", "bool", "modules", "groups"]
PATH_KEYS = ("data.train", "data.validation", "data.test", "model.id")
LORA_KINDS = ("lora", "dora", "qlora")
DEFAULTS: dict[str, Any] = config_to_dict(RunConfig())
MISSING: Any = object()


@dataclass(frozen=True)
class Field:
    key: str
    label: str
    kind: FieldKind
    section: str
    strategies: tuple[str, ...] | None = None  # shown only for these strategy kinds
    tasks: tuple[str, ...] | None = None  # shown only for these tasks

    @property
    def widget_id(self) -> str:
        return "f-" + self.key.replace(".", "-")

    @property
    def choices(self) -> tuple[str, ...]:
        return choices_of(self.key)

    @property
    def help(self) -> str:
        return description_of(self.key)


FIELDS: tuple[Field, ...] = (
    Field("name", "run name", "text", "Run"),
    Field("model.id", "model", "text", "Model"),
    Field("model.task", "task", "choice", "Model"),
    Field("data.train", "train data", "text", "Data"),
    Field("data.validation", "validation", "optional", "Data"),
    Field("data.test", "test", "optional", "Data"),
    Field("data.text_field", "text field", "column", "Data", tasks=("classification",)),
    Field("data.label_field", "label field", "column", "Data", tasks=("classification",)),
    Field("data.instruction_field", "instruction", "column", "Data", tasks=("causal",)),
    Field("data.input_field", "input", "column", "Data", tasks=("causal",)),
    Field("data.output_field", "output", "column", "Data", tasks=("causal",)),
    Field("data.template", "template", "choice", "Data", tasks=("causal",)),
    Field("data.max_length", "max length", "number", "Data"),
    Field("data.max_train_samples", "max train rows", "optional_number", "Data"),
    Field("strategy.kind", "strategy", "choice", "Strategy"),
    Field("strategy.layers", "last N layers", "number", "Strategy", strategies=("last_layers",)),
    Field("strategy.r", "rank r", "number", "Strategy", strategies=LORA_KINDS),
    Field("strategy.alpha", "alpha", "number", "Strategy", strategies=LORA_KINDS),
    Field("strategy.dropout", "dropout", "number", "Strategy", strategies=LORA_KINDS),
    Field("strategy.target_modules", "target modules", "modules", "Strategy", strategies=LORA_KINDS),
    Field("strategy.quant_type", "4-bit type", "choice", "Strategy", strategies=("qlora",)),
    Field("strategy.double_quant", "double quant", "bool", "Strategy", strategies=("qlora",)),
    Field("strategy.pooling", "pooling", "choice", "Strategy", strategies=("feature",)),
    Field("strategy.classifier_c", "C", "number", "Strategy", strategies=("feature",)),
    Field("strategy.trainable", "trainable", "groups", "Strategy", strategies=("custom",)),
    Field("train.epochs", "epochs", "number", "Training"),
    Field("train.max_steps", "max steps", "optional_number", "Training"),
    Field("train.batch_size", "batch size", "number", "Training"),
    Field("train.grad_accum", "grad accum", "number", "Training"),
    Field("train.lr", "learning rate", "number", "Training"),
    Field("train.scheduler", "scheduler", "choice", "Training"),
    Field("train.warmup_ratio", "warmup ratio", "number", "Training"),
    Field("train.weight_decay", "weight decay", "number", "Training"),
    Field("train.precision", "precision", "choice", "Training"),
    Field("train.device", "device", "text", "Training"),
    Field("train.nproc", "processes", "number", "Training"),
    Field("train.gradient_checkpointing", "grad checkpoint", "bool", "Training"),
    Field("train.logging_steps", "log every", "number", "Training"),
    Field("train.eval_steps", "eval every", "optional_number", "Training"),
    Field("train.seed", "seed", "number", "Training"),
    Field("train.output_dir", "output dir", "text", "Training"),
)
FIELDS_BY_KEY = {field.key: field for field in FIELDS}
SECTIONS = tuple(dict.fromkeys(field.section for field in FIELDS))


def _model_field(key: str) -> Any:
    model: Any = RunConfig
    *sections, name = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[name]


def choices_of(key: str) -> tuple[str, ...]:
    """The allowed values of a Literal field (pure fp16 left out: the config always refuses it)."""
    annotation = _model_field(key).annotation
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return tuple(value for value in args if value != "fp16")
    nested = [typing.get_args(arg) for arg in args if typing.get_origin(arg) is Literal]
    return tuple(value for values in nested for value in values)


def description_of(key: str) -> str:
    return " ".join((_model_field(key).description or "").split())


def get_value(data: dict[str, Any], key: str, default: Any = MISSING) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def with_value(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of `data` with `key` set to `value` (or removed when `value` is MISSING)."""
    result = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    *sections, name = key.split(".")
    node = result
    for section in sections:
        child = node.get(section)
        node[section] = child = dict(child) if isinstance(child, dict) else {}
        node = child
    if value is MISSING:
        node.pop(name, None)
    else:
        node[name] = value
    return result


def effective_value(data: dict[str, Any], key: str) -> Any:
    """The value in `data`, else the default (None when the default is unset)."""
    value = get_value(data, key)
    return get_value(DEFAULTS, key, None) if value is MISSING else value


def to_text(field: Field, value: Any) -> str:
    """How a value shows in the field's Input."""
    if value is None or value is MISSING:
        return ""
    if field.kind == "modules":
        return value if isinstance(value, str) else ", ".join(value)
    if field.kind == "groups":
        return ", ".join(value)
    if field.key in PATH_KEYS and isinstance(value, str):
        return display_path(value)
    if isinstance(value, float) and field.kind in ("number", "optional_number"):
        return f"{value:g}"
    return str(value)


def parse_text(field: Field, text: str) -> Any:
    """An Input's text as a preset value: numbers read as TOML, empty optional fields removed (MISSING).

    Text that is not a number stays a string, so pydantic reports it in the CLI's words.
    """
    text = text.strip()
    if field.kind in ("optional", "optional_number") and not text:
        return MISSING
    if field.kind in ("number", "optional_number"):
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            return text
        return value if isinstance(value, int | float) and not isinstance(value, bool) else text
    if field.kind == "modules":
        if text in ("auto", "all-linear"):
            return text
        return [part.strip() for part in text.split(",") if part.strip()]
    if field.kind == "groups":
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def display_path(value: str) -> str:
    """A path shown relative to the working directory when it lies below it (stable, short, as typed)."""
    if not value or not os.path.isabs(value):
        return value
    try:
        relative = Path(value).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return value
    return str(relative)


def relativize_paths(data: dict[str, Any]) -> dict[str, Any]:
    """Preset paths (made absolute by `read_preset_file`) shown relative to the working directory when below it."""
    for key in PATH_KEYS:
        value = get_value(data, key)
        if isinstance(value, str) and value:
            shown = display_path(value)
            if shown != value:
                data = with_value(data, key, shown)
    return data


def task_of(data: dict[str, Any]) -> str:
    """classification, causal, or auto when it cannot be told without loading the model's config."""
    task = effective_value(data, "model.task")
    if task != "auto":
        return task
    model_id = str(effective_value(data, "model.id") or "")
    return BUILTIN_TASKS.get(model_id, "auto")


# The builtin models (engine.models.BUILTIN_MODELS, which imports torch): name, size, task. Kept in step by a test.
BUILTIN_MODELS: tuple[tuple[str, str, str], ...] = (
    ("builtin:minilm-l6", "22.7 M", "classification"),
    ("builtin:smollm2-135m", "134.5 M", "causal"),
    ("builtin:tiny-bert", "1.03 M", "classification"),
    ("builtin:tiny-distilbert", "1.03 M", "classification"),
    ("builtin:tiny-llama", "181 k", "causal"),
)
BUILTIN_TASKS = {name: task for name, _, task in BUILTIN_MODELS}
