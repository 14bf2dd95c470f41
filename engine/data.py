"""Training data: read user tables (local files or hub datasets) and turn them into tokenised splits.

Every strategy and the trainer need the same thing: train/validation/test sets holding only `input_ids`,
`attention_mask` and `labels`, the label names, and a collator that pads each batch to its own longest row.
Reading user files is also where most user mistakes happen (wrong column, stray quote, Latin-1 file), so each
of them becomes a one-line `DataError` here instead of a pyarrow traceback deep inside training.

Nothing is padded at tokenisation time: rows keep their real length so that the collator pads per batch and
HF Trainer's `group_by_length` can measure lengths from `input_ids`.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import ClassLabel, Dataset
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from engine import cache as cache_lib
from engine.config import ConfigError, DataConfig
from engine.fsio import publish_dir
from engine.sources import FORMAT_BY_SUFFIX, is_hub_dataset, looks_like_data_path, unknown_format_message

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
INTEGER = re.compile(r"[+-]?\d+")
DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
IGNORE_INDEX = -100
# Causal LMs whose attention masks come from transformers' masking_utils, which turns restarting position ids
# into a block-diagonal mask (sdpa, eager, flash and flex attention alike): packed examples never see each other.
PACKABLE_MODEL_TYPES = ("llama", "qwen2", "qwen3")
MAP_BATCH_SIZE = 1000

# Stanford Alpaca's two prompts (tatsu-lab/stanford_alpaca PROMPT_DICT) with the newline after "### Response:"
# that its README and Alpaca-LoRA use (its train.py omits it), so the response starts on its own line.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


Encoder = Callable[[dict[str, list[Any]]], dict[str, list[Any]]]
Collator = Callable[[list[dict[str, Any]]], dict[str, Any]]


class DataError(ConfigError):
    """Training data that cannot be used as given: the message is one line saying what to fix."""


@dataclass
class PreparedData:
    """Tokenised splits ready for HF Trainer, plus what the model and the trainer need to know about them.

    Each split has exactly the columns `input_ids`, `attention_mask` and `labels`, unpadded. `labels` is the
    class id for classification and, for causal LM, the token ids with -100 on prompt tokens. `warnings` holds
    one-line notes for the run log (dropped examples, a capped max_length).
    """

    train: Dataset
    validation: Dataset
    test: Dataset | None
    label_names: list[str] | None
    num_labels: int | None
    collator: Collator
    warnings: list[str] = field(default_factory=list)
    from_cache: bool = False


def read_table(
    source: str,
    *,
    fmt: str = "auto",
    header: bool | None = None,
    config_name: str | None = None,
    split: str | None = None,
) -> Dataset:
    """Read one table: a local csv/tsv/json/jsonl/parquet file, or split `split` (default train) of a hub dataset.

    `source` is a local file when it exists or looks like a path (has a data-file extension, starts with `/`,
    `.` or `~`); otherwise a name such as `rotten_tomatoes` or `owner/name` goes to `datasets.load_dataset`
    with `config_name`. csv/tsv headers are detected when `header` is None; headerless files get columns
    `text`,`label` (two columns; `label`,`text` when the first one is numeric) or `column_0`, `column_1`, ...
    JSON files hold a list of objects or one object per line; lines are split on "\\n" only, never on the
    Unicode line breaks (U+0085, U+2028) that real text contains.
    """
    if not source.strip():
        raise DataError("no data given: set data.train to a data file or a hub dataset id")
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataError(f"{source}: is a directory; give a data file (csv, tsv, json, jsonl or parquet)")
    if path.is_file():
        return _read_file(path, fmt, header)
    if not is_hub_dataset(source):
        raise DataError(f"{source}: no such file")
    return _load_hub_split(source, config_name, split or "train")


def prepare_data(
    cfg: DataConfig, *, task: str, tokenizer: PreTrainedTokenizerBase, seed: int, cache: bool = False
) -> PreparedData:
    """Load, subsample, check and tokenise the train/validation/test data of a run.

    `data.train` is a local file or a hub dataset id (its `train` split). `data.validation` and `data.test` are
    local files, or, when train is a hub dataset, split names of that same dataset (IMDB has only train and
    test: set `test = "test"` and leave validation unset). An unset validation is carved from the shuffled
    train set (`validation_fraction`, seeded by `seed`). `max_train_samples` keeps the first N train rows after
    a seeded shuffle and `max_eval_samples` does the same for validation and test, so a small evaluation set
    is not all one class when the file is sorted by label.

    Classification: integer labels are kept (num_labels = largest + 1), string labels become ids in sorted
    order with the names kept; hub `ClassLabel` names are used as they are.
    Causal (`task="causal"`): rows are instruction/input/output (Alpaca), prompt/response, or a single text
    column (`template="none"`); the loss covers the response tokens and the appended eos only. Examples whose
    response is empty or truncated away by `max_length` are dropped and counted in `warnings`.

    `cache`: keep the tokenised splits of local files on disk (`engine.cache`), keyed by the files' contents, the
    data settings, the seed and the tokenizer, and reuse them on the next run with the same inputs.
    """
    if cfg.packing and task != "causal":
        raise DataError("data.packing: packs causal LM examples; classification batches are padded per batch already")
    key = _tokenised_key(cfg, task, tokenizer, seed) if cache else None
    if key is not None and (cached := _load_tokenised(key, task, tokenizer, cfg.packing)) is not None:
        return cached
    warnings: list[str] = []
    max_length = _effective_max_length(cfg, tokenizer, warnings)
    train, validation, test = _load_splits(cfg, seed)
    train = _take(train, cfg.max_train_samples, seed)
    validation = _take(validation, cfg.max_eval_samples, seed)
    test = _take(test, cfg.max_eval_samples, seed) if test is not None else None
    named = {"train": train, "validation": validation, "test": test}
    present = {role: split for role, split in named.items() if split is not None}

    label_names, num_labels, label_ids = None, None, None
    if task == "classification":
        _require_columns(present, {"text_field": cfg.text_field, "label_field": cfg.label_field})
        label_names, num_labels, label_ids = _label_space(train, cfg.label_field)
        for role, split in present.items():
            _check_labels(role, split, cfg.label_field, num_labels, label_ids)
    encode, collator = _encoder_and_collator(cfg, task, tokenizer, max_length, label_ids, present)
    tokenised = {role: _tokenise(role, split, encode, max_length, warnings) for role, split in present.items()}
    prepared = PreparedData(
        train=tokenised["train"],
        validation=tokenised["validation"],
        test=tokenised.get("test"),
        label_names=label_names,
        num_labels=num_labels,
        collator=collator,
        warnings=warnings,
    )
    if key is not None:
        _store_tokenised(key, prepared)
    return prepared


def _tokenised_key(cfg: DataConfig, task: str, tokenizer: PreTrainedTokenizerBase, seed: int) -> str | None:
    """Cache key of a run's tokenised data; None for hub datasets (the datasets library caches those itself)."""
    files = [Path(spec).expanduser() for spec in (cfg.train, cfg.validation, cfg.test) if spec]
    if not all(path.is_file() for path in files):
        return None
    contents = [cache_lib.file_digest(path) for path in files]
    return cache_lib.digest(
        "tokenised", cfg.model_dump(mode="json"), task, seed, contents, cache_lib.tokenizer_fingerprint(tokenizer)
    )


def _store_tokenised(key: str, prepared: PreparedData) -> None:
    def write(folder: Path) -> None:
        for role in ("train", "validation", "test"):
            split = getattr(prepared, role)
            if split is not None:
                split.save_to_disk(str(folder / role))
        meta = {"label_names": prepared.label_names, "num_labels": prepared.num_labels, "warnings": prepared.warnings}
        (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")

    target = cache_lib.tokenised_dir(key)
    if not target.is_dir():
        publish_dir(target, write)


def _load_tokenised(key: str, task: str, tokenizer: PreTrainedTokenizerBase, packing: bool) -> PreparedData | None:
    folder = cache_lib.tokenised_dir(key)
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        splits = {
            role: datasets.load_from_disk(str(folder / role)) if (folder / role).is_dir() else None
            for role in ("train", "validation", "test")
        }
    except (OSError, ValueError, FileNotFoundError):
        return None
    return PreparedData(
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        label_names=meta["label_names"],
        num_labels=meta["num_labels"],
        collator=_collator(task, tokenizer, packing),
        warnings=meta["warnings"],
        from_cache=True,
    )


def prepare_eval_split(
    cfg: DataConfig,
    source: str,
    *,
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    label_names: list[str] | None,
    num_labels: int | None,
) -> tuple[Dataset, Collator]:
    """One held-out file (or hub dataset's train split) tokenised as a run's training data was (`finetui eval`).

    Every row is scored (`max_eval_samples` of the run does not apply). String labels are mapped with the run's
    `label_names`; a label the run never saw is a DataError.
    """
    warnings: list[str] = []
    max_length = _effective_max_length(cfg, tokenizer, warnings)
    split = read_table(source, fmt=cfg.format, header=cfg.header, config_name=cfg.config_name)
    label_ids = None
    if task == "classification":
        _require_columns({"test": split}, {"text_field": cfg.text_field, "label_field": cfg.label_field})
        if label_names and any(isinstance(value, str) for value in split.unique(cfg.label_field)):
            label_ids = {name: index for index, name in enumerate(label_names)}
        _check_labels("test", split, cfg.label_field, num_labels or len(label_names or []), label_ids)
    encode, collator = _encoder_and_collator(cfg, task, tokenizer, max_length, label_ids, {"test": split})
    return _tokenise("test", split, encode, max_length, warnings), collator


def _effective_max_length(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, warnings: list[str]) -> int:
    if cfg.max_length > tokenizer.model_max_length:
        warnings.append(
            f"data.max_length {cfg.max_length} exceeds the tokenizer's limit; using {tokenizer.model_max_length}"
        )
        return tokenizer.model_max_length
    return cfg.max_length


def _encoder_and_collator(
    cfg: DataConfig,
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    label_ids: dict[Any, int] | None,
    present: dict[str, Dataset],
) -> tuple[Encoder, Collator]:
    collator = _collator(task, tokenizer, cfg.packing)
    if task == "classification":
        return _classification_encoder(cfg, tokenizer, max_length, label_ids), collator
    if task == "causal":
        return _causal_encoder(cfg, tokenizer, max_length, _causal_layout(cfg, present)), collator
    raise ValueError(f"unknown task {task!r}: expected classification or causal")


def _collator(task: str, tokenizer: PreTrainedTokenizerBase, packing: bool) -> Collator:
    """Pads each batch to its own longest row (labels with -100 for causal LM), or packs causal examples into one
    row with position ids restarting at each example and no attention mask (`data.packing`)."""
    if task == "causal" and packing:
        return PackingCollator(return_position_ids=True, separator_id=IGNORE_INDEX)
    if task == "causal":
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
    return DataCollatorWithPadding(tokenizer)


class PackingCollator(DataCollatorWithFlattening):
    """transformers' flattening collator, with `use_cache=False` in every batch.

    The mask functions detect packed examples from restarting position ids only when no KV cache is passed, and
    Llama-like models create one whenever `use_cache` is on (their default, also in training): packed examples
    would then attend to each other (tests/engine/test_packing.py shows both).
    """

    def __call__(self, features: list[dict[str, Any]], return_tensors: Any = None, separator_id: Any = None) -> Any:
        return {**super().__call__(features, return_tensors, separator_id), "use_cache": False}


def check_packing(model_type: str) -> None:
    """`data.packing` only where packed examples are known to stay apart (`PACKABLE_MODEL_TYPES`)."""
    if model_type not in PACKABLE_MODEL_TYPES:
        raise DataError(
            f"data.packing: not supported for {model_type!r} models (only {', '.join(PACKABLE_MODEL_TYPES)}, whose "
            "attention stays within each packed example); set data.packing = false"
        )


def _first_line(error: BaseException) -> str:
    return str(error).strip().split("\n")[0] or type(error).__name__


def _load_hub_split(dataset_id: str, config_name: str | None, split: str) -> Dataset:
    try:
        loaded = datasets.load_dataset(dataset_id, config_name, split=split)
    except Exception as exc:  # the hub raises many kinds: offline, not found, gated, unknown split or config
        raise DataError(
            f"{dataset_id}: cannot load this hub dataset ({_first_line(exc)}); check the id or give a local file"
        ) from None
    if not isinstance(loaded, Dataset):
        raise DataError(f"{dataset_id}: split {split!r} did not load as one table; give a single split name")
    return loaded


def _read_file(path: Path, fmt: str, header: bool | None) -> Dataset:
    kind = FORMAT_BY_SUFFIX.get(path.suffix.lower()) if fmt == "auto" else fmt
    if kind not in FORMAT_BY_SUFFIX.values():
        raise DataError(f"{path}: {unknown_format_message(path.suffix)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if kind == "parquet":
        return _read_parquet(path)
    text = _read_text(path)
    if kind in ("csv", "tsv"):
        return _read_delimited(path, text, "\t" if kind == "tsv" else ",", header)
    return _read_json(path, text, whole_document=kind == "json" and text.lstrip().startswith("["))


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); re-save it as UTF-8"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def _read_parquet(path: Path) -> Dataset:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({_first_line(exc)})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: holds no rows")
    return Dataset(table)


def _read_delimited(path: Path, text: str, delimiter: str, header: bool | None) -> Dataset:
    """csv (RFC 4180 quoting) or tsv (no quoting, as GLUE writes it) into typed columns."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    rows: list[list[str]] = []
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if rows and len(row) != len(rows[0]):
                raise DataError(
                    f"{path}: line {reader.line_num} has {len(row)} fields, line 1 has {len(rows[0])} "
                    "(a stray delimiter or quote? check data.format)"
                )
            rows.append(row)
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: {exc}") from None
    if not rows:
        raise DataError(f"{path}: holds no rows")
    has_header = _detect_header(rows[0], rows[1:]) if header is None else header
    records = rows[1:] if has_header else rows
    if not records:
        raise DataError(f"{path}: has a header but no rows")
    columns = [list(values) for values in zip(*records, strict=True)]
    if has_header:
        names = [cell.strip() or f"column_{index}" for index, cell in enumerate(rows[0])]
        if len(set(names)) != len(names):
            raise DataError(f"{path}: the header repeats a column name ({', '.join(names)})")
    elif len(columns) == 2:
        names = ["label", "text"] if _all_integers(columns[0]) and not _all_numbers(columns[1]) else ["text", "label"]
    else:
        names = [f"column_{index}" for index in range(len(columns))]
    return Dataset.from_dict({name: _typed(values) for name, values in zip(names, columns, strict=True)})


def _all_integers(values: list[str]) -> bool:
    return all(INTEGER.fullmatch(value.strip()) for value in values)


def _all_numbers(values: list[str]) -> bool:
    return all(DECIMAL.fullmatch(value.strip()) for value in values)


def _typed(values: list[str]) -> list[Any]:
    if _all_integers(values):
        return [int(value) for value in values]
    if _all_numbers(values):
        return [float(value) for value in values]
    return values


def _detect_header(first: list[str], rest: list[list[str]]) -> bool:
    """A header when a numeric column has a non-numeric first cell; with no numeric column, when every first
    cell is a name-like word (`text`, `label`) that does not occur again in its column."""
    numeric = [index for index in range(len(first)) if rest and _all_numbers([row[index] for row in rest])]
    if numeric:
        return any(not DECIMAL.fullmatch(first[index].strip()) for index in numeric)
    return all(
        IDENTIFIER.fullmatch(cell.strip()) and all(row[index] != cell for row in rest)
        for index, cell in enumerate(first)
    )


def _read_json(path: Path, text: str, *, whole_document: bool) -> Dataset:
    records, origins = _json_document(path, text) if whole_document else _json_lines(path, text)
    if not records:
        raise DataError(f"{path}: holds no rows")
    names = dict.fromkeys(name for record in records for name in record)
    try:
        return Dataset.from_dict({name: [record.get(name) for record in records] for name in names})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(
            f"{path}: a column mixes value types ({_first_line(exc)}); make each field all text or all numbers"
        ) from None
    except UnicodeEncodeError:
        raise DataError(f"{path}: {_unencodable_record(records, origins)}") from None


def _json_document(path: Path, text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The objects of a JSON list, and where each one is ("item 3 of the list")."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})") from None
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: item {index} of the list is not a JSON object")
    return records, [f"item {index} of the list" for index in range(len(records))]


def _json_lines(path: Path, text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The objects of a JSON-lines text, and where each one is ("line 3")."""
    records, origins = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip(" \t\r"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: line {number} is not valid JSON ({exc.msg}, column {exc.colno}); "
                "expected one JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number} is not a JSON object; expected one object per line")
        records.append(record)
        origins.append(f"line {number}")
    return records, origins


def _unencodable_record(records: list[dict[str, Any]], origins: list[str]) -> str:
    """Name the first record holding text that is not valid Unicode (a lone surrogate escape like \\ud800)."""
    for record, origin in zip(records, origins, strict=True):
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return f"{origin} holds an invalid Unicode escape (a lone surrogate such as \\ud800); fix or drop it"
    return "holds text that is not valid Unicode; re-save it as UTF-8"


def _load_splits(cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset, Dataset | None]:
    train = _in_role(
        "train",
        lambda: read_table(cfg.train, fmt=cfg.format, header=cfg.header, config_name=cfg.config_name, split="train"),
    )
    validation = _read_extra_split("validation", cfg.validation, cfg) if cfg.validation else None
    test = _read_extra_split("test", cfg.test, cfg) if cfg.test else None
    if validation is None:
        try:
            parts = train.train_test_split(test_size=cfg.validation_fraction, seed=seed, shuffle=True)
        except ValueError:
            raise DataError(
                f"data.train: {len(train)} rows are too few to carve a validation set "
                f"(validation_fraction {cfg.validation_fraction}); give data.validation"
            ) from None
        train, validation = parts["train"], parts["test"]
    return train, validation, test


def _read_extra_split(role: str, spec: str, cfg: DataConfig) -> Dataset:
    """A validation/test file, or a split name of the hub dataset that `data.train` names."""
    if is_hub_dataset(cfg.train) and "/" not in spec and not looks_like_data_path(spec):
        return _in_role(role, lambda: read_table(cfg.train, config_name=cfg.config_name, split=spec))
    if not Path(spec).expanduser().is_file():
        raise DataError(f"data.{role}: {spec}: no such file")
    return _in_role(role, lambda: read_table(spec, fmt=cfg.format, header=cfg.header))


def _in_role(role: str, read: Callable[[], Dataset]) -> Dataset:
    try:
        return read()
    except DataError as exc:
        raise DataError(f"data.{role}: {exc}") from None


def _take(split: Dataset, count: int | None, seed: int) -> Dataset:
    if count is None or count >= len(split):
        return split
    return split.shuffle(seed=seed).select(range(count))


def _require_columns(splits: dict[str, Dataset], fields: dict[str, str]) -> None:
    for role, split in splits.items():
        for key, column in fields.items():
            if column not in split.column_names:
                raise DataError(
                    f"data.{role}: no column {column!r} (columns: {', '.join(split.column_names)}); set data.{key}"
                )


def _label_space(train: Dataset, column: str) -> tuple[list[str] | None, int, dict[Any, int] | None]:
    """(label names, number of labels, value -> id map for string labels) from the training labels."""
    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names), feature.num_classes, None
    values = train.unique(column)
    if any(value is None for value in values):
        raise DataError(f"data.train: column {column!r} has empty labels; fill or drop those rows")
    if len(values) < 2:
        raise DataError(
            f"data.train: column {column!r} holds one class only ({values[0]!r}); classification needs two or more"
        )
    if all(isinstance(value, str) for value in values):
        names = sorted(values)
        return names, len(names), {name: index for index, name in enumerate(names)}
    if all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        if min(values) < 0:
            raise DataError(f"data.train: label {min(values)} is negative; use ids 0..K-1 or text labels")
        return None, max(values) + 1, None
    raise DataError(
        f"data.train: column {column!r} holds {feature} values; labels must be integers or text (not regression)"
    )


def _check_labels(role: str, split: Dataset, column: str, num_labels: int, label_ids: dict[Any, int] | None) -> None:
    for value in split.unique(column):
        if label_ids is not None:
            if value not in label_ids:
                raise DataError(
                    f"data.{role}: label {value!r} does not occur in the training data "
                    f"(labels: {', '.join(map(str, label_ids))})"
                )
        elif not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < num_labels:
            raise DataError(
                f"data.{role}: label {value!r} is not a class id 0..{num_labels - 1} "
                "(an unlabelled split? GLUE test splits have label -1)"
            )


def _tokenise(role: str, split: Dataset, encode: Encoder, max_length: int, warnings: list[str]) -> Dataset:
    if len(split) == 0:
        raise DataError(f"data.{role}: holds no rows")
    try:
        tokenised = split.map(
            encode,
            batched=True,
            batch_size=MAP_BATCH_SIZE,
            remove_columns=split.column_names,
            desc=f"Tokenising {role}",
        )
    except DataError as exc:
        raise DataError(f"data.{role}: {exc}") from None
    except Exception as exc:  # the tokenizer (or a chat template) failed on some row: find and name it
        raise DataError(f"data.{role}: {_failing_example(split, encode, exc)}") from None
    dropped = len(split) - len(tokenised)
    if dropped == len(split):
        raise DataError(
            f"data.{role}: no example keeps any response tokens within max_length {max_length}; "
            "raise data.max_length or check the response column"
        )
    if dropped:
        warnings.append(
            f"data.{role}: dropped {dropped} of {len(split)} examples with no response tokens left "
            f"(empty response, or the prompt fills max_length {max_length})"
        )
    return tokenised


def _failing_example(split: Dataset, encode: Encoder, error: Exception) -> str:
    """One line naming the first example the encoder fails on, with the error and a preview of the row."""
    for index in range(len(split)):
        row = split[index : index + 1]
        try:
            encode(row)
        except Exception as exc:
            preview = {name: values[0] for name, values in row.items()}
            shown = json.dumps(preview, ensure_ascii=True, default=str)
            shown = shown if len(shown) <= 120 else shown[:117] + "..."
            return (
                f"example {index} cannot be tokenised ({type(exc).__name__}: {_first_line(exc)}): {shown}; "
                "fix or drop that row"
            )
    return f"tokenising failed ({type(error).__name__}: {_first_line(error)})"


def _text_values(batch: dict[str, list[Any]], column: str, *, optional: bool = False) -> list[str]:
    values = batch[column]
    if optional:
        values = ["" if value is None else value for value in values]
    for value in values:
        if not isinstance(value, str):
            raise DataError(f"column {column!r} has a row that is not text ({value!r}); fill or drop it")
    return values


def _classification_encoder(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, max_length: int, label_ids: dict[Any, int] | None
) -> Encoder:
    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        encoded = tokenizer(_text_values(batch, cfg.text_field), truncation=True, max_length=max_length)
        labels = batch[cfg.label_field]
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": labels if label_ids is None else [label_ids[label] for label in labels],
        }

    return encode


def _causal_layout(cfg: DataConfig, splits: dict[str, Dataset]) -> str:
    """Which columns carry the examples: `text` (template none), `alpaca` or `prompt_response`."""
    role, first = next(iter(splits.items()))  # train, or the one file `finetui eval` scores
    columns = first.column_names
    if cfg.template == "none" and cfg.text_field in columns:
        layout, fields = "text", {"text_field": cfg.text_field}
    elif cfg.instruction_field in columns and cfg.output_field in columns:
        layout, fields = "alpaca", {"instruction_field": cfg.instruction_field, "output_field": cfg.output_field}
    elif cfg.prompt_field in columns and cfg.response_field in columns:
        layout, fields = "prompt_response", {"prompt_field": cfg.prompt_field, "response_field": cfg.response_field}
    else:
        plain = ' (or data.template = "none" for plain text)' if cfg.text_field in columns else ""
        raise DataError(
            f"data.{role}: causal data needs columns {cfg.instruction_field}+{cfg.output_field} or "
            f"{cfg.prompt_field}+{cfg.response_field} (columns: {', '.join(columns)}); set data.*_field{plain}"
        )
    _require_columns(splits, fields)
    return layout


def _prompts_and_responses(cfg: DataConfig, layout: str, batch: dict[str, list[Any]]) -> tuple[list[str], list[str]]:
    """The text before the response and the response, per row, as the template asks."""
    if layout == "text":
        texts = _text_values(batch, cfg.text_field)
        return [""] * len(texts), texts
    if layout == "prompt_response":
        return _text_values(batch, cfg.prompt_field), _text_values(batch, cfg.response_field)
    instructions = _text_values(batch, cfg.instruction_field)
    responses = _text_values(batch, cfg.output_field)
    inputs = _text_values(batch, cfg.input_field, optional=True) if cfg.input_field in batch else [""] * len(responses)
    if cfg.template == "alpaca":
        prompts = [
            ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
            if extra.strip()
            else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
            for instruction, extra in zip(instructions, inputs, strict=True)
        ]
        return prompts, responses
    pairs = zip(instructions, inputs, strict=True)
    return [f"{instruction}\n\n{extra}" if extra.strip() else instruction for instruction, extra in pairs], responses


def _chat_split(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str]
) -> tuple[list[str], list[str]]:
    """Render user/assistant turns with the tokenizer's chat template; cut each at the assistant content.

    A row without a response (a prompt to generate from) gets the template's generation prompt instead.
    """
    conversations = [
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        for prompt, response in zip(prompts, responses, strict=True)
    ]
    rendered: list[str] = tokenizer.apply_chat_template(conversations, tokenize=False)
    before, after = [], []
    for text, prompt, response in zip(rendered, prompts, responses, strict=True):
        content = response.strip()
        if not content:  # a prompt to generate from (training drops rows without a response)
            user = [{"role": "user", "content": prompt}]
            before.append(tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True))
            after.append("")
            continue
        start = text.rfind(content)
        if start < 0:
            raise DataError(
                "data.template chat: the chat template rewrites the response, so the prompt cannot be masked; "
                'use data.template = "alpaca"'
            )
        before.append(text[:start])
        after.append(text[start:])
    return before, after


def render_prompt(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, row: dict[str, Any]) -> str:
    """The text before the response, exactly as training renders it (the encoder renders through the same code).

    `row` maps column names to values, as a data file's row does; the response column may be missing (a prompt
    to generate from: a chat template then ends with its generation prompt). The layout follows from the row's
    columns: one text column under `template = "none"` (no prompt), instruction/input (Alpaca) or prompt.
    Training tokenises this text without special tokens and puts the tokenizer's leading special tokens (Llama's
    <s>) before it, except under a chat template, which writes its own (`prompt_token_ids`).
    """
    layout = _row_layout(cfg, row)
    response = {"alpaca": cfg.output_field, "prompt_response": cfg.response_field}.get(layout)
    batch = {column: [value] for column, value in row.items()}
    if response is not None and response not in batch:
        batch[response] = [""]
    prompts, _ = _rendered(cfg, tokenizer, layout, batch)
    return prompts[0]


def prompt_token_ids(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, row: dict[str, Any]) -> list[int]:
    """The token ids training puts before the response of this example (`render_prompt`, tokenised)."""
    prompt = tokenizer(render_prompt(cfg, tokenizer, row), add_special_tokens=False)["input_ids"]
    leading = [] if cfg.template == "chat" else _leading_special_ids(tokenizer)
    return [*leading, *prompt]


def _row_layout(cfg: DataConfig, row: dict[str, Any]) -> str:
    """`_causal_layout` for one row, whose response may be missing."""
    if cfg.template == "none" and cfg.text_field in row:
        return "text"
    if cfg.instruction_field in row:
        return "alpaca"
    if cfg.prompt_field in row:
        return "prompt_response"
    raise DataError(
        f"a prompt needs a column {cfg.instruction_field!r} or {cfg.prompt_field!r} (columns: {', '.join(row)}); "
        "set data.instruction_field or data.prompt_field"
    )


def _rendered(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, layout: str, batch: dict[str, list[Any]]
) -> tuple[list[str], list[str]]:
    """Each row's prompt and response as training renders them: the template, then the chat template if used."""
    prompts, responses = _prompts_and_responses(cfg, layout, batch)
    if cfg.template == "chat":
        return _chat_split(tokenizer, prompts, responses)
    return prompts, responses


def _causal_encoder(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, max_length: int, layout: str) -> Encoder:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token, which causal training appends to every response")
    chat = cfg.template == "chat"
    if chat and not getattr(tokenizer, "chat_template", None):
        raise DataError('data.template chat: this tokenizer has no chat template; use data.template = "alpaca"')
    leading = [] if chat else _leading_special_ids(tokenizer)
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        prompts, responses = _rendered(cfg, tokenizer, layout, batch)
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt, response in zip(prompt_ids, response_ids, strict=True):
            masked = len(leading) + len(prompt)
            if not response or masked >= max_length:
                continue
            target = response if chat and eos in response else [*response, eos]
            ids = [*leading, *prompt, *target][:max_length]
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([IGNORE_INDEX] * masked + ids[masked:])
        return out

    return encode


def _leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a text (Llama's <s>, BERT's [CLS], none for GPT-2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(wrapped) - len(plain) + 1):
        if wrapped[start : start + len(plain)] == plain:
            return wrapped[:start]
    return []
