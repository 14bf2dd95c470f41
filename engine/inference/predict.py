"""Answers from a loaded run: generated text for causal LMs, label probabilities for classifiers, base or fine-tuned.

What `finetui generate` and `chat` and the TUI's try screen ask of a run. A user's prompt becomes a row in the
layout of the run's training data (instruction, prompt or text column) and is rendered exactly as training
rendered it (`engine.data.prompt_token_ids`); generation is `engine.generation`. Classifiers give a softmax over
their labels, named as in training, whether a fine-tuned model or the `feature` strategy's logistic regression
answers. A chat keeps its turns: through the chat template where the run trained with one, otherwise as one
training example per turn, one after the other.
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from engine import data as data_lib
from engine.config import ConfigError, DataConfig
from engine.generation import Answer, end_token_ids, generate
from engine.inference.loading import LoadedRun
from engine.sampling import GenerationSettings
from engine.sinks import EventSink

FINE_TUNED, BASE = "fine-tuned", "base"
CLASSIFY_BATCH_SIZE = 32


def prompt_column(cfg: DataConfig) -> str:
    """The column a user's prompt goes in: the one the run's training file has (instruction, prompt, or text under
    template none); instruction when the file cannot be read any more."""
    columns: list[str] = []
    path = Path(cfg.train).expanduser()
    if path.is_file():
        try:
            columns = data_lib.read_table(str(path), fmt=cfg.format, header=cfg.header).column_names
        except ConfigError:
            columns = []
    if cfg.template == "none" and cfg.text_field in columns:
        return cfg.text_field
    if cfg.prompt_field in columns and cfg.instruction_field not in columns:
        return cfg.prompt_field
    return cfg.instruction_field


def read_rows(source: str, cfg: DataConfig) -> list[dict[str, Any]]:
    """The rows of a data file (`generate --data`), read as the run reads its data."""
    return data_lib.read_table(source, fmt=cfg.format, header=cfg.header).to_list()


def request_rows(loaded: LoadedRun, *, prompt: str | None = None, data: str | None = None) -> list[dict[str, Any]]:
    """The rows to answer: `prompt` in the column the run's prompts came in, or the rows of the file `data`; a
    ConfigError when one of them asks nothing."""
    cfg = loaded.config.data
    if prompt is not None:
        rows = [{cfg.text_field if loaded.task == "classification" else prompt_column(cfg): prompt}]
    else:
        rows = read_rows(str(data), cfg)
        _check_columns(cfg, rows, loaded.task, str(data))
    for number, row in enumerate(rows, start=1):
        if not row_prompt(cfg, row, loaded.task).strip():
            where = f"row {number} of {data}" if data is not None else "the prompt"
            raise ConfigError(f"{where} is empty: give some text to answer")
    return rows


def _check_columns(cfg: DataConfig, rows: list[dict[str, Any]], task: str, source: str) -> None:
    if not rows:
        raise ConfigError(f"--data {source}: holds no rows")
    if task == "classification":
        wanted = [cfg.text_field]
    else:
        wanted = [cfg.instruction_field, cfg.prompt_field] + ([cfg.text_field] if cfg.template == "none" else [])
    if not any(column in rows[0] for column in wanted):
        raise ConfigError(
            f"--data {source}: no column {' or '.join(map(repr, wanted))} (columns: {', '.join(rows[0])}); "
            "give a file laid out like the run's data"
        )


def row_prompt(cfg: DataConfig, row: dict[str, Any], task: str) -> str:
    """What a row asks, as a person reads it: the text of a classifier; instruction (and input), prompt or text."""
    if task == "classification":
        return str(row.get(cfg.text_field) or "")
    if cfg.template == "none" and cfg.text_field in row:
        return str(row[cfg.text_field] or "")
    if cfg.instruction_field in row:
        extra = row.get(cfg.input_field) or ""
        return (
            f"{row[cfg.instruction_field] or ''}\n\n{extra}" if str(extra).strip() else str(row[cfg.instruction_field])
        )
    return str(row.get(cfg.prompt_field) or "")


def row_reference(cfg: DataConfig, row: dict[str, Any], task: str) -> Any:
    """The answer a row holds (its label, output or response), None when it has none."""
    if task == "classification":
        return row.get(cfg.label_field)
    if cfg.template == "none" and cfg.text_field in row:
        return None
    return row.get(cfg.output_field, row.get(cfg.response_field))


def prompt_ids(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, row: dict[str, Any]) -> list[int]:
    """The token ids the model continues from: the prompt as training rendered it. Under template none, a text
    row has no prompt in training (all of it is learned): its text is the beginning to continue."""
    ids = data_lib.prompt_token_ids(cfg, tokenizer, row)
    plain_text = cfg.template == "none" and not cfg.label_words and cfg.response_marker is None
    if plain_text and cfg.text_field in row:
        ids += tokenizer(str(row[cfg.text_field]), add_special_tokens=False)["input_ids"]
    return ids


def model_for(loaded: LoadedRun, base: bool) -> AbstractContextManager[torch.nn.Module]:
    """The fine-tuned model, or the base one (`LoadedRun.base_model`)."""
    return loaded.base_model() if base else nullcontext(loaded.model)


def answer(
    loaded: LoadedRun,
    rows: list[dict[str, Any]],
    settings: GenerationSettings,
    *,
    base: bool = False,
    sink: EventSink | None = None,
    stop: threading.Event | None = None,
    batch_size: int = 16,
) -> list[Answer]:
    """Generate an answer to every row with the fine-tuned model (or the base one), batched, in row order."""
    prompts = [prompt_ids(loaded.config.data, loaded.tokenizer, row) for row in rows]
    with model_for(loaded, base) as model:
        return generate(
            model,
            loaded.tokenizer,
            prompts,
            settings,
            end_ids=run_end_ids(loaded),
            sink=sink,
            stop=stop,
            batch_size=batch_size,
            model_name=BASE if base else FINE_TUNED,
        )


def run_end_ids(loaded: LoadedRun) -> list[int]:
    """The tokens that end an answer of the run's model (eos, its generation config's, the end of a chat turn)."""
    return end_token_ids(loaded.tokenizer, getattr(loaded.model, "generation_config", None))


@dataclass(frozen=True)
class LabelAnswer:
    """A classifier's answer for one text: the probability of each label, by name."""

    probabilities: dict[str, float]
    tokens: int
    elapsed_s: float

    @property
    def label(self) -> str:
        return max(self.probabilities, key=self.probabilities.__getitem__)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


def label_names(loaded: LoadedRun) -> list[str]:
    count = loaded.num_labels or len(loaded.label_names or [])
    return list(loaded.label_names) if loaded.label_names else [str(index) for index in range(count)]


def label_probabilities(loaded: LoadedRun, texts: list[str]) -> list[LabelAnswer]:
    """Softmax probabilities over the run's labels for each text, from the fine-tuned classifier or the feature
    strategy's logistic regression, with the texts tokenised as in training."""
    cfg = loaded.config.data
    started = time.perf_counter()
    encoded = encode_texts(cfg, loaded.tokenizer, texts)
    names = label_names(loaded)
    if loaded.classifier is not None:
        rows = Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
        features = loaded.strategy.embed(  # type: ignore[attr-defined]
            loaded.model,
            rows,
            DataCollatorWithPadding(loaded.tokenizer),
            batch_size=CLASSIFY_BATCH_SIZE,
            pooling=loaded.config.strategy.pooling,
        )
        columns = [names[int(label)] for label in loaded.classifier.classes_]
        table = [dict(zip(columns, map(float, row), strict=True)) for row in loaded.classifier.predict_proba(features)]
    else:
        table = _softmax_rows(loaded, encoded, names)
    elapsed = time.perf_counter() - started
    total = sum(len(ids) for ids in encoded["input_ids"]) or 1
    return [
        LabelAnswer({name: row.get(name, 0.0) for name in names}, len(ids), elapsed * len(ids) / total)
        for row, ids in zip(table, encoded["input_ids"], strict=True)
    ]


def _softmax_rows(loaded: LoadedRun, encoded: Any, names: list[str]) -> list[dict[str, float]]:
    log_probs = classifier_log_probs(loaded.model, loaded.tokenizer, encoded)
    return [dict(zip(names, row.exp().tolist(), strict=True)) for row in log_probs]


def classifier_log_probs(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, encoded: Any) -> torch.Tensor:
    """Log-softmax over the labels of a sequence classifier, one row per tokenised text (batches padded as in
    training)."""
    device = next(model.parameters()).device
    collator = DataCollatorWithPadding(tokenizer)
    features = [
        {"input_ids": ids, "attention_mask": mask}
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]
    rows = []
    with torch.inference_mode():
        for start in range(0, len(features), CLASSIFY_BATCH_SIZE):
            batch = collator(features[start : start + CLASSIFY_BATCH_SIZE])
            logits = model(**{key: value.to(device) for key, value in batch.items()}).logits
            rows.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(rows)


def encode_texts(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> Any:
    """Texts tokenised as a classifier's training data is (truncated to data.max_length)."""
    return tokenizer(texts, truncation=True, max_length=min(cfg.max_length, tokenizer.model_max_length))


@dataclass
class Chat:
    """A multi-turn conversation with a run's causal LM (`finetui chat`): the fine-tuned model, or the base one."""

    loaded: LoadedRun
    settings: GenerationSettings
    base: bool = False
    turns: list[tuple[str, list[int]]] = field(default_factory=list)
    """The user's messages and the answers' token ids so far."""
    column: str = field(init=False)
    """Where a message goes in a training row (`prompt_column`)."""

    def __post_init__(self) -> None:
        self.column = prompt_column(self.loaded.config.data)

    def reset(self) -> None:
        self.turns.clear()

    def reply(self, text: str, *, sink: EventSink | None = None, stop: threading.Event | None = None) -> Answer:
        """The model's answer to `text` after the turns so far (kept as the next turn)."""
        ids = self._fitting(text)
        with model_for(self.loaded, self.base) as model:
            (reply,) = generate(
                model,
                self.loaded.tokenizer,
                [ids],
                self.settings,
                end_ids=run_end_ids(self.loaded),
                sink=sink,
                stop=stop,
                model_name=BASE if self.base else FINE_TUNED,
            )
        self.turns.append((text, reply.token_ids))
        return reply

    def _fitting(self, text: str) -> list[int]:
        """The conversation's token ids, dropping the oldest turns while it and the answer exceed the model's
        context."""
        limit = getattr(self.loaded.model.config, "max_position_embeddings", None) or 1 << 30
        while True:
            ids = self.prompt_ids(text)
            if len(ids) + self.settings.max_new_tokens <= limit or not self.turns:
                return ids
            self.turns.pop(0)

    def prompt_ids(self, text: str) -> list[int]:
        """The turns so far and `text`, as token ids: through the chat template where the run trained with one,
        else each turn rendered as a training example (prompt, answer, end of sequence) and `text`'s prompt."""
        loaded = self.loaded
        tokenizer, cfg = loaded.tokenizer, loaded.config.data
        if cfg.template == "chat":
            messages: list[dict[str, str]] = []
            for asked, answered in self.turns:
                messages.append({"role": "user", "content": asked})
                messages.append({"role": "assistant", "content": tokenizer.decode(answered, skip_special_tokens=True)})
            messages.append({"role": "user", "content": text})
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tokenizer(rendered, add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        for asked, answered in self.turns:
            ids += [*prompt_ids(cfg, tokenizer, {self.column: asked}), *answered, tokenizer.eos_token_id]
        return ids + prompt_ids(cfg, tokenizer, {self.column: text})
