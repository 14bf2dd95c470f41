"""What a causal run generates while it trains: sample answers and a generation metric at each evaluation.

`train.sample_prompts` are answered at each evaluation and emitted as `Samples` events (one per prompt), so the
TUI and the run folder show how the answers change step by step. `train.generation_metric` answers the validation
rows (already cut to `data.max_eval_samples`) and scores them with `engine.generation_metrics`; the score joins the
evaluation's metrics as `generation_<metric>` (with `generation_s`, the seconds spent generating), so it is in the
`eval` event, on the curves, and in what the Trainer compares. It all happens inside the Trainer's `on_evaluate`,
after the loss is computed: the training steps never wait for it. Prompts are rendered as training renders them
(`engine.data.prompt_token_ids`) and answered by the one generation core (`engine.generation`), greedily.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback

from engine import data as data_lib
from engine import generation_metrics as gm
from engine.config import ConfigError, RunConfig
from engine.data import EncodedData
from engine.events import Samples
from engine.generation import end_token_ids, generate
from engine.sampling import GenerationSettings
from engine.sinks import EventSink


@dataclass(frozen=True)
class Probe:
    """What to generate at each evaluation: the sample prompts (shown text, token ids) and the metric's rows."""

    samples: list[tuple[str, list[int]]]
    metric: str | None
    metric_prompts: list[list[int]]
    references: list[str]
    settings: GenerationSettings


def generation_probe(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase, encoded: EncodedData, sink: EventSink
) -> GenerationProbe | None:
    """The run's probe callback, or None when it asks for no sample prompts and no generation metric."""
    train, cfg = config.train, config.data
    if not train.sample_prompts and train.generation_metric is None:
        return None
    rows: list[dict[str, Any]] = []
    if train.generation_metric is not None or isinstance(train.sample_prompts, str):
        rows = data_lib.split_rows(cfg, encoded, "validation")
    parts = [data_lib.example_parts(cfg, row) for row in rows]
    if isinstance(train.sample_prompts, str):
        count = min(int(train.sample_prompts.split(":")[1]), len(rows))
        samples = [(parts[i][0], data_lib.prompt_token_ids(cfg, tokenizer, rows[i])) for i in range(count)]
    else:
        samples = [(prompt, _prompt_ids(cfg, tokenizer, prompt)) for prompt in train.sample_prompts]
    metric, prompts, references = None, [], []
    if train.generation_metric is not None:
        answered = [index for index, (_, reference) in enumerate(parts) if reference.strip()]
        references = [parts[index][1] for index in answered]
        metric = gm.default_metric(references) if train.generation_metric == "auto" else train.generation_metric
        best = train.metric_for_best_model or ""
        if best.startswith(gm.METRIC_PREFIX) and best != f"{gm.METRIC_PREFIX}{metric}":
            raise ConfigError(
                f"train.metric_for_best_model: {best}, but train.generation_metric = 'auto' picks {metric} for "
                f"this data; name {gm.METRIC_PREFIX}{metric} or set train.generation_metric"
            )
        prompts = [data_lib.prompt_token_ids(cfg, tokenizer, rows[index]) for index in answered]
    new_tokens = data_lib.label_word_new_tokens(cfg, tokenizer) if cfg.label_words else train.generation_max_new_tokens
    settings = GenerationSettings(max_new_tokens=new_tokens)
    return GenerationProbe(Probe(samples, metric, prompts, references, settings), tokenizer, sink)


def _prompt_ids(cfg: data_lib.DataConfig, tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    return data_lib.prompt_token_ids(cfg, tokenizer, data_lib.prompt_row(cfg, prompt))


class GenerationProbe(TrainerCallback):
    """Generates the probe's answers at each validation evaluation; must come before `EventBridge` among the
    Trainer's callbacks, so that the metrics it adds are in the `eval` event."""

    def __init__(self, probe: Probe, tokenizer: PreTrainedTokenizerBase, sink: EventSink) -> None:
        self.probe, self.tokenizer, self.sink = probe, tokenizer, sink

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if metrics is None or model is None or any(key.startswith("test_") for key in metrics):
            return
        started = time.perf_counter()
        probe = self.probe
        prompts = [ids for _, ids in probe.samples] + probe.metric_prompts
        outputs = self._answers(model, prompts)
        seconds = time.perf_counter() - started
        if probe.metric is not None:
            scored = gm.score_answers(probe.metric, outputs[len(probe.samples) :], probe.references)
            metrics[f"eval_{gm.METRIC_PREFIX}{probe.metric}"] = scored.score
        metrics[f"eval_{gm.COST_KEY}"] = seconds
        for index, ((prompt, _), output) in enumerate(zip(probe.samples, outputs, strict=False)):
            self.sink.emit(Samples(step=state.global_step, prompt=prompt, output=output, index=index, seconds=seconds))

    def _answers(self, model: torch.nn.Module, prompts: list[list[int]]) -> list[str]:
        """Greedy answers of the model as it is now (switched to eval mode and back)."""
        training = model.training
        model.eval()
        try:
            end_ids = end_token_ids(self.tokenizer, getattr(model, "generation_config", None))
            with torch.no_grad():
                answers = generate(model, self.tokenizer, prompts, self.probe.settings, end_ids=end_ids)
        finally:
            model.train(training)
        return [answer.text.strip() for answer in answers]
