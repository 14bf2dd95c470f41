"""Run configuration: pydantic models read from TOML presets and `--set` overrides.

One `RunConfig` describes a whole run (model, data, strategy, training). The CLI, the TUI and the
tests build it the same way, so a bad field is reported identically everywhere: one line that
names the field (`ConfigError`), never a traceback.
"""

from __future__ import annotations

import codecs
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

StrategyKind = Literal["feature", "head", "last_layers", "full", "lora", "dora", "qlora", "custom"]
STRATEGY_KINDS: tuple[str, ...] = StrategyKind.__args__  # type: ignore[attr-defined]
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "auto_wrap", "offload")
PATH_FIELDS = (("data", "train"), ("data", "validation"), ("data", "test"), ("model", "id"), ("train", "deepspeed"))


class ConfigError(ValueError):
    """A user mistake in a preset or an override: the message is one line meant for people."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(_Section):
    id: str = "builtin:minilm-l6"
    """Hub id, local directory, `.gguf` file, or `builtin:NAME` (README, "Models")."""
    task: Literal["auto", "classification", "causal"] = "auto"
    """`classification` (labels from the data), `causal` (causal LM), or `auto`: causal for models whose config
    names a `...ForCausalLM` architecture, classification otherwise."""
    num_labels: int | None = Field(default=None, ge=2)
    """Number of classes; inferred from the training labels when unset."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless a preset asks for it (a warning is logged)."""


class DataConfig(_Section):
    train: str = ""
    """Training data: a local file (csv, tsv, json, jsonl, parquet) or a hub dataset id."""
    validation: str | None = None
    """Validation data (file or hub split name); when unset, carved from train by `validation_fraction`."""
    test: str | None = None
    """Held-out test data (file or hub split name), scored once at the end."""
    config_name: str | None = None
    """Hub dataset configuration (subset) name."""
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet", "lines"] = "auto"
    """File format; `auto` goes by the file extension. `lines`: one example per line, split into columns by
    `line_pattern` (files such as TREC's `TREC.train` or Kim's SST files, with the label at the start)."""
    line_pattern: str = r"^(?P<label>\S+)\s+(?P<text>.+)$"
    """`format = "lines"`: a regular expression matched against each line; its named groups become the columns.
    The default reads `LABEL text`; TREC's `COARSE:fine text` is '^(?P<label>[^:]+):\\S+ (?P<text>.+)$'."""
    encoding: str = "utf-8"
    """Text encoding of csv, tsv, json, jsonl and lines files, e.g. `latin-1` for older corpora."""
    header: bool | None = None
    """Whether csv/tsv files have a header row; `None` detects it."""
    text_field: str | list[str] = "text"
    """Column holding the input text (classification, or plain-text causal data); a list of columns (e.g.
    ["title", "description"]) is joined with `text_separator`."""
    text_separator: str = "\n"
    """What joins the columns of a list `text_field`, and the prompt and the response under `template = "none"`."""
    label_field: str = "label"
    """Column holding the label (integers or strings; strings are mapped to ids, names kept)."""
    instruction_field: str = "instruction"
    """Instruction column of Alpaca-style causal data."""
    input_field: str = "input"
    """Optional input/context column of Alpaca-style causal data."""
    output_field: str = "output"
    """Response column of Alpaca-style causal data."""
    prompt_field: str = "prompt"
    """Prompt column of prompt/response causal data."""
    response_field: str = "response"
    """Response column of prompt/response causal data."""
    template: Literal["alpaca", "chat", "none"] = "alpaca"
    """Causal prompt format: Alpaca template, the tokenizer's chat template, or none (the text as it is, special
    tokens such as <s> and </s> included: no second BOS or EOS is added)."""
    response_marker: str | None = None
    """`template = "none"` on one text column: the loss covers only the text after the last occurrence of this
    marker (e.g. "[/INST]" in Llama-2 chat text); rows without it are dropped."""
    label_words: dict[str, str] | bool = False
    """Classification data trained as causal data, for a decoder LM: a table {label = "word"} (e.g. {0 =
    "negative", 1 = "positive"}), or true for the data's own string labels as the words. Each row becomes
    `label_prompt` answered by its label's word; the loss falls on the word (and the end token that closes it)."""
    label_prompt: str = "Classify the text as one of: {labels}.\n\nText: {text}"
    """`label_words`: the prompt a row's text is put in, `{text}` standing for the text and `{labels}` for the
    words (comma-separated); it then goes through `template` as any prompt does."""
    validation_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    """Share of train carved out (seeded by `train.seed`) when no validation data is given."""
    max_length: int = Field(default=256, ge=8, le=131072)
    """Tokens per example; longer examples are truncated."""
    max_train_samples: int | None = Field(default=None, ge=1)
    """Use only a seeded random N of the training rows (quick runs)."""
    max_eval_samples: int | None = Field(default=None, ge=1)
    """Use only a seeded random N of the validation and test rows (quick runs)."""
    packing: bool = False
    """Causal LM (Llama, Qwen2/3): each batch is one row without padding; attention stays within each example."""
    dedupe: bool = False
    """Drop from train the rows that repeat an earlier train row or occur in validation or test (compared as
    normalised text: Unicode NFKC, case and runs of whitespace ignored); `finetui data` counts them."""
    max_leak: float = Field(default=0.0, ge=0.0, le=1.0)
    """Largest share of the validation (or test) rows that may also occur in train; above it `run` refuses to
    start (the scores would be inflated). 1.0 allows any overlap."""

    @field_validator("line_pattern")
    @classmethod
    def _pattern_names_columns(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc})") from None
        if not compiled.groupindex:
            raise ValueError("needs named groups, which become the columns, e.g. (?P<label>\\S+) (?P<text>.+)")
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError("unknown text encoding; use e.g. utf-8, latin-1, cp1252 or utf-16") from None
        return value

    @field_validator("text_field")
    @classmethod
    def _columns_named(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and (not value or not all(value)):
            raise ValueError('must name at least one column, e.g. ["title", "description"]')
        return value

    @field_validator("label_words")
    @classmethod
    def _one_word_per_label(cls, value: dict[str, str] | bool) -> dict[str, str] | bool:
        if value is True or value is False:
            return value
        if len(value) < 2:
            raise ValueError('needs a word for each of two or more labels, e.g. {0 = "negative", 1 = "positive"}')
        seen: dict[str, str] = {}
        for label, word in value.items():
            key = " ".join(word.casefold().split())
            if not key:
                raise ValueError(f"label {label}: the word is empty; give each label a word")
            if key in seen:
                raise ValueError(f"labels {seen[key]} and {label} share the word {word!r}; give each label its own")
            seen[key] = label
        return value

    @field_validator("label_prompt")
    @classmethod
    def _prompt_places_the_text(cls, value: str) -> str:
        try:
            value.format(text="", labels="")
        except (KeyError, IndexError, ValueError):
            raise ValueError("may name only {text} and {labels} (write other braces doubled: {{ }})") from None
        if "{text}" not in value:
            raise ValueError("must contain {text}, where the row's text goes")
        return value

    @property
    def text_columns(self) -> list[str]:
        """`text_field` as a list of column names."""
        return [self.text_field] if isinstance(self.text_field, str) else list(self.text_field)


class StrategyConfig(_Section):
    kind: StrategyKind = "lora"
    """feature, head, last_layers, full, lora, dora, qlora or custom."""
    layers: int = Field(default=2, ge=1)
    """`last_layers`: how many of the last transformer blocks train with the output layers."""
    r: int = Field(default=8, ge=1, le=4096)
    """LoRA rank."""
    alpha: float = Field(default=16, gt=0)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: str | list[str] = "auto"
    """`auto` (attention query/value projections), `all-linear`, or a list of module names."""
    pooling: Literal["auto", "cls", "mean", "last"] = "auto"
    """`feature`: how token embeddings become one vector (`auto`: mean for encoders, last for decoders)."""
    classifier_c: float = Field(default=1.0, gt=0)
    """`feature`: inverse regularisation strength C of the logistic regression."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """`qlora`: 4-bit data type."""
    double_quant: bool = True
    """`qlora`: quantise the quantisation constants too (saves ~0.4 bit per parameter)."""
    trainable: list[str] = []
    """`custom`: the freeze-map groups that train, e.g. ["classifier", "bert.encoder.layer.5"]; all else is frozen."""

    @field_validator("target_modules")
    @classmethod
    def _known_target_form(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value not in ("auto", "all-linear"):
            raise ValueError('must be "auto", "all-linear" or a list of module names')
        if isinstance(value, list) and not value:
            raise ValueError("must not be an empty list")
        return value

    @model_validator(mode="after")
    def _custom_names_its_groups(self) -> StrategyConfig:
        if self.kind == "custom" and not self.trainable:
            raise ValueError(
                "strategy.trainable: custom needs at least one freeze-map group (`finetui inspect` lists them)"
            )
        return self


class TrainConfig(_Section):
    epochs: float = Field(default=1.0, gt=0)
    """Passes over the training data (ignored when `max_steps` is set)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Optimizer steps to run; overrides `epochs`."""
    batch_size: int = Field(default=16, ge=1)
    """Examples per device per forward pass."""
    eval_batch_size: int | None = Field(default=None, ge=1)
    """Examples per evaluation batch; defaults to twice `batch_size`."""
    grad_accum: int = Field(default=1, ge=1)
    """Gradient accumulation steps: the effective batch is batch_size x grad_accum x processes."""
    lr: float = Field(default=5e-5, gt=0, le=1.0)
    """Peak learning rate (AdamW)."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Share of the steps spent warming the learning rate up from 0."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """AdamW decoupled weight decay."""
    max_grad_norm: float = Field(default=1.0, ge=0.0)
    """Gradient clipping norm (0 turns clipping off)."""
    seed: int = 42
    """Seed for initialisation, shuffling and the validation split."""
    eval_steps: int | None = Field(default=None, ge=1)
    """Evaluate every N steps; when unset, at the end of each epoch."""
    logging_steps: int = Field(default=10, ge=1)
    """Emit a step event (loss, lr, speed) every N optimizer steps."""
    save_steps: int | None = Field(default=None, ge=1)
    """Checkpoint every N steps; when unset, at the end of each epoch."""
    save_total_limit: int = Field(default=2, ge=0)
    """Keep only the last K checkpoints (0 keeps every checkpoint)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    cache_frozen: bool = True
    """`head`/`last_layers` on BERT/DistilBERT classifiers: compute the frozen layers once, train the top on them."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """`auto`: fp32 on CPU, bf16 on GPUs that support it. Pure fp16 is refused (it diverges)."""
    device: str = "auto"
    """`auto` (a CUDA GPU when there is one, else the CPU), `cpu`, `cuda`, or `cuda:N` (one process only)."""
    nproc: int = Field(default=1, ge=1, le=1024)
    """Training processes on this machine (`--nproc N`), one per GPU, launched with torchrun; the HF Trainer does
    DDP (gloo on CPUs). Each process takes `batch_size` examples per forward pass, so the global batch is
    batch_size x grad_accum x nproc, an epoch has N times fewer optimizer steps, and `lr` applies to the global
    batch as is (not rescaled)."""
    fsdp: str | None = None
    """Fully sharded data parallel over the `nproc` processes: the Trainer's `fsdp` options, e.g.
    "full_shard auto_wrap" (weights, gradients and optimizer states sharded) or "shard_grad_op auto_wrap"."""
    deepspeed: str | None = None
    """DeepSpeed config file (JSON; a path relative to the preset resolves against the preset's folder), e.g. ZeRO
    stage 2 or 3; needs `pip install deepspeed` and GPUs."""
    optim: str = "auto"
    """Optimizer, as TrainingArguments names it: `auto` (the Trainer's default AdamW), `adamw_torch`,
    `paged_adamw_8bit` (bitsandbytes, CUDA: 8-bit states paged to host memory, for QLoRA), ..."""
    sample_prompts: list[str] | str = []
    """Causal runs: prompts answered greedily at each evaluation, stored as `samples` events and shown under the
    curves: a list of prompts (each rendered as an instruction through `data.template`, or as the text of
    `data.label_words`), or "validation:N" for the first N validation rows."""
    generation_metric: Literal["auto", "exact", "contains", "number", "rouge_l"] | None = None
    """Causal runs: at each evaluation, answer the validation rows (`data.max_eval_samples` of them) and score the
    answers as `finetui eval --generate` does (`auto`: the metric the references call for); the validation
    metric `generation_<metric>` is plotted beside the validation loss."""
    metric_for_best_model: str | None = None
    """Keep the checkpoint with the best value of this validation metric and end the run with it, so that the
    saved model is the best one rather than the last: `loss` (lower is better), `accuracy` or `f1` (classifiers),
    or `generation_<metric>` (causal runs with `train.generation_metric`). Evaluations and checkpoints must then
    follow one schedule (`eval_steps` = `save_steps`, or both per epoch)."""
    generation_max_new_tokens: int = Field(default=64, ge=1)
    """The most tokens of each answer generated during training (label-word runs: the longest word's and 8 more)."""
    output_dir: str = "runs"
    """Where run directories (`<name>-<timestamp>/`) are created."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    """Experiment trackers the Trainer reports to, through its own integrations: TensorBoard writes into the run's
    `tensorboard/` folder; wandb and mlflow follow their environment variables (WANDB_PROJECT, MLFLOW_TRACKING_URI).
    Each needs its package: pip install 'finetui[tensorboard]' (or [wandb], [mlflow])."""
    notify_command: str | list[str] | None = None
    """A command run once when the run ends (finished, failed or stopped) with summary.json on its stdin, e.g. a mail
    or chat hook: an argument list, or a string split like a shell would (no shell runs it). Its failure is
    logged and never fails the run."""

    @field_validator("sample_prompts")
    @classmethod
    def _prompts_or_validation_rows(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str) and not re.fullmatch(r"validation:[1-9]\d*", value):
            raise ValueError('must be a list of prompts or "validation:N" (the first N validation rows)')
        if isinstance(value, list) and not all(prompt.strip() for prompt in value):
            raise ValueError("holds an empty prompt; give each prompt some text")
        return value

    @field_validator("precision")
    @classmethod
    def _refuse_fp16(cls, value: str) -> str:
        if value == "fp16":
            raise ValueError("pure fp16 training diverges (Raschka's IMDB run fell to 50%); use auto, bf16 or fp32")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+", value):
            raise ValueError("must be auto, cpu, cuda or cuda:N (N: a GPU index)")
        return value

    @field_validator("fsdp")
    @classmethod
    def _known_fsdp_options(cls, value: str | None) -> str | None:
        unknown = set((value or "").split()) - set(FSDP_OPTIONS)
        if unknown:
            raise ValueError(f"unknown option {sorted(unknown)[0]!r}; use {', '.join(FSDP_OPTIONS)}")
        return value or None

    @model_validator(mode="after")
    def _parallel_settings_fit(self) -> TrainConfig:
        if self.nproc > 1 and self.device.startswith("cuda:"):
            raise ValueError("train.device: cuda:N picks one GPU; with nproc > 1 use cuda (CUDA_VISIBLE_DEVICES picks)")
        if self.fsdp and self.deepspeed:
            raise ValueError("train.fsdp: FSDP and DeepSpeed both shard the model; set one of fsdp and deepspeed")
        return self

    @model_validator(mode="after")
    def _best_model_metric_is_measured(self) -> TrainConfig:
        metric = self.metric_for_best_model
        if metric is None:
            return self
        generation = metric.removeprefix("generation_") if metric.startswith("generation_") else None
        if generation is None and metric not in ("loss", "accuracy", "f1"):
            raise ValueError(
                f"train.metric_for_best_model: {metric!r} is not a validation metric; use loss, accuracy, f1 or "
                "generation_<metric> (with train.generation_metric)"
            )
        if generation is not None and self.generation_metric not in (generation, "auto"):
            wanted = f"train.generation_metric = {generation!r}"
            raise ValueError(f"train.metric_for_best_model: {metric} is computed only with {wanted}")
        if self.eval_steps != self.save_steps:
            raise ValueError(
                "train.metric_for_best_model: evaluations and checkpoints must follow one schedule; "
                "set train.save_steps equal to train.eval_steps"
            )
        return self


class RunConfig(_Section):
    name: str = "run"
    """Run name: the run directory is `<output_dir>/<name>-<timestamp>/`."""
    description: str = ""
    """Free text shown by `finetui presets`."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("name")
    @classmethod
    def _name_is_a_directory_name(cls, value: str) -> str:
        if not value or "/" in value or value.startswith("."):
            raise ValueError("must be a plain name usable as a directory name")
        return value

    @model_validator(mode="after")
    def _strategy_fits_task(self) -> RunConfig:
        if self.strategy.kind == "feature" and self.model.task == "causal":
            raise ValueError("strategy.kind: feature needs model.task = classification")
        if self.strategy.kind == "feature" and self.train.metric_for_best_model is not None:
            raise ValueError(
                "train.metric_for_best_model: the feature strategy fits its classifier once and keeps no checkpoints; "
                "leave it unset"
            )
        if self.model.task == "causal" and self.train.metric_for_best_model in ("accuracy", "f1"):
            raise ValueError(
                f"train.metric_for_best_model: a causal run has no {self.train.metric_for_best_model}; use loss "
                "or generation_<metric>"
            )
        return self

    def with_task(self, task: str) -> RunConfig:
        """This config with `model.task` resolved (`auto` replaced by what the model is)."""
        return build_config(config_to_dict(self), [f"model.task={task}"])


def format_validation_error(error: ValidationError) -> str:
    """The first problem of a pydantic error as one line: `field: what is wrong (got value)`."""
    return _error_line(error.errors()[0])


def _error_line(error: Any) -> str:
    """One pydantic error (an item of `ValidationError.errors()`) as one line: `field: what is wrong (got value)`."""
    location = ".".join(str(part) for part in error["loc"]) or "preset"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{location}: unknown key (check the spelling; `finetui presets --keys` lists them)"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    prefix = "" if message.startswith(location) else f"{location}: "
    return f"{prefix}{message}{shown}{_as_a_list(location, error)}"


def _as_a_list(location: str, error: Any) -> str:
    """For a single name given where a list is wanted: the `--set` that works (a TOML list, shell-quoted)."""
    got = error.get("input")
    wants_list = error["type"] == "list_type" or "list of" in error["msg"]
    if not isinstance(got, str) or not wants_list or got in ("auto", "all-linear"):
        return ""
    items = ", ".join(f'"{item.strip()}"' for item in got.split(",") if item.strip())
    return f"; as a list: --set '{location}=[{items}]'"


def _field_path(error: Any) -> str:
    """The dotted path of the field an error is about: the leading field names of its `loc` (union-member tags
    and list indexes dropped), or, for a check across fields, the `section.key` its message starts with."""
    parts: list[str] = []
    model: Any = RunConfig
    for part in error["loc"]:
        fields = getattr(model, "model_fields", {}) if model is not None else {}
        if not isinstance(part, str) or part not in fields:
            if error["type"] == "extra_forbidden" and isinstance(part, str):
                parts.append(part)
            break
        parts.append(part)
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    named = re.match(r"([a-z_]+(?:\.[a-z_]+)+):", error["msg"].removeprefix("Value error, "))
    if named and (not parts or named.group(1).startswith(f"{'.'.join(parts)}.")):
        return named.group(1)
    return ".".join(parts)


def field_errors(data: dict[str, Any]) -> dict[str, str]:
    """Every problem of a raw preset dict, keyed by the dotted path of its field (`train.lr`, `strategy.trainable`).

    The messages are worded as `format_validation_error` words them (one line each); the first problem of a field
    wins. An empty dict means the data validates. Problems that name no field are keyed by "".
    """
    try:
        RunConfig.model_validate(data)
    except ValidationError as exc:
        errors: dict[str, str] = {}
        for error in exc.errors():
            errors.setdefault(_field_path(error), _error_line(error))
        return errors
    return {}


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value), the value read as TOML when it parses."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set train.lr=2e-4")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of a raw preset dict with `--set` overrides applied."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for text in overrides:
        path, value = parse_override(text)
        target = merged
        for part in path[:-1]:
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            target[part] = child = dict(child)
            target = child
        target[path[-1]] = value
    return merged


def read_preset_file(path: Path) -> dict[str, Any]:
    """Parse a preset TOML file; relative paths inside it are resolved against its folder."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such preset file (see `finetui presets`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the preset ({exc})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    for section, key in PATH_FIELDS:
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            candidate = path.parent / value
            if candidate.exists():
                data[section][key] = str(candidate.resolve())
    return data


def build_config(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Validate a raw dict (plus `--set` overrides) into a RunConfig, or raise one-line ConfigError."""
    merged = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(preset: Path | None, overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig from an optional preset file and `--set` overrides."""
    data = read_preset_file(preset) if preset is not None else {}
    return build_config(data, overrides)


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """The resolved config as plain TOML-ready data (None values dropped: TOML has no null)."""
    return config.model_dump(mode="json", exclude_none=True)
