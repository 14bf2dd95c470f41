"""One way to load a run for inference: whatever it trained, as it trained it, loaded once.

A finished run loads its final `model/`; a stopped (or failed, or interrupted) run its last checkpoint, and says
so. Full, head, last-layers and custom runs saved the whole model; LoRA and DoRA runs an adapter, loaded over
their base model (QLoRA's base quantised to 4-bit again, as it trained); the feature strategy a logistic
regression over its frozen encoder. The run's own tokenizer, template and label names come with it, so prompts
are rendered and labels named exactly as in training. `finetui eval`, `generate`, `chat` and `export` all load
runs here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from engine import models
from engine.config import ConfigError, RunConfig
from engine.devices import resolve_device, resolve_precision
from engine.inference.checks import run_model_source
from engine.library_logs import bridged_logs, quiet_library_output
from engine.runs import MODEL_DIR, load_run_config, read_summary
from engine.sinks import ListSink
from engine.strategies import Strategy, get_strategy
from engine.views import format_bytes


@dataclass
class LoadedRun:
    """A run's trained model, ready for inference, with what it was trained with."""

    run_dir: Path
    config: RunConfig
    strategy: Strategy
    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module
    """The fine-tuned model (a PeftModel for adapter runs; for `feature`, the frozen encoder)."""
    source: Path
    """`model/`, or the checkpoint a stopped run is loaded from."""
    device: str
    precision: str
    label_names: list[str] | None
    num_labels: int | None
    classifier: Any = None
    """The `feature` strategy's logistic regression (None for the others)."""
    notes: list[str] = field(default_factory=list)
    """One-line notes for the user (a stopped run loaded from its checkpoint)."""

    weights: _Weights | None = field(default=None, repr=False)
    """How the run's weights were loaded (to load its base beside them)."""
    _base: torch.nn.Module | None = field(default=None, init=False, repr=False)

    @property
    def task(self) -> str:
        return self.config.model.task

    @contextmanager
    def base_model(self) -> Iterator[torch.nn.Module]:
        """The model the run started from, to answer beside the fine-tuned one. Adapter runs: the same model with
        the adapter switched off (PEFT's `disable_adapter`), in one load. Runs that saved the whole model: the base
        loaded beside it once, after a check that memory holds it (ConfigError saying what it needs otherwise)."""
        if isinstance(self.model, PeftModel):
            with self.model.disable_adapter():
                yield self.model
            return
        if self.classifier is not None or self.weights is None:
            raise ConfigError(f"{self.run_dir}: the feature strategy's classifier has no base model to compare with")
        if self._base is None:
            self._base = self._load_base(self.weights)
        yield self._base

    def _load_base(self, weights: _Weights) -> torch.nn.Module:
        needed = sum(parameter.numel() * parameter.element_size() for parameter in self.model.parameters())
        free = torch.cuda.mem_get_info()[0] if self.device == "cuda" else psutil.virtual_memory().available
        if needed > 0.9 * free:
            raise ConfigError(
                f"the base model needs {format_bytes(needed)} beside the fine-tuned one and {format_bytes(free)} "
                f"is free on the {self.device}; free some memory, or compare on a larger machine"
            )
        self.notes.append(f"base model loaded beside the fine-tuned one: {format_bytes(needed)}")
        with bridged_logs(ListSink()):
            return weights.base().eval()


def load_run(run_dir: Path, *, overrides: list[str] | None = None) -> LoadedRun:
    """Load a run's trained model for inference (see the module docstring); ConfigError when there is none."""
    quiet_library_output()
    run_dir = Path(run_dir)
    config = load_run_config(run_dir, overrides)
    summary = read_summary(run_dir) or {}
    source, note = run_model_source(run_dir)
    strategy = get_strategy(config.strategy, config.model.task)
    if not strategy.trains_with_trainer and source.name != MODEL_DIR:
        raise ConfigError(f"{run_dir}: the feature strategy keeps no checkpoint; its run did not finish")
    device = resolve_device("cpu" if config.train.device == "cpu" else "auto", one_gpu=False)
    precision = resolve_precision(config.train.precision, device)
    label_names = summary.get("label_names")
    weights = _Weights(config, strategy, source, summary.get("num_labels"), label_names, device, precision)
    with bridged_logs(ListSink()):  # base loads report the task head as new: the run's weights replace it
        if not strategy.trains_with_trainer:
            model, classifier = weights.feature()
        else:
            model, classifier = (weights.adapter() if strategy.is_peft else weights.full()), None
    return LoadedRun(
        run_dir=run_dir,
        config=config,
        strategy=strategy,
        tokenizer=_run_tokenizer(config, source),
        model=model.eval(),
        source=source,
        device=device,
        precision=precision,
        label_names=label_names,
        num_labels=summary.get("num_labels"),
        classifier=classifier,
        notes=[note] if note else [],
        weights=weights,
    )


def _run_tokenizer(config: RunConfig, source: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the run's model (or checkpoint), as `models.load_tokenizer` sets it up."""
    saved = (source / "tokenizer_config.json").is_file()
    return models.load_tokenizer(config.model, source if saved else None)


@dataclass(frozen=True)
class _Weights:
    """How to load each kind of run's weights onto the inference device."""

    config: RunConfig
    strategy: Strategy
    source: Path
    num_labels: int | None
    label_names: list[str] | None
    device: str
    precision: str

    @property
    def device_map(self) -> str | None:
        # Inference may use every GPU: "sequential" fills the first and spills onto the next only what does not fit.
        return "sequential" if self.device == "cuda" and torch.cuda.device_count() > 1 else None

    def _placed(self, model: torch.nn.Module) -> torch.nn.Module:
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        quantised = getattr(base, "is_loaded_in_4bit", False)  # placed when loaded; cannot be moved
        return model if self.device_map is not None or quantised else model.to(self.device)

    def base(self) -> torch.nn.Module:
        """The base model as this strategy loads it (placed on the device)."""
        return self._placed(self._strategy_base())

    def _strategy_base(self) -> torch.nn.Module:
        return self.strategy.load_model(
            self.config.model,
            num_labels=self.num_labels,
            label_names=self.label_names,
            device=self.device,
            precision=self.precision,
            device_map=self.device_map,
        )

    def adapter(self) -> torch.nn.Module:
        """The base as the strategy loads it (4-bit for QLoRA), with the run's adapter over it."""
        return self._placed(PeftModel.from_pretrained(self._strategy_base(), str(self.source)))

    def full(self) -> torch.nn.Module:
        """The whole model the run saved."""
        classification = self.config.model.task == "classification"
        return self._placed(
            models.load_model(
                self.config.model.model_copy(update={"id": str(self.source)}),
                num_labels=self.num_labels if classification else None,
                label_names=self.label_names,
                device_map=self.device_map,
            )
        )

    def feature(self) -> tuple[torch.nn.Module, Any]:
        """The frozen encoder and the logistic regression fitted on its embeddings."""
        classifier, _ = self.strategy.load_classifier(self.source)  # type: ignore[attr-defined]
        return self.base(), classifier
