"""Know the data before training: the report `finetui data` prints, the setup screen shows and `run` is gated by.

Everything here is computed from `engine.data.encode_data`, which reads, renders and tokenises every row exactly
as training does (same reading settings, template, tokenizer, truncation and loss mask) and says why each
left-out row is left out; only the tokenizer is loaded, never the model's weights. From it: rows per split and
the reasons rows are dropped, the label distribution with the majority-class baseline, token lengths against
`data.max_length`, one causal example with the tokens that carry the loss, duplicates within train and rows
shared between train and validation or test.

`check_data` is the run's gate: it refuses data that cannot train honestly (no rows left, every response
truncated away, more evaluation rows shared with train than `data.max_leak` allows) with one line naming the
fix, and returns the lesser findings as warnings.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from transformers import PreTrainedTokenizerBase

from engine import models
from engine.config import DataConfig, RunConfig
from engine.data import (
    DROPPED,
    EMPTY_RESPONSE,
    EMPTY_TEXT,
    LENGTH,
    MISSING_LABEL,
    NO_MARKER,
    ROW,
    TRUNCATED_AWAY,
    UNKNOWN_LABEL,
    UNSEEN_LABEL,
    WRONG_TYPE,
    DataError,
    EncodedData,
    column_values,
    encode_data,
)
from engine.library_logs import quiet_library_output

ROLES = ("train", "validation", "test")
PERCENTILES = (50, 90, 95, 99)
SHOWN_ROWS = 5  # row numbers listed per reason
IMBALANCE_RATIO = 3.0  # largest class over smallest class in train from which a warning is given
HISTOGRAM_BINS = 8  # bins up to max_length (and up to 4 more beyond it)
BAR_WIDTH = 24
SHOWN_LABELS = 12  # label rows printed (the largest classes)
# what to look at when rows are left out for a reason, and the field a warning about it sits beside
FIX_OF_REASON = {
    EMPTY_TEXT: ("data.text_field", "check data.text_field names the text column"),
    MISSING_LABEL: ("data.label_field", "fill the labels or check data.label_field"),
    UNKNOWN_LABEL: ("data.label_field", "labels outside the classes: check data.label_field"),
    UNSEEN_LABEL: (
        "data.label_field",
        "its labels must occur in train (an unlabelled split? GLUE test splits have label -1)",
    ),
    WRONG_TYPE: ("data.text_field", "a column holds values of the wrong type: check the data.*_field columns"),
    EMPTY_RESPONSE: ("data.output_field", "check the response column (data.output_field, data.response_field)"),
    NO_MARKER: ("data.response_marker", "check data.response_marker occurs in the text"),
    TRUNCATED_AWAY: ("data.max_length", "raise data.max_length"),
}


@dataclass(frozen=True)
class Finding:
    """One thing the report found: the config key it concerns, one line for people, and whether `run` refuses."""

    field: str
    message: str
    blocking: bool = False


@dataclass
class SplitReport:
    """One split: its rows, the rows left out and why, its labels and its token lengths (before truncation)."""

    role: str
    rows: int
    kept: int
    dropped: dict[str, dict[str, Any]]
    """reason -> {"count": rows, "rows": the first row numbers (1-based, in the file the rows came from)}"""
    labels: dict[str, int] | None
    lengths: np.ndarray
    """Untruncated token lengths of the rows that were tokenised (kept, or causal rows truncated away)."""
    truncated: int
    tokens_lost: int
    response_cut: int | None

    @property
    def dropped_count(self) -> int:
        return self.rows - self.kept

    def percentiles(self) -> dict[str, int] | None:
        """The token length that keeps p % of the examples whole (p = 50, 90, 95, 99) and the longest."""
        if not len(self.lengths):
            return None
        values = np.quantile(self.lengths, [p / 100 for p in PERCENTILES], method="inverted_cdf")
        return {**{str(p): int(v) for p, v in zip(PERCENTILES, values, strict=True)}, "max": int(self.lengths.max())}

    def share(self, count: int | None) -> float | None:
        return None if count is None else (count / len(self.lengths) if len(self.lengths) else 0.0)


@dataclass
class DataReport:
    """What a run's data holds, as training will see it (`build_report`)."""

    model: str
    task: str
    max_length: int
    columns: list[str]
    fields: dict[str, Any]
    label_names: list[str] | None
    carved: bool
    splits: dict[str, SplitReport]
    duplicates: dict[str, Any]
    leaked: dict[str, dict[str, Any]]
    removed: dict[str, list[int]]
    example: list[tuple[str, bool]] | None
    """One causal training example as (text, carries the loss) pieces, decoded from its token ids."""
    findings: list[Finding] = field(default_factory=list)

    @property
    def error(self) -> str | None:
        """Why `run` would refuse this data (the first blocking finding), or None."""
        return next((finding.message for finding in self.findings if finding.blocking), None)

    @property
    def warnings(self) -> list[str]:
        return [finding.message for finding in self.findings if not finding.blocking]

    def baseline(self, role: str) -> float | None:
        """Accuracy on a split of always answering train's most frequent class: what a trained model must beat."""
        train, split = self.splits["train"].labels, self.splits[role].labels
        if not train or not split or not sum(split.values()):
            return None
        majority = max(train, key=lambda name: train[name])
        return split.get(majority, 0) / sum(split.values())

    def to_dict(self) -> dict[str, Any]:
        """The `--json` form; the keys the issue names (rows, dropped, labels, truncated, length_percentiles,
        duplicates, leaked) are a contract."""
        result: dict[str, Any] = {
            "model": self.model,
            "task": self.task,
            "max_length": self.max_length,
            "columns": self.columns,
            "fields": self.fields,
            "label_names": self.label_names,
            "carved_validation": self.carved,
        }
        for role in ROLES:
            split = self.splits.get(role)
            result[role] = None if split is None else self._split_dict(split)
        result["duplicates"] = self.duplicates
        result["leaked"] = {role: self.leaked[role]["count"] if role in self.leaked else None for role in ROLES[1:]}
        result["removed"] = {reason: len(rows) for reason, rows in self.removed.items()}
        result["example"] = (
            None if self.example is None else [{"text": text, "loss": loss} for text, loss in self.example]
        )
        result["warnings"] = self.warnings
        result["error"] = self.error
        return result

    def _split_dict(self, split: SplitReport) -> dict[str, Any]:
        return {
            "rows": split.rows,
            "dropped": {"count": split.dropped_count, "reasons": split.dropped},
            "labels": split.labels,
            "baseline_accuracy": self.baseline(split.role),
            "truncated": split.share(split.truncated),
            "tokens_lost": split.tokens_lost,
            "response_cut": split.share(split.response_cut),
            "length_percentiles": split.percentiles(),
        }


def build_report(config: RunConfig) -> DataReport:
    """The report of a run config's data: the same resolution as `run` (task, tokenizer, fields, seed), no weights.

    The encoded rows come from (and go into) the run's tokenisation cache, so `finetui data` before `finetui run`
    tokenises once.
    """
    quiet_library_output()
    task = models.resolve_task(config.model)
    tokenizer = models.load_tokenizer(config.model)
    encoded = encode_data(config.data, task=task, tokenizer=tokenizer, seed=config.train.seed, cache=True)
    return report_of(config.data, encoded, tokenizer, model=config.model.id)


def report_of(
    cfg: DataConfig, encoded: EncodedData, tokenizer: PreTrainedTokenizerBase | None = None, *, model: str = ""
) -> DataReport:
    """The report of encoded data; the causal example needs the tokenizer (to decode it)."""
    splits = {role: _split_report(role, split, encoded) for role, split in encoded.splits.items()}
    report = DataReport(
        model=model,
        task=encoded.task,
        max_length=encoded.max_length,
        columns=encoded.columns,
        fields=encoded.fields,
        label_names=encoded.label_names,
        carved=encoded.carved,
        splits=splits,
        duplicates=encoded.duplicates,
        leaked=encoded.leaked,
        removed=encoded.removed,
        example=_example(encoded, tokenizer) if encoded.task == "causal" and tokenizer is not None else None,
    )
    report.findings = _findings(cfg, encoded, report)
    return report


def check_data(cfg: DataConfig, encoded: EncodedData, *, refuse: bool = True) -> list[str]:
    """The run's gate: raise a one-line DataError naming the fix when the data cannot train honestly (no rows
    left in a split, every causal response truncated away, more of validation or test shared with train than
    `data.max_leak`); otherwise return the lesser findings, one line each.

    `refuse=False` (a resumed run, which already trained on this data and cannot change its data settings):
    the refusal becomes the first finding."""
    report = report_of(cfg, encoded)
    if report.error is not None and refuse:
        raise DataError(report.error)
    return [report.error, *report.warnings] if report.error is not None else report.warnings


def _split_report(role: str, split: datasets.Dataset, encoded: EncodedData) -> SplitReport:
    names = [ROW, DROPPED, LENGTH, *(["labels"] if encoded.task == "classification" else [])]
    columns = split.select_columns(names).with_format("numpy")[:]
    reasons = np.asarray(columns[DROPPED], dtype=object)
    rows = np.asarray(columns[ROW])
    lengths_all = np.asarray(columns[LENGTH])
    kept = reasons == ""
    measured = kept | (reasons == TRUNCATED_AWAY)
    lengths = lengths_all[measured]
    dropped: dict[str, dict[str, Any]] = {}
    for reason, count in Counter(reasons[~kept]).most_common():
        first = np.sort(rows[reasons == reason])[:SHOWN_ROWS] + 1
        dropped[reason] = {"count": int(count), "rows": first.tolist()}
    labels = None
    if encoded.task == "classification":
        names = encoded.label_names or [str(index) for index in range(encoded.num_labels or 0)]
        counts = np.bincount(np.asarray(columns["labels"])[kept], minlength=len(names))
        labels = {name: int(count) for name, count in zip(names, counts, strict=True)}
    over = lengths[lengths > encoded.max_length]
    return SplitReport(
        role=role,
        rows=len(split),
        kept=int(kept.sum()),
        dropped=dropped,
        labels=labels,
        lengths=lengths,
        truncated=len(over),
        tokens_lost=int((over - encoded.max_length).sum()),
        response_cut=int((reasons == TRUNCATED_AWAY).sum()) if encoded.task == "causal" else None,
    )


def _example(encoded: EncodedData, tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]] | None:
    """The kept train row that comes first in the file, decoded in runs of tokens with and without loss."""
    split = encoded.splits["train"]
    reasons = np.asarray(column_values(split, DROPPED), dtype=object)
    kept = np.flatnonzero(reasons == "")
    if not len(kept):
        return None
    rows = np.asarray(column_values(split, ROW))
    index = int(kept[np.argmin(rows[kept])])
    ids, labels = split[index]["input_ids"], split[index]["labels"]
    pieces: list[tuple[str, bool]] = []
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (labels[end] >= 0) != (labels[start] >= 0):
            pieces.append((tokenizer.decode(ids[start:end]), labels[start] >= 0))
            start = end
    return pieces


def _findings(cfg: DataConfig, encoded: EncodedData, report: DataReport) -> list[Finding]:
    found = [Finding(note["field"], note["message"]) for note in encoded.notes]
    for split in report.splits.values():
        found.extend(_row_findings(split, encoded))
    found.extend(_overlap_findings(cfg, report))
    train = report.splits["train"]
    if train.truncated:
        found.append(_truncation_finding(train, encoded.max_length))
    if train.labels:
        found.extend(_imbalance_findings(report))
    return sorted(found, key=lambda finding: not finding.blocking)


def _reasons_text(split: SplitReport) -> str:
    return "; ".join(f"{info['count']:,} {reason} ({row_numbers(info)})" for reason, info in split.dropped.items())


def row_numbers(info: dict[str, Any]) -> str:
    """`row 3` or `rows 1, 2, 5, ...` from {"count": n, "rows": the first row numbers}."""
    shown = ", ".join(map(str, info["rows"])) + (", ..." if info["count"] > len(info["rows"]) else "")
    return f"row{'s' if info['count'] > 1 else ''} {shown}"


def _row_findings(split: SplitReport, encoded: EncodedData) -> list[Finding]:
    if not split.dropped:
        return []
    main = next(iter(split.dropped))
    field_key, fix = FIX_OF_REASON[main]
    if main == EMPTY_RESPONSE and "response_field" in encoded.fields:
        field_key = "data.response_field"
    if split.kept:
        message = f"data.{split.role}: {split.dropped_count:,} of {split.rows:,} rows left out: {_reasons_text(split)}"
        return [Finding(field_key, message)]
    if main == TRUNCATED_AWAY:
        keeps = _whole_length(split, 95)
        message = (
            f"data.{split.role}: every response is truncated away: the prompts fill max_length {encoded.max_length}; "
            f"raise data.max_length ({keeps} keeps 95 % of the examples whole)"
        )
        return [Finding("data.max_length", message, blocking=True)]
    message = f"data.{split.role}: no rows remain of {split.rows:,}: {_reasons_text(split)}; {fix}"
    return [Finding(field_key, message, blocking=True)]


def _whole_length(split: SplitReport, percent: int) -> int | None:
    percentiles = split.percentiles()
    return None if percentiles is None else percentiles[str(percent)]


def _overlap_findings(cfg: DataConfig, report: DataReport) -> list[Finding]:
    found = []
    removed = sum(len(rows) for rows in report.removed.values())
    if removed:
        parts = ", ".join(f"{len(rows):,} {reason}" for reason, rows in report.removed.items())
        found.append(Finding("data.train", f"data.dedupe: removed {removed:,} train rows ({parts})"))
    repeats = report.duplicates["normalised"]
    if repeats and not cfg.dedupe:
        found.append(
            Finding(
                "data.train",
                f"data.train: {repeats:,} rows repeat an earlier row ({report.duplicates['exact']:,} exactly); "
                "data.dedupe = true drops them",
            )
        )
    for role, leak in report.leaked.items():
        rows = report.splits[role].rows
        if not leak["count"]:
            continue
        share = leak["count"] / rows
        carved = " (carved from train: train repeats these rows)" if role == "validation" and report.carved else ""
        text = (
            f"data.{role}: {leak['count']:,} of {rows:,} rows ({share:.1%}) also occur in train{carved} "
            f"({row_numbers(leak)})"
        )
        if share > cfg.max_leak:
            allow = f"{math.ceil(share * 1000) / 1000:g}"
            fix = f"set data.dedupe = true to drop them from train, or data.max_leak = {allow} to allow it"
            found.append(Finding(f"data.{role}", f"{text}; {fix}", blocking=True))
        else:
            found.append(Finding(f"data.{role}", f"{text}, within data.max_leak {cfg.max_leak:g}"))
    return found


def _truncation_finding(train: SplitReport, max_length: int) -> Finding:
    share = train.share(train.truncated) or 0.0
    keeps = f"95 % fit in {_whole_length(train, 95)} tokens, 99 % in {_whole_length(train, 99)}"
    cut = "responses cut short" if train.response_cut is not None else "text cut off"
    return Finding(
        "data.max_length",
        f"data.train: {train.truncated:,} example{'s' if train.truncated > 1 else ''} ({share:.1%}) "
        f"{'are' if train.truncated > 1 else 'is'} longer than max_length {max_length} "
        f"({train.tokens_lost:,} tokens of {cut}); {keeps}",
    )


def _imbalance_findings(report: DataReport) -> list[Finding]:
    labels = report.splits["train"].labels or {}
    present = {name: count for name, count in labels.items() if count}
    if len(present) < 2:
        return []
    largest = max(present, key=lambda name: present[name])
    smallest = min(present, key=lambda name: present[name])
    ratio = present[largest] / present[smallest]
    if ratio < IMBALANCE_RATIO:
        return []
    role = "validation" if "validation" in report.splits else "train"
    baseline = report.baseline(role)
    return [
        Finding(
            "data.label_field",
            f"data.train: labels are imbalanced ({largest!r} {present[largest]:,} rows, {smallest!r} "
            f"{present[smallest]:,}: {ratio:.0f}:1); always answering {largest!r} scores "
            f"{(baseline or 0):.1%} on {role}: compare F1, not only accuracy",
        )
    ]


# the report as text (`finetui data`)


def length_histogram(lengths: np.ndarray, max_length: int) -> list[tuple[str, int, bool]]:
    """Token-length bins as (label, rows, beyond max_length): `HISTOGRAM_BINS` up to max_length and, when examples
    are longer, up to 4 more (at least as wide) up to the longest."""
    bounds = [round(max_length * index / HISTOGRAM_BINS) for index in range(HISTOGRAM_BINS + 1)]
    longest = int(lengths.max()) if len(lengths) else 0
    if longest > max_length:
        width = max(math.ceil(max_length / HISTOGRAM_BINS), math.ceil((longest - max_length) / 4))
        bounds += [*range(max_length + width, longest, width), longest]
    return [
        (
            f"{low + 1}-{high}" if high > low + 1 else f"{high}",
            int(((lengths > low) & (lengths <= high)).sum()),
            high > max_length,
        )
        for low, high in itertools.pairwise(bounds)
    ]


def render_report(report: DataReport) -> RenderableType:
    """The report as Rich renderables that fit 80 columns."""
    parts: list[RenderableType] = [
        Text.from_markup(
            f"[bold]{report.model}[/] · {report.task} · max_length {report.max_length} · tokenizer only (no weights)"
        ),
        Text(f"columns: {', '.join(report.columns)}"),
        Text("fields: " + ", ".join(f"{key} = {_shown(value)}" for key, value in report.fields.items())),
        _rows_table(report),
    ]
    if report.task == "classification":
        parts.append(_labels(report))
    parts.append(_lengths(report))
    if report.example is not None:
        parts.append(_example_text(report))
    parts.append(_overlap_text(report))
    if report.findings:
        lines = Text()
        for finding in report.findings:
            style = "bold red" if finding.blocking else "yellow"
            lines.append(f"{'refused' if finding.blocking else 'warning'}: ", style=style)
            lines.append(f"{finding.message}\n")
        parts.append(lines)
    return Group(*parts)


def _shown(value: Any) -> str:
    return ", ".join(value) if isinstance(value, list) else str(value)


def _rows_table(report: DataReport) -> Table:
    table = Table(title="rows", title_justify="left", box=None, padding=(0, 1))
    for name, justify in (("split", "left"), ("rows", "right"), ("kept", "right"), ("left out", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for role, split in report.splits.items():
        name = f"{role} (carved)" if role == "validation" and report.carved else role
        reasons = ", ".join(f"{info['count']:,} {reason}" for reason, info in split.dropped.items())
        table.add_row(name, f"{split.rows:,}", f"{split.kept:,}", reasons or "-")
    return table


def _labels(report: DataReport) -> RenderableType:
    train = report.splits["train"].labels or {}
    total = sum(train.values()) or 1
    largest = max(train.values(), default=0) or 1
    table = Table(title="labels (kept rows)", title_justify="left", box=None, padding=(0, 1))
    table.add_column("label")
    table.add_column("train", justify="right")
    table.add_column("", width=BAR_WIDTH // 2)
    others = [role for role in report.splits if role != "train"]
    for role in others:
        table.add_column(role, justify="right")
    shown = sorted(train, key=lambda name: -train[name])[:SHOWN_LABELS] if len(train) > SHOWN_LABELS else list(train)
    for name in shown:
        count = train[name]
        bar = "█" * max(1 if count else 0, round(BAR_WIDTH // 2 * count / largest))
        counts = [f"{(report.splits[role].labels or {}).get(name, 0):,}" for role in others]
        table.add_row(name, f"{count:,} {count / total:5.1%}", Text(bar, style="cyan"), *counts)
    lines: list[RenderableType] = [table]
    if len(train) > len(shown):
        lines.append(Text(f" ... {len(train) - len(shown)} more labels (the largest {SHOWN_LABELS} are shown)"))
    baselines = [(role, report.baseline(role)) for role in others]
    if train and any(value is not None for _, value in baselines):
        majority = max(train, key=lambda name: train[name])
        scores = ", ".join(f"{value:.1%} on {role}" for role, value in baselines if value is not None)
        lines.append(Text(f"majority-class baseline (always {majority!r}): {scores}; a trained model must beat it"))
    return Group(*lines)


def _lengths(report: DataReport) -> RenderableType:
    train = report.splits["train"]
    percentiles = train.percentiles()
    if percentiles is None:
        return Text("token lengths: no rows to measure")
    summary = " · ".join(f"p{key} {value}" if key != "max" else f"max {value}" for key, value in percentiles.items())
    share = train.share(train.truncated) or 0.0
    over = f"{train.truncated:,} ({share:.1%}) longer than" if train.truncated else "none longer than"
    lines = [
        Text(f"token lengths (train, before truncation): {summary}", style="bold"),
        Text(
            f"{over} max_length {report.max_length} ({train.tokens_lost:,} tokens lost); "
            f"whole at 95 %: {percentiles['95']}, at 99 %: {percentiles['99']}"
        ),
    ]
    if train.response_cut is not None:
        cut = train.share(train.response_cut) or 0.0
        lines.append(Text(f"responses cut off entirely (zero loss tokens): {train.response_cut:,} ({cut:.1%})"))
    bins = _merged_empty_bins(length_histogram(train.lengths, report.max_length))
    largest = max(count for _, count, _ in bins) or 1
    width = max(len(label) for label, _, _ in bins)
    for index, (label, count, beyond) in enumerate(bins):
        if beyond and not bins[index - 1][2]:
            lines.append(Text(f"{'':>{width}} ┄┄ max_length {report.max_length} ┄┄", style="red"))
        bar = "█" * round(BAR_WIDTH * 2 * count / largest) or ("▏" if count else "")
        lines.append(Text.assemble(f"{label:>{width}} ", (bar, "red" if beyond else "green"), f" {count:,}"))
    return Group(*lines)


def _merged_empty_bins(bins: list[tuple[str, int, bool]]) -> list[tuple[str, int, bool]]:
    """Runs of empty bins on the same side of max_length as one bin (`25-256 0`)."""
    merged: list[tuple[str, int, bool]] = []
    for label, count, beyond in bins:
        if merged and not count and not merged[-1][1] and merged[-1][2] == beyond and "-" in label:
            merged[-1] = (f"{merged[-1][0].split('-')[0]}-{label.split('-')[1]}", 0, beyond)
        else:
            merged.append((label, count, beyond))
    return merged


def _example_text(report: DataReport) -> RenderableType:
    assert report.example is not None
    body = Text()
    for text, loss in report.example:
        body.append(text, style="bold green underline" if loss else "dim")
    return Group(Text("one train example as training sees it (loss tokens in green, underlined):", style="bold"), body)


def _overlap_text(report: DataReport) -> Text:
    duplicates = report.duplicates
    text = Text(f"duplicates within train: {duplicates['normalised']:,} (exact {duplicates['exact']:,})")
    text.append("\nrows shared with train: ")
    text.append(", ".join(f"{role} {leak['count']:,}" for role, leak in report.leaked.items()) or "-")
    for example in duplicates["examples"]:
        rows = " and ".join(map(str, example["rows"]))
        text.append(f"\n  train rows {rows}: {example['text']}")
    for role, leak in report.leaked.items():
        for row, example in zip(leak["rows"], leak["examples"], strict=False):
            text.append(f"\n  {role} row {row} is in train: {example}")
    return text
