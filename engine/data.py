"""Training data: read user tables (local files or hub datasets) and turn them into tokenised splits.

Every strategy and the trainer need the same thing: train/validation/test sets holding only `input_ids`,
`attention_mask` and `labels`, the label names, and a collator that pads each batch to its own longest row.
Reading user files is also where most user mistakes happen (wrong column, stray quote, Latin-1 file), so each
of them becomes a one-line `DataError` here instead of a pyarrow traceback deep inside training.

Rows that cannot train (empty text, a missing or unknown label, a response truncated away, ...) are not errors:
`encode_data` keeps every row, tokenised as training sees it, with the reason each left-out row is left out and
its untruncated length; `prepare_data` trains on the rest. `engine.data_report` reads the same encoded rows,
so what `finetui data` shows is what training gets, by construction.

Nothing is padded at tokenisation time: rows keep their real length so that the collator pads per batch and
HF Trainer's `group_by_length` can measure lengths from `input_ids`.
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import ClassLabel, Dataset
from huggingface_hub import constants as hub_constants
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from engine import cache as cache_lib
from engine.config import DataConfig
from engine.fsio import publish_dir
from engine.sources import DataError, decode_text, file_format, hub_reachable, is_hub_dataset, looks_like_data_path

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
INTEGER = re.compile(r"[+-]?\d+")
DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
IGNORE_INDEX = -100
# Causal LMs whose attention masks come from transformers' masking_utils, which turns restarting position ids
# into a block-diagonal mask (sdpa, eager, flash and flex attention alike): packed examples never see each other.
PACKABLE_MODEL_TYPES = ("llama", "qwen2", "qwen3")
MAP_BATCH_SIZE = 1000
TOKEN_COLUMNS = ["input_ids", "attention_mask", "labels"]
ROW = "row"  # an encoded row's position in the file it was read from (0-based)
LENGTH = "length"  # an encoded row's length in tokens before truncation (0 for a row left out before tokenising)
DROPPED = "dropped"  # why a row is left out of training ("" when it trains)
_ROW_SOURCE = "__finetui_row__"  # the row number column while a split is read, carved and subsampled

# Why a row is left out (the values of the `dropped` column)
EMPTY_TEXT = "empty text"
MISSING_LABEL = "missing label"
UNKNOWN_LABEL = "unknown label"
UNSEEN_LABEL = "label unseen in training"
WRONG_TYPE = "wrong type"
EMPTY_RESPONSE = "empty response"
NO_MARKER = "no response marker"
TRUNCATED_AWAY = "response truncated away"
# Train rows data.dedupe removes before encoding (`EncodedData.removed`)
DUPLICATE = "duplicates"
IN_EVALUATION = "also in validation or test"

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


@dataclass
class EncodedData:
    """Every row of a run's splits, tokenised as training sees it, and what was found on the way.

    Each split has the columns `input_ids`, `attention_mask`, `labels` (empty and -100 for a row left out),
    `length` (tokens before truncation), `dropped` (the reason a row is left out, "" when it trains) and `row`
    (its position in the file it came from; a carved validation row is a train-file row).
    """

    task: str
    max_length: int
    splits: dict[str, Dataset]
    columns: list[str]
    """The columns of the train data."""
    fields: dict[str, Any]
    """The field mapping used: `data.*_field` keys (and the causal `layout`) to column names."""
    label_names: list[str] | None
    num_labels: int | None
    carved: bool
    """Whether validation was carved from train (`validation_fraction`)."""
    notes: list[dict[str, str]]
    """Findings made while preparing, each {"field": a config key, "message": one line}."""
    duplicates: dict[str, Any]
    """Within the train data as read: `exact` and `normalised` repeats of an earlier row, and a few `examples`."""
    leaked: dict[str, dict[str, Any]]
    """Per evaluation split: `count` of its rows whose text also occurs in train, the first `rows`, a few
    `examples`."""
    removed: dict[str, list[int]]
    """Train rows `data.dedupe` removed before encoding, by reason."""
    from_cache: bool = False

    def meta(self) -> dict[str, Any]:
        """Everything but the splits, JSON-ready (the tokenisation cache stores it beside them)."""
        return {name: value for name, value in vars(self).items() if name not in ("splits", "from_cache")}


@dataclass
class PreparedData:
    """Tokenised splits ready for HF Trainer, plus what the model and the trainer need to know about them.

    Each split has exactly the columns `input_ids`, `attention_mask` and `labels`, unpadded. `labels` is the
    class id for classification and, for causal LM, the token ids with -100 on prompt tokens. `encoded` holds
    every row with why the missing ones are left out (`engine.data_report` reads it and gates the run).
    """

    train: Dataset
    validation: Dataset
    test: Dataset | None
    label_names: list[str] | None
    num_labels: int | None
    collator: Collator
    encoded: EncodedData
    from_cache: bool = False


def longest_row(prepared: PreparedData) -> int:
    """The most tokens in one row of the splits a run trains and evaluates on: what its batches pad to at most."""
    splits = [prepared.train, prepared.validation, *([prepared.test] if prepared.test is not None else [])]
    lengths = [pc.max(pc.list_value_length(split.data.column("input_ids"))).as_py() for split in splits]
    return max((length for length in lengths if length is not None), default=0)


@dataclass(frozen=True)
class _LabelSpace:
    """The classes: their names, their count, and the map from label values to ids (None: the values are ids)."""

    names: list[str] | None
    count: int
    ids: dict[Any, int] | None = None
    note: str | None = None

    def id_of(self, value: Any, role: str) -> tuple[int, str]:
        """(class id, "") for a usable label; (-100, why not) otherwise."""
        if _is_missing(value):
            return IGNORE_INDEX, MISSING_LABEL
        if isinstance(value, bool) or not isinstance(value, int | str) or (self.ids is None and isinstance(value, str)):
            return IGNORE_INDEX, WRONG_TYPE
        if self.ids is not None and value in self.ids:
            return self.ids[value], ""
        if self.ids is None and 0 <= value < self.count:
            return value, ""
        return IGNORE_INDEX, UNKNOWN_LABEL if role == "train" else UNSEEN_LABEL


def read_table(
    source: str,
    *,
    fmt: str = "auto",
    header: bool | None = None,
    config_name: str | None = None,
    split: str | None = None,
    encoding: str = "utf-8",
    line_pattern: str | None = None,
) -> Dataset:
    """Read one table: a local csv/tsv/json/jsonl/parquet/lines file, or split `split` (default train) of a hub
    dataset.

    `source` is a local file when it exists or looks like a path (has a data-file extension, starts with `/`,
    `.` or `~`); otherwise a name such as `rotten_tomatoes` or `owner/name` goes to `datasets.load_dataset`
    with `config_name`. csv/tsv headers are detected when `header` is None; headerless files get columns
    `text`,`label` (two columns; `label`,`text` when the first one is numeric) or `column_0`, `column_1`, ...
    JSON files hold a list of objects or one object per line; lines are split on "\\n" only, never on the
    Unicode line breaks (U+0085, U+2028) that real text contains. `lines` files (`fmt="lines"`) hold one example
    per line, split into columns by the named groups of `line_pattern` (default: `LABEL text`). Text files are
    decoded with `encoding`.
    """
    if not source.strip():
        raise DataError("no data given: set data.train to a data file or a hub dataset id")
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataError(f"{source}: is a directory; give a data file (csv, tsv, json, jsonl or parquet)")
    if path.is_file():
        return _read_file(path, fmt, header, encoding, line_pattern or DataConfig().line_pattern)
    if not is_hub_dataset(source):
        raise DataError(f"{source}: no such file")
    return _load_hub_split(source, config_name, split or "train")


def read_data(cfg: DataConfig, source: str, split: str | None = None) -> Dataset:
    """`read_table` with a run's reading settings (format, header, encoding, line pattern, hub config)."""
    return read_table(
        source,
        fmt=cfg.format,
        header=cfg.header,
        config_name=cfg.config_name,
        split=split,
        encoding=cfg.encoding,
        line_pattern=cfg.line_pattern,
    )


def prepare_data(
    cfg: DataConfig, *, task: str, tokenizer: PreTrainedTokenizerBase, seed: int, cache: bool = False
) -> PreparedData:
    """The train/validation/test data of a run, tokenised, without the rows that cannot train.

    `encode_data` reads, checks and tokenises every row; this keeps the rows that train (`dropped` empty) with
    just the columns the Trainer feeds the model. `engine.data_report.check_data` decides whether what is left
    can train (the run's gate).
    """
    if cfg.packing and task != "causal":
        raise DataError("data.packing: packs causal LM examples; classification batches are padded per batch already")
    encoded = encode_data(cfg, task=task, tokenizer=tokenizer, seed=seed, cache=cache)
    kept = {role: kept_rows(split) for role, split in encoded.splits.items()}
    return PreparedData(
        train=kept["train"],
        validation=kept["validation"],
        test=kept.get("test"),
        label_names=encoded.label_names,
        num_labels=encoded.num_labels,
        collator=_collator(task, tokenizer, cfg.packing),
        encoded=encoded,
        from_cache=encoded.from_cache,
    )


def encode_data(
    cfg: DataConfig, *, task: str, tokenizer: PreTrainedTokenizerBase, seed: int, cache: bool = False
) -> EncodedData:
    """Load, subsample, check and tokenise every row of a run's train/validation/test data.

    `data.train` is a local file or a hub dataset id (its `train` split). `data.validation` and `data.test` are
    local files, or, when train is a hub dataset, split names of that same dataset (IMDB has only train and
    test: set `test = "test"` and leave validation unset). An unset validation is carved from the shuffled
    train set (`validation_fraction`, seeded by `seed`). `max_train_samples` keeps the first N train rows after
    a seeded shuffle and `max_eval_samples` does the same for validation and test, so a small evaluation set
    is not all one class when the file is sorted by label. `dedupe` drops repeated train rows before the carve
    and train rows that occur in validation or test after it.

    Classification: integer labels 0..K-1 are the ids; other integers are mapped to ids in sorted order with
    the values kept as names (a file numbering its classes 1..K has K classes, not K+1), and string labels
    likewise; hub `ClassLabel` names are used as they are. Text columns (`text_field`, one or a list joined by
    `text_separator`) longer than `max_length` are truncated.
    Causal (`task="causal"`): rows are instruction/input/output (Alpaca), prompt/response, or a single text
    column (`template="none"`), rendered through `template` (`render_prompt`); the loss covers the response
    tokens and the appended eos only.

    `cache`: keep the encoded splits of local files on disk (`engine.cache`), keyed by the files' contents, the
    data settings, the seed (where it picks rows) and the tokenizer, and reuse them on the next run (or report)
    with the same inputs.
    """
    key = _tokenised_key(cfg, task, tokenizer, seed) if cache else None
    if key is not None and (cached := _load_encoded(key)) is not None:
        return cached
    notes: list[dict[str, str]] = []
    max_length = _effective_max_length(cfg, tokenizer, notes)
    if task == "causal":
        cfg = resolve_label_words(cfg)
    loaded = _load_splits(cfg, task, seed)
    space = None
    if task == "classification":
        space = _label_space(loaded.splits["train"], cfg.label_field)
        if space.note:
            notes.append({"field": "data.label_field", "message": space.note})
    splits = {
        role: _encode_split(role, split, _encoder(cfg, task, tokenizer, max_length, loaded.fields, space, role))
        for role, split in loaded.splits.items()
    }
    encoded = EncodedData(
        task=task,
        max_length=max_length,
        splits=splits,
        columns=loaded.columns,
        fields=loaded.fields,
        label_names=space.names if space else None,
        num_labels=space.count if space else None,
        carved=loaded.carved,
        notes=notes,
        duplicates=loaded.duplicates,
        leaked=loaded.leaked,
        removed=loaded.removed,
    )
    if key is not None:
        _store_encoded(key, encoded)
    return encoded


def kept_rows(split: Dataset) -> Dataset:
    """The rows of an encoded split that train, with only the columns the model is fed."""
    dropped = split.with_format("arrow")[DROPPED]
    keep = np.flatnonzero(pc.equal(dropped, "").to_numpy())
    if len(keep) < len(split):
        split = split.select(keep)
    return split.select_columns(TOKEN_COLUMNS)


def _tokenised_key(cfg: DataConfig, task: str, tokenizer: PreTrainedTokenizerBase, seed: int) -> str | None:
    """Cache key of a run's encoded data; None for hub datasets (the datasets library caches those itself).

    The seed is part of the key only where it picks rows (a carved validation set, `max_*_samples`); neither
    `packing` (the collator packs) nor `max_leak` (the gate's threshold) changes a row, so runs that differ only
    there reuse the same tokens.
    """
    files = [Path(spec).expanduser() for spec in (cfg.train, cfg.validation, cfg.test) if spec]
    if not all(path.is_file() for path in files):
        return None
    contents = [cache_lib.file_digest(path) for path in files]
    sampled = cfg.validation is None or cfg.max_train_samples is not None or cfg.max_eval_samples is not None
    settings = cfg.model_dump(mode="json", exclude={"max_leak", "packing"})
    return cache_lib.digest(
        "encoded", settings, task, seed if sampled else None, contents, cache_lib.tokenizer_fingerprint(tokenizer)
    )


def _store_encoded(key: str, encoded: EncodedData) -> None:
    def write(folder: Path) -> None:
        for role, split in encoded.splits.items():
            split.save_to_disk(str(folder / role))
        (folder / "meta.json").write_text(json.dumps(encoded.meta()), encoding="utf-8")

    target = cache_lib.tokenised_dir(key)
    if not target.is_dir():
        publish_dir(target, write)


def _load_encoded(key: str) -> EncodedData | None:
    folder = cache_lib.tokenised_dir(key)
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        splits = {
            role: datasets.load_from_disk(str(folder / role))
            for role in ("train", "validation", "test")
            if (folder / role).is_dir()
        }
        return EncodedData(**meta, splits=splits, from_cache=True)
    except (OSError, ValueError, TypeError):
        return None


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

    Every row is scored (`max_eval_samples` of the run does not apply): a row that cannot be (empty text, a
    label the run never saw, ...) is a DataError naming it. Causal rows whose response is truncated away are
    left out, as in training. Labels are mapped with the run's `label_names`.
    """
    max_length = _effective_max_length(cfg, tokenizer, [])
    split = read_data(cfg, source)
    fields = _fields(cfg, task, split.column_names)
    split = _numbered(split)
    _require_columns({"test": split}, fields)
    space = None
    if task == "classification":
        space = _eval_label_space(label_names, num_labels, column_values(split, cfg.label_field))
    encoded = _encode_split("test", split, _encoder(cfg, task, tokenizer, max_length, fields, space, "test"))
    reasons = column_values(encoded, DROPPED)
    for row, reason in zip(column_values(encoded, ROW), reasons, strict=True):
        if reason and reason != TRUNCATED_AWAY:
            raise DataError(f"{source}: row {row + 1}: {reason}; fix or drop that row")
    if all(reasons):
        raise DataError(
            f"{source}: no example keeps any response tokens within max_length {max_length}; raise data.max_length"
        )
    return kept_rows(encoded), _collator(task, tokenizer, cfg.packing)


def _eval_label_space(label_names: list[str] | None, num_labels: int | None, values: list[Any]) -> _LabelSpace:
    """The run's classes, keyed by the values a held-out file writes them as (ids, names, or integer names)."""
    if not label_names:
        return _LabelSpace(None, num_labels or 0)
    by_name = {name: index for index, name in enumerate(label_names)}
    if any(isinstance(value, str) for value in values):
        return _LabelSpace(label_names, len(label_names), by_name)
    if all(INTEGER.fullmatch(name) for name in label_names):
        return _LabelSpace(label_names, len(label_names), {int(name): index for name, index in by_name.items()})
    return _LabelSpace(label_names, num_labels or len(label_names))


def _effective_max_length(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, notes: list[dict[str, str]]) -> int:
    if cfg.max_length > tokenizer.model_max_length:
        notes.append(
            {
                "field": "data.max_length",
                "message": f"data.max_length {cfg.max_length} exceeds the tokenizer's limit; "
                f"using {tokenizer.model_max_length}",
            }
        )
        return tokenizer.model_max_length
    return cfg.max_length


def _collator(task: str, tokenizer: PreTrainedTokenizerBase, packing: bool) -> Collator:
    """Pads each batch to its own longest row (labels with -100 for causal LM), or packs causal examples into one
    row with position ids restarting at each example and no attention mask (`data.packing`)."""
    if task == "causal" and packing:
        return PackingCollator(return_position_ids=True, separator_id=IGNORE_INDEX, return_flash_attn_kwargs=True)
    if task == "causal":
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
    return DataCollatorWithPadding(tokenizer)


class PackingCollator(DataCollatorWithFlattening):
    """transformers' flattening collator, with `use_cache=False` in every batch.

    The mask functions detect packed examples from restarting position ids only when no KV cache is passed, and
    Llama-like models create one whenever `use_cache` is on (their default, also in training): packed examples
    would then attend to each other (tests/engine/test_packing.py shows both). The examples' boundaries go along
    (`cu_seq_lens_q`/`_k`, `max_length_q`/`_k`) for `engine.training.packed_attention` and FlashAttention.
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


@contextmanager
def _offline_unless_hub_reachable() -> Iterator[None]:
    """With the hub unreachable, datasets reads its cache at once instead of retrying every request for half a
    minute (both libraries read their offline flag when they are called)."""
    if hub_reachable():
        yield
        return
    flags = (datasets.config, hub_constants)
    saved = [module.HF_HUB_OFFLINE for module in flags]
    for module in flags:
        module.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for module, value in zip(flags, saved, strict=True):
            module.HF_HUB_OFFLINE = value


def _load_hub_split(dataset_id: str, config_name: str | None, split: str) -> Dataset:
    try:
        with _offline_unless_hub_reachable():
            loaded = datasets.load_dataset(dataset_id, config_name, split=split)
    except Exception as exc:  # the hub raises many kinds: offline, not found, gated, unknown split or config
        if not hub_reachable():
            raise DataError(
                f"{dataset_id}: the Hugging Face hub is not reachable (offline?) and this dataset is not in the local "
                "cache; give a local data file"
            ) from None
        raise DataError(
            f"{dataset_id}: cannot load this hub dataset ({_first_line(exc)}); check the id or give a local file"
        ) from None
    if not isinstance(loaded, Dataset):
        raise DataError(f"{dataset_id}: split {split!r} did not load as one table; give a single split name")
    return loaded


def _read_file(path: Path, fmt: str, header: bool | None, encoding: str, line_pattern: str) -> Dataset:
    kind = file_format(path, fmt)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if kind == "parquet":
        return _read_parquet(path)
    text = decode_text(path, path.read_bytes(), encoding)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if kind == "lines":
        return _read_lines(path, text, line_pattern)
    if kind in ("csv", "tsv"):
        return _read_delimited(path, text, "\t" if kind == "tsv" else ",", header)
    return _read_json(path, text, whole_document=kind == "json" and text.lstrip().startswith("["))


def _read_lines(path: Path, text: str, line_pattern: str) -> Dataset:
    """One example per non-blank line; the named groups of `line_pattern` become typed columns."""
    pattern = re.compile(line_pattern)
    columns: dict[str, list[str]] = {name: [] for name in pattern.groupindex}
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        match = pattern.match(line)
        if match is None:
            shown = line if len(line) <= 60 else line[:59] + "…"
            raise DataError(
                f"{path}: line {number} does not match data.line_pattern {line_pattern!r} ({shown!r}); "
                "fix the line or the pattern"
            )
        for name, values in columns.items():
            values.append(match.group(name) or "")
    return Dataset.from_dict({name: _typed(values) for name, values in columns.items()})


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
    """Integers, else decimals, else text; an empty cell among numbers is a missing value (None)."""
    present = [value for value in values if value.strip()]
    if present and _all_integers(present):
        return [int(value) if value.strip() else None for value in values]
    if present and _all_numbers(present):
        return [float(value) if value.strip() else None for value in values]
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


@dataclass
class _Loaded:
    """The raw splits a run uses (each with its file row numbers) and what reading them found."""

    splits: dict[str, Dataset]
    columns: list[str]
    fields: dict[str, Any]
    carved: bool
    duplicates: dict[str, Any]
    leaked: dict[str, dict[str, Any]]
    removed: dict[str, list[int]] = field(default_factory=dict)


def _load_splits(cfg: DataConfig, task: str, seed: int) -> _Loaded:
    """Read, dedupe (`data.dedupe`), carve and subsample the splits; count duplicates and train/eval overlap.

    Rows are compared by their normalised text (`_key`); the keys are computed once per file and looked up by
    row number afterwards.
    """
    train = _numbered(_in_role("train", lambda: read_data(cfg, cfg.train, "train")))
    given = {
        role: _numbered(_read_extra_split(role, spec, cfg))
        for role, spec in (("validation", cfg.validation), ("test", cfg.test))
        if spec
    }
    columns = [column for column in train.column_names if column != _ROW_SOURCE]
    fields = _fields(cfg, task, columns)
    _require_columns({"train": train, **given}, fields)
    if fields.get("layout") == "label_words":
        for role, split in {"train": train, **given}.items():
            check_label_words(cfg, f"data.{role}", column_values(split, cfg.label_field))
    texts = {role: _example_texts(split, fields) for role, split in {"train": train, **given}.items()}
    keys = {role: [_key(text) for text in values] for role, values in texts.items()}
    duplicates = _duplicates(texts["train"], keys["train"])
    loaded = _Loaded({}, columns, fields, carved="validation" not in given, duplicates=duplicates, leaked={})
    if cfg.dedupe:
        train = _drop_rows(train, _repeated_rows(keys["train"]), DUPLICATE, loaded.removed)
    if loaded.carved:
        try:
            parts = train.train_test_split(test_size=cfg.validation_fraction, seed=seed, shuffle=True)
        except ValueError:
            raise DataError(
                f"data.train: {len(train)} rows are too few to carve a validation set "
                f"(validation_fraction {cfg.validation_fraction}); give data.validation"
            ) from None
        train, given["validation"] = parts["train"], parts["test"]
        keys["validation"], texts["validation"] = keys["train"], texts["train"]
    if cfg.dedupe:
        evaluated = {key for role, split in given.items() for key in _keys_of(split, keys[role])}
        shared = [row for row in column_values(train, _ROW_SOURCE) if keys["train"][row] in evaluated]
        train = _drop_rows(train, set(shared), IN_EVALUATION, loaded.removed)
    train = _take(train, cfg.max_train_samples, seed)
    splits = {"train": train} | {role: _take(split, cfg.max_eval_samples, seed) for role, split in given.items()}
    trained = set(_keys_of(train, keys["train"]))
    for role in ("validation", "test"):
        if role in splits:
            rows = sorted(row for row in column_values(splits[role], _ROW_SOURCE) if keys[role][row] in trained)
            examples = [_preview(texts[role][row]) for row in rows[:3]]
            loaded.leaked[role] = {"count": len(rows), "rows": [row + 1 for row in rows[:5]], "examples": examples}
    loaded.splits = {role: splits[role] for role in ("train", "validation", "test") if role in splits}
    return loaded


def column_values(split: Dataset, column: str) -> list[Any]:
    """A column as a Python list, in one call (iterating a datasets column costs ~0.1 ms a row)."""
    return split.with_format("arrow")[column].to_pylist()


def _numbered(split: Dataset) -> Dataset:
    return split.add_column(_ROW_SOURCE, np.arange(len(split), dtype=np.int64))


def _keys_of(split: Dataset, keys: list[str]) -> list[str]:
    """The normalised keys of a split's rows (looked up by row number), without the empty ones."""
    return [keys[row] for row in column_values(split, _ROW_SOURCE) if keys[row]]


def _drop_rows(train: Dataset, rows: set[int], reason: str, removed: dict[str, list[int]]) -> Dataset:
    if not rows:
        return train
    numbers = column_values(train, _ROW_SOURCE)
    removed[reason] = sorted(row + 1 for row in rows)
    return train.select([index for index, row in enumerate(numbers) if row not in rows])


def _example_texts(split: Dataset, fields: dict[str, Any]) -> list[str]:
    """Each row's example: its text columns (classification) or its prompt and response columns (causal), joined
    by NUL."""
    columns = [column for column in _content_columns(fields) if column in split.column_names]
    values = zip(*(column_values(split, column) for column in columns), strict=True)
    return ["\0".join("" if value is None else str(value) for value in row) for row in values]


def _key(text: str) -> str:
    """An example compared as people read it: Unicode NFKC, case-folded, runs of whitespace as one space.
    Empty when the example has no text."""
    parts = [" ".join(unicodedata.normalize("NFKC", part).casefold().split()) for part in text.split("\0")]
    return "\0".join(parts) if any(parts) else ""


def _content_columns(fields: dict[str, Any]) -> list[str]:
    names = ("text_field", "instruction_field", "input_field", "output_field", "prompt_field", "response_field")
    columns: list[str] = []
    for name in names:
        value = fields.get(name)
        columns.extend([value] if isinstance(value, str) else value or [])
    return columns


def _repeated_rows(keys: list[str]) -> set[int]:
    """The rows whose key already occurred in an earlier row."""
    seen: set[str] = set()
    repeated = set()
    for row, key in enumerate(keys):
        if key in seen:
            repeated.add(row)
        elif key:
            seen.add(key)
    return repeated


def _duplicates(texts: list[str], keys: list[str]) -> dict[str, Any]:
    """Repeats of an earlier train row: `exact` (the same text) and `normalised` (the same `_key`), with the
    first few as `examples` (both row numbers, 1-based, and the text)."""
    present = [text for text, key in zip(texts, keys, strict=True) if key]
    first_of: dict[str, int] = {}
    examples = []
    for row, key in enumerate(keys):
        if key in first_of and len(examples) < 3:
            examples.append({"rows": [first_of[key] + 1, row + 1], "text": _preview(texts[row])})
        if key:
            first_of.setdefault(key, row)
    normalised = len(present) - len(first_of)
    return {"exact": len(present) - len(set(present)), "normalised": normalised, "examples": examples}


def _preview(text: str, width: int = 60) -> str:
    text = " ".join(text.replace("\0", " | ").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _read_extra_split(role: str, spec: str, cfg: DataConfig) -> Dataset:
    """A validation/test file, or a split name of the hub dataset that `data.train` names."""
    if is_hub_dataset(cfg.train) and "/" not in spec and not looks_like_data_path(spec):
        return _in_role(role, lambda: read_data(cfg, cfg.train, spec))
    if not Path(spec).expanduser().is_file():
        raise DataError(f"data.{role}: {spec}: no such file")
    return _in_role(role, lambda: read_data(cfg, spec))


def _in_role(role: str, read: Callable[[], Dataset]) -> Dataset:
    try:
        return read()
    except DataError as exc:
        raise DataError(f"data.{role}: {exc}") from None


def _take(split: Dataset, count: int | None, seed: int) -> Dataset:
    if count is None or count >= len(split):
        return split
    return split.shuffle(seed=seed).select(range(count))


def _fields(cfg: DataConfig, task: str, columns: list[str]) -> dict[str, Any]:
    """The columns a task reads (config key -> column name, or names for a list `text_field`); causal data also
    gets its `layout`: `text` (template none on one text column), `alpaca` or `prompt_response`."""
    if task == "classification":
        return {"text_field": cfg.text_field, "label_field": cfg.label_field}
    if task != "causal":
        raise ValueError(f"unknown task {task!r}: expected classification or causal")
    if cfg.label_words:
        return {"layout": "label_words", "text_field": cfg.text_field, "label_field": cfg.label_field}
    if cfg.response_marker is not None and cfg.template != "none":
        raise DataError('data.response_marker: marks the response in plain text; it needs data.template = "none"')
    if cfg.template == "none" and all(column in columns for column in cfg.text_columns):
        return {"layout": "text", "text_field": cfg.text_field}
    if cfg.instruction_field in columns and cfg.output_field in columns:
        fields = {"instruction_field": cfg.instruction_field, "output_field": cfg.output_field}
        if cfg.input_field in columns:
            fields["input_field"] = cfg.input_field
        return {"layout": "alpaca", **fields}
    if cfg.prompt_field in columns and cfg.response_field in columns:
        return {"layout": "prompt_response", "prompt_field": cfg.prompt_field, "response_field": cfg.response_field}
    plain = ' (or data.template = "none" for plain text)' if cfg.text_columns[0] in columns else ""
    if len(columns) == 1 and not plain:
        plain = f' (one column: for plain text set data.text_field = "{columns[0]}" and data.template = "none")'
    raise DataError(
        f"data.train: causal data needs columns {cfg.instruction_field}+{cfg.output_field} or "
        f"{cfg.prompt_field}+{cfg.response_field} (columns: {', '.join(columns)}); set data.*_field{plain}"
    )


def _require_columns(splits: dict[str, Dataset], fields: dict[str, Any]) -> None:
    for role, split in splits.items():
        present = [column for column in split.column_names if column != _ROW_SOURCE]
        for key, value in fields.items():
            if key in ("layout", "input_field"):
                continue
            for column in [value] if isinstance(value, str) else value:
                if column not in present:
                    raise DataError(
                        f"data.{role}: no column {column!r} (columns: {', '.join(present)}); "
                        f"set data.{key}{_one_column_advice(present, key)}"
                    )


def _one_column_advice(columns: list[str], key: str) -> str:
    """What a file of one column probably is, when a task needs more than one."""
    if len(columns) != 1 or key != "label_field":
        return ""
    return (
        f"; {columns[0]!r} is the only column: a label at the start of each line ('LABEL text') is read with "
        'data.format = "lines", and plain text without labels trains a causal model with data.template = "none"'
    )


def _label_space(train: Dataset, column: str) -> _LabelSpace:
    """The classes, from the training labels (rows without a label are left out, not counted as a class)."""
    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        return _LabelSpace(list(feature.names), feature.num_classes)
    values = [value for value in dict.fromkeys(column_values(train, column)) if not _is_missing(value)]
    if not values:
        raise DataError(f"data.train: column {column!r} holds no labels; fill it or set data.label_field")
    if len(values) < 2:
        raise DataError(
            f"data.train: column {column!r} holds one class only ({values[0]!r}); classification needs two or more"
        )
    if all(isinstance(value, str) for value in values):
        names = sorted(values)
        return _LabelSpace(names, len(names), {name: index for index, name in enumerate(names)})
    if all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        ordered = sorted(values)
        if ordered == list(range(len(ordered))):
            return _LabelSpace(None, len(ordered))
        names = [str(value) for value in ordered]
        shown = ", ".join(names) if len(names) <= 6 else f"{names[0]}, {names[1]}, ..., {names[-1]}"
        note = (
            f"integer labels {shown} are not 0..{len(names) - 1}: mapped to ids 0..{len(names) - 1} in sorted "
            "order, with the values as label names"
        )
        return _LabelSpace(names, len(names), {value: index for index, value in enumerate(ordered)}, note)
    raise DataError(
        f"data.train: column {column!r} holds {feature} values; labels must be integers or text (not regression)"
    )


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _encoder(
    cfg: DataConfig,
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    fields: dict[str, Any],
    space: _LabelSpace | None,
    role: str,
) -> Encoder:
    if task == "classification":
        assert space is not None
        return _classification_encoder(cfg, tokenizer, max_length, space, role)
    return _causal_encoder(cfg, tokenizer, max_length, fields["layout"])


def _encode_split(role: str, split: Dataset, encode: Encoder) -> Dataset:
    if len(split) == 0:
        raise DataError(f"data.{role}: holds no rows")
    try:
        return split.map(
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


def _failing_example(split: Dataset, encode: Encoder, error: Exception) -> str:
    """One line naming the first example the encoder fails on, with the error and a preview of the row."""
    for index in range(len(split)):
        row = split[index : index + 1]
        try:
            encode(row)
        except Exception as exc:
            preview = {name: values[0] for name, values in row.items() if name != _ROW_SOURCE}
            shown = json.dumps(preview, ensure_ascii=True, default=str)
            shown = shown if len(shown) <= 120 else shown[:117] + "..."
            return (
                f"row {row[_ROW_SOURCE][0] + 1} cannot be tokenised ({type(exc).__name__}: {_first_line(exc)}): "
                f"{shown}; fix or drop that row"
            )
    return f"tokenising failed ({type(error).__name__}: {_first_line(error)})"


def _encoded(
    batch: dict[str, list[Any]], ids: list[list[int]], labels: list[Any], lengths: list[int], reasons: list[str]
) -> dict[str, list[Any]]:
    """An encoder's output: rows left out keep their row number, length and reason, with no tokens."""
    ids = [[] if reason else row for row, reason in zip(ids, reasons, strict=True)]
    return {
        "input_ids": ids,
        "attention_mask": [[1] * len(row) for row in ids],
        "labels": labels,
        LENGTH: lengths,
        DROPPED: reasons,
        ROW: batch[_ROW_SOURCE],
    }


def _texts(batch: dict[str, list[Any]], columns: list[str], separator: str) -> tuple[list[str], list[str]]:
    """The text of each row (several columns joined by `separator`) and why it cannot train ("" when it can)."""
    texts, reasons = [], []
    for values in zip(*(batch[column] for column in columns), strict=True):
        if any(value is not None and not isinstance(value, str) for value in values):
            texts.append("")
            reasons.append(WRONG_TYPE)
            continue
        text = separator.join(value for value in values if value)
        texts.append(text)
        reasons.append("" if text.strip() else EMPTY_TEXT)
    return texts, reasons


def _truncated_ids(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> tuple[list[list[int]], list[int]]:
    """Token ids cut to `max_length` as the tokenizer truncates (special tokens kept), and the untruncated lengths."""
    plain = {"verbose": False, "return_attention_mask": False, "return_token_type_ids": False}
    ids = tokenizer(texts, **plain)["input_ids"]
    lengths = [len(row) for row in ids]
    long = [index for index, length in enumerate(lengths) if length > max_length]
    if long:
        cut = tokenizer([texts[index] for index in long], truncation=True, max_length=max_length, **plain)["input_ids"]
        for index, row in zip(long, cut, strict=True):
            ids[index] = row
    return ids, lengths


def _classification_encoder(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, max_length: int, space: _LabelSpace, role: str
) -> Encoder:
    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts, reasons = _texts(batch, cfg.text_columns, cfg.text_separator)
        labels = []
        for index, value in enumerate(batch[cfg.label_field]):
            label, problem = space.id_of(value, role)
            labels.append(label)
            reasons[index] = reasons[index] or problem
        ids, lengths = _truncated_ids(
            tokenizer, [text if not r else "" for text, r in zip(texts, reasons, strict=True)], max_length
        )
        lengths = [0 if reason else length for length, reason in zip(lengths, reasons, strict=True)]
        labels = [IGNORE_INDEX if reason else label for label, reason in zip(labels, reasons, strict=True)]
        return _encoded(batch, ids, labels, lengths, reasons)

    return encode


def render_prompt(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, row: dict[str, Any]) -> str:
    """The prompt of one causal example exactly as training renders it: all the text before the response.

    `row` maps column names to values, as a data file's row does; the response column may be missing (a prompt
    to generate from). The layout follows from the columns as in training: one text column under
    `template = "none"` (the prompt is the text up to the last `response_marker`, or nothing), instruction/input
    (Alpaca) or prompt. Training tokenises the prompt without special tokens and puts the tokenizer's leading
    special tokens (Llama's <s>) before it unless it starts with them (`prompt_token_ids` does both); chat
    templates write their own.
    """
    fields = _fields(cfg, "causal", [*row, *_response_columns(cfg, row)])
    batch = {column: [value] for column, value in row.items()} | {
        column: [""] for column in _response_columns(cfg, row) if column not in row
    }
    prompts, _, _ = _rendered(cfg, tokenizer, fields["layout"], batch)
    return prompts[0]


def prompt_token_ids(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, row: dict[str, Any]) -> list[int]:
    """The token ids training puts before the response of this example (`render_prompt`, tokenised)."""
    prompt = tokenizer(render_prompt(cfg, tokenizer, row), add_special_tokens=False)["input_ids"]
    return [*_unless_present(_special_prefix(cfg, tokenizer), prompt), *prompt]


def _response_columns(cfg: DataConfig, row: dict[str, Any]) -> list[str]:
    """The response column a prompt-only row lacks (so the layout is found as for the training data)."""
    if cfg.label_words or (cfg.template == "none" and all(column in row for column in cfg.text_columns)):
        return []
    return [cfg.output_field] if cfg.instruction_field in row else [cfg.response_field]


def _special_prefix(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens that go before an example: the tokenizer's leading ones (Llama's <s>, BERT's [CLS]);
    none under a chat template, which writes its own."""
    return [] if cfg.template == "chat" else _leading_special_ids(tokenizer)


def _unless_present(prefix: list[int], ids: list[int]) -> list[int]:
    """`prefix`, or nothing when `ids` start with it already (template none on text carrying <s>)."""
    return [] if ids[: len(prefix)] == prefix else prefix


def _rendered(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, layout: str, batch: dict[str, list[Any]]
) -> tuple[list[str], list[str], list[str]]:
    """Each row's prompt and response as the template renders them, and why the row cannot train ("" if it can)."""
    if layout == "text":
        return _marked_texts(cfg, batch)
    if layout == "label_words":
        prompts, words, reasons = _label_word_texts(cfg, batch)
        return (*_templated(cfg, tokenizer, prompts, [""] * len(prompts), words), reasons)
    if layout == "alpaca":
        instructions, reasons = _optional_texts(batch, cfg.instruction_field)
        inputs, input_reasons = _optional_texts(batch, cfg.input_field)
        reasons = [a or b for a, b in zip(reasons, input_reasons, strict=True)]
    else:
        instructions, reasons = _optional_texts(batch, cfg.prompt_field)
        inputs = [""] * len(instructions)
    responses, response_reasons = _optional_texts(batch, cfg.output_field if layout == "alpaca" else cfg.response_field)
    reasons = [
        reason or problem or ("" if response.strip() else EMPTY_RESPONSE)
        for reason, problem, response in zip(reasons, response_reasons, responses, strict=True)
    ]
    return (*_templated(cfg, tokenizer, instructions, inputs, responses), reasons)


def _optional_texts(batch: dict[str, list[Any]], column: str) -> tuple[list[str], list[str]]:
    """A column's text ("" for a missing column or value) and WRONG_TYPE for a value that is not text."""
    values = batch.get(column) or [None] * len(next(iter(batch.values())))
    reasons = [WRONG_TYPE if value is not None and not isinstance(value, str) else "" for value in values]
    return [value if isinstance(value, str) else "" for value in values], reasons


def _marked_texts(cfg: DataConfig, batch: dict[str, list[Any]]) -> tuple[list[str], list[str], list[str]]:
    """One text column: all of it is the response, or, with `response_marker`, what follows the last marker."""
    texts, reasons = _texts(batch, cfg.text_columns, cfg.text_separator)
    marker = cfg.response_marker
    if marker is None:
        return [""] * len(texts), texts, reasons
    prompts, responses = [], []
    for index, text in enumerate(texts):
        found = text.rfind(marker)
        cut = found + len(marker) if found >= 0 else len(text)
        prompts.append(text[:cut])
        responses.append(text[cut:])
        if not reasons[index]:
            reasons[index] = NO_MARKER if found < 0 else "" if text[cut:].strip() else EMPTY_RESPONSE
    return prompts, responses, reasons


def _label_word_texts(cfg: DataConfig, batch: dict[str, list[Any]]) -> tuple[list[str], list[str], list[str]]:
    """Classification rows as prompts (`label_prompt` around the text) answered by their label's word."""
    texts, reasons = _texts(batch, cfg.text_columns, cfg.text_separator)
    values = batch.get(cfg.label_field) or [None] * len(texts)
    table = label_word_table(cfg, values)
    listed = ", ".join(table.values())
    prompts = [cfg.label_prompt.format(text=text, labels=listed) for text in texts]
    words = ["" if _is_missing(value) else table.get(str(value), "") for value in values]
    for index, value in enumerate(values):
        reasons[index] = reasons[index] or (MISSING_LABEL if _is_missing(value) else "")
    return prompts, words, reasons


def label_word_table(cfg: DataConfig, values: list[Any]) -> dict[str, str]:
    """Each label (as text) and its word: `data.label_words` as given, or, when it is true, the labels among
    `values` as their own words (sorted)."""
    if isinstance(cfg.label_words, dict):
        return dict(cfg.label_words)
    labels = sorted({str(value) for value in values if not _is_missing(value)})
    return {label: label for label in labels}


LABEL_WORD_NEW_TOKENS = 8
"""Label-word runs answer in a word: tokens allowed beyond the longest word's before an answer is cut."""


def label_word_new_tokens(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """How many tokens a label-word answer may take: the longest word's and `LABEL_WORD_NEW_TOKENS` more."""
    words = label_word_table(cfg, []).values()
    return max(len(tokenizer(word, add_special_tokens=False)["input_ids"]) for word in words) + LABEL_WORD_NEW_TOKENS


def example_parts(cfg: DataConfig, row: dict[str, Any]) -> tuple[str, str]:
    """What a causal example asks, as a person reads it (the text, instruction and input, or prompt), and the
    answer it holds (its label word, output or response; "" when it has none)."""
    text = cfg.text_separator.join(str(row[column]) for column in cfg.text_columns if row.get(column))
    if cfg.label_words:
        label = row.get(cfg.label_field)
        return text, "" if _is_missing(label) else label_word_table(cfg, [label]).get(str(label), "")
    if cfg.instruction_field in row:
        asked, extra = str(row[cfg.instruction_field] or ""), str(row.get(cfg.input_field) or "")
        return (f"{asked}\n\n{extra}" if extra.strip() else asked), str(row.get(cfg.output_field) or "")
    if cfg.prompt_field in row:
        return str(row[cfg.prompt_field] or ""), str(row.get(cfg.response_field) or "")
    marker = cfg.response_marker
    cut = text.rfind(marker) + len(marker) if marker and marker in text else len(text)
    return text[:cut], text[cut:]


def prompt_row(cfg: DataConfig, prompt: str) -> dict[str, Any]:
    """A row asking `prompt`: the text of a label-word run, an instruction otherwise (rendered by `render_prompt`)."""
    return {cfg.text_columns[0] if cfg.label_words else cfg.instruction_field: prompt}


def split_rows(cfg: DataConfig, encoded: EncodedData, role: str) -> list[dict[str, Any]]:
    """The rows of an encoded split that train, as read from their file, in the split's order (to generate from)."""
    split = encoded.splits[role]
    kept = [
        row for row, reason in zip(column_values(split, ROW), column_values(split, DROPPED), strict=True) if not reason
    ]
    if role == "train" or (role == "validation" and encoded.carved):
        table = read_data(cfg, cfg.train, "train")
    else:
        table = _read_extra_split(role, cfg.validation if role == "validation" else str(cfg.test), cfg)
    return table.select(kept).to_list() if kept else []


def resolve_label_words(cfg: DataConfig) -> DataConfig:
    """`cfg` with `label_words = true` replaced by its table: the string labels of the train data, sorted, as
    their own words (so that every prompt lists the same words, and the run's config.toml records them)."""
    if cfg.label_words is not True:
        return cfg
    values = column_values(_in_role("train", lambda: read_data(cfg, cfg.train, "train")), cfg.label_field)
    if any(not isinstance(value, str) for value in values if not _is_missing(value)):
        raise DataError(
            "data.label_words = true takes the labels of data.train as the words, but they are not text; "
            'give a table, e.g. data.label_words = {0 = "negative", 1 = "positive"}'
        )
    return cfg.model_copy(update={"label_words": label_word_table(cfg, values)})


def check_label_words(cfg: DataConfig, role: str, values: list[Any]) -> None:
    """Every label of a split has a word (a DataError naming the first that has none)."""
    table = label_word_table(cfg, values)
    for value in values:
        if not _is_missing(value) and str(value) not in table:
            raise DataError(
                f"data.label_words: no word for label {value!r} of {role} (words for: {', '.join(table)}); "
                "give every label a word"
            )


def _templated(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    instructions: list[str],
    inputs: list[str],
    responses: list[str],
) -> tuple[list[str], list[str]]:
    """Prompts (and responses) through `data.template`: Alpaca's prompt (a prompt column is its instruction),
    the tokenizer's chat template, or, for none, the instruction and input followed by `text_separator`."""
    if cfg.template == "alpaca":
        prompts = [
            ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
            if extra.strip()
            else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
            for instruction, extra in zip(instructions, inputs, strict=True)
        ]
        return prompts, responses
    pairs = zip(instructions, inputs, strict=True)
    users = [f"{instruction}\n\n{extra}" if extra.strip() else instruction for instruction, extra in pairs]
    if cfg.template == "chat":
        return _chat_split(tokenizer, users, responses)
    return [f"{user}{cfg.text_separator}" if user else "" for user in users], responses


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
        if not content:
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


def _causal_encoder(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, max_length: int, layout: str) -> Encoder:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token, which causal training appends to every response")
    chat = cfg.template == "chat"
    if chat and not getattr(tokenizer, "chat_template", None):
        raise DataError('data.template chat: this tokenizer has no chat template; use data.template = "alpaca"')
    eos = tokenizer.eos_token_id
    prefix = _special_prefix(cfg, tokenizer)

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        prompts, responses, reasons = _rendered(cfg, tokenizer, layout, batch)
        plain = {"add_special_tokens": False, "return_attention_mask": False, "return_token_type_ids": False}
        prompt_ids = tokenizer(prompts, **plain)["input_ids"]
        response_ids = tokenizer(responses, **plain)["input_ids"]
        ids, labels, lengths = [], [], []
        for index, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
            leading = _unless_present(prefix, [*prompt, *response])
            masked = len(leading) + len(prompt)
            # no second eos: chat templates end the turn themselves, marked-up text may carry </s>
            has_eos = eos in response if chat else response[-1:] == [eos]
            whole = [*leading, *prompt, *response, *([] if has_eos else [eos])]
            if not reasons[index] and masked >= max_length:
                reasons[index] = TRUNCATED_AWAY
            kept = whole[:max_length]
            ids.append(kept)
            labels.append([] if reasons[index] else [IGNORE_INDEX] * masked + kept[masked:])
            lengths.append(0 if reasons[index] and reasons[index] != TRUNCATED_AWAY else len(whole))
        return _encoded(batch, ids, labels, lengths, reasons)

    return encode


def _leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a text (Llama's <s>, BERT's [CLS], none for GPT-2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(wrapped) - len(plain) + 1):
        if wrapped[start : start + len(plain)] == plain:
            return wrapped[:start]
    return []
