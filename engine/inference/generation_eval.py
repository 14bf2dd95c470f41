"""`finetui eval --generate`: judge a causal run by what it generates, not by its loss.

Each row's prompt is rendered as training rendered it and answered through the one generation core (batched,
left-padded, greedy unless asked otherwise: `engine.inference.predict.answer`); each answer is scored against the
row's reference with a metric of `engine.generation_metrics`. A run trained with `data.label_words` answers with
a label word: its reference is the row's label word, and it is scored as a classifier is (accuracy and macro-F1
over the words, answers outside them counted and wrong). `--base` answers the same prompts with the base model.
The data is checked before the model loads (`check_request`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import data as data_lib
from engine import generation_metrics as gm
from engine.config import ConfigError, DataConfig, RunConfig
from engine.fsio import write_atomic
from engine.inference.loading import LoadedRun
from engine.inference.predict import answer
from engine.sampling import GenerationSettings

EVALUATIONS_DIR = "evaluations"
WORST_ROWS = 5


@dataclass(frozen=True)
class Request:
    """The rows to judge and how: the data's rows, their references, the metric, the label words (if any)."""

    rows: list[dict[str, Any]]
    references: list[str]
    metric: str
    words: list[str] | None
    """The label words of a label-word run (None otherwise)."""


def check_request(config: RunConfig, source: str, metric: str | None) -> Request:
    """What `eval --generate` finds wrong in the data file, before the model loads (`checks.check_generate_eval`
    has checked the command line and the run)."""
    cfg = config.data
    rows = data_lib.read_data(cfg, source).to_list()
    if not rows:
        raise ConfigError(f"--data {source}: holds no rows")
    try:
        column = _reference_column(cfg, rows[0])
    except ConfigError as exc:
        raise ConfigError(f"--data {source}: {exc}") from None
    if column not in rows[0]:
        raise ConfigError(
            f"--data {source}: no column {column!r} to compare the answers with (columns: {', '.join(rows[0])}); "
            "give a file laid out like the run's training data"
        )
    if cfg.label_words:
        return _label_word_request(cfg, source, rows, metric)
    references = [data_lib.example_parts(cfg, row)[1] for row in rows]
    return Request(rows, references, metric or gm.default_metric(references), None)


def _reference_column(cfg: DataConfig, row: dict[str, Any]) -> str:
    """The column holding each row's reference answer."""
    if cfg.label_words:
        return cfg.label_field
    if cfg.template == "none" and all(column in row for column in cfg.text_columns):
        if cfg.response_marker is not None:
            return cfg.text_columns[0]  # the reference is the text after the marker
        raise ConfigError(
            "--generate: the run trained on plain text (template none, no response_marker): its rows hold no "
            "reference answer to compare with; use finetui eval without --generate for loss and perplexity"
        )
    if cfg.instruction_field in row:
        return cfg.output_field
    if cfg.prompt_field in row:
        return cfg.response_field
    raise ConfigError(
        f"no column {cfg.instruction_field!r} or {cfg.prompt_field!r} to answer (columns: {', '.join(row)}); "
        "give a file laid out like the run's training data"
    )


def _label_word_request(cfg: DataConfig, source: str, rows: list[dict[str, Any]], metric: str | None) -> Request:
    values = [row.get(cfg.label_field) for row in rows]
    data_lib.check_label_words(cfg, f"--data {source}", values)
    table = data_lib.label_word_table(cfg, values)
    missing = next((number for number, value in enumerate(values, start=1) if value is None), None)
    if missing is not None:
        raise ConfigError(f"--data {source}: row {missing} has no label to compare the answer with; fix or drop it")
    return Request(rows, [table[str(value)] for value in values], metric or "exact", list(table.values()))


@dataclass(frozen=True)
class Judged:
    """One model's answers to the request's rows, scored."""

    model: str
    outputs: list[str]
    scored: gm.Scored
    labels: gm.LabelScores | None
    elapsed_s: float

    def summary(self) -> dict[str, Any]:
        """The `--json` keys: metric, score and rows (label-word runs: accuracy and f1 too)."""
        keys: dict[str, Any] = {"metric": self.scored.metric, "score": self.scored.score, "rows": self.scored.rows}
        if self.labels is not None:
            keys.update(accuracy=self.labels.accuracy, f1=self.labels.f1)
        return keys

    def record(self) -> dict[str, Any]:
        """The summary with the interval, the answers outside the label set, and the time taken (result.json)."""
        interval = self.scored.interval
        extra: dict[str, Any] = {"interval": [interval.low, interval.high], "interval_method": interval.method}
        if self.labels is not None:
            extra["outside_label_set"] = self.labels.outside
        return {**self.summary(), **extra, "seconds": self.elapsed_s, "rows_per_second": self.rows_per_second}

    @property
    def rows_per_second(self) -> float:
        return self.scored.rows / self.elapsed_s if self.elapsed_s > 0 else 0.0


def judge(
    loaded: LoadedRun, request: Request, settings: GenerationSettings, *, base: bool = False, batch_size: int = 16
) -> Judged:
    """Generate an answer to every row (batched) with the fine-tuned model, or the base one, and score it."""
    started = time.perf_counter()
    answers = answer(loaded, request.rows, settings, base=base, batch_size=batch_size)
    elapsed = time.perf_counter() - started
    outputs = [reply.text.strip() for reply in answers]
    scored = gm.score_answers(request.metric, outputs, request.references)
    labels = gm.label_scores(outputs, request.references, request.words) if request.words else None
    return Judged("base" if base else "fine-tuned", outputs, scored, labels, elapsed)


def label_word_settings(loaded: LoadedRun, settings: GenerationSettings) -> GenerationSettings:
    """Settings for a label-word run when --max-new-tokens was not given: an answer is a word (an answer in other
    words is wrong anyway), so it may take the longest word's tokens and a few more."""
    new_tokens = data_lib.label_word_new_tokens(loaded.config.data, loaded.tokenizer)
    return settings.model_copy(update={"max_new_tokens": new_tokens})


def prediction_records(loaded: LoadedRun, request: Request, judged: list[Judged]) -> list[dict[str, Any]]:
    """One record per row: its number, prompt, reference, and each model's output and score."""
    cfg = loaded.config.data
    records = []
    for index, (row, reference) in enumerate(zip(request.rows, request.references, strict=True)):
        prompt = data_lib.example_parts(cfg, row)[0]
        record: dict[str, Any] = {"row": index + 1, "prompt": prompt, "reference": reference}
        for result in judged:
            prefix = "" if result is judged[0] else "base_"
            record[f"{prefix}output"] = result.outputs[index]
            record[f"{prefix}score"] = result.scored.scores[index]
        records.append(record)
    return records


def worst_rows(records: list[dict[str, Any]], count: int = WORST_ROWS) -> list[dict[str, Any]]:
    """The rows the fine-tuned model scored lowest (first in the file among equals)."""
    return sorted(records, key=lambda record: record["score"])[:count]


def save_evaluation(run_dir: Path, source: str, records: list[dict[str, Any]], result: dict[str, Any]) -> Path:
    """`predictions.jsonl` and `result.json` in a new folder `evaluations/<data file>-<time>/` of the run."""
    stem = Path(source).name.split(".")[0] or "data"
    folder = run_dir / EVALUATIONS_DIR / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = folder.with_name(f"{folder.name.rsplit('~', 1)[0]}~{suffix}")
    folder.mkdir(parents=True)
    write_atomic(folder / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_atomic(folder / "result.json", json.dumps(result, indent=2) + "\n")
    return folder / "predictions.jsonl"
