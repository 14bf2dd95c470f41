"""`finetui export`: a folder plain transformers loads, proven to answer as the run does before it is published.

LoRA and DoRA adapters are merged into their base weights; a QLoRA adapter into its base de-quantised from the
4-bit weights it trained against (merging into 4-bit weights would round the update away: the "lost fine-tune"
of other tools' exports); full, head, last-layers and custom runs saved the whole model already. The folder holds
safetensors weights, the run's tokenizer with its chat template, a generation config that ends answers where the
run's do, and a model card. `--adapter-only` writes the PEFT adapter and the card instead.

Before anything is published, fixed prompts from the run's validation data go through the run's model and through
the folder reloaded from disk with plain transformers (`AutoModelFor...`, `AutoTokenizer`): the greedy answers
(a classifier's predicted labels) must be the same, and the log-probabilities of those answers may differ by at
most `TOLERANCE` for the export dtype. Otherwise export fails (`ExportMismatch`, exit 1) and nothing is written.
The folder is built under a temporary name beside `--out` and renamed into place (`engine.fsio.publish_dir`).
On a CPU the reloaded folder computes in fp32 (bf16/fp16 matmuls are far slower there): the check then measures
the weights rounded to the export dtype.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from engine import data as data_lib
from engine.config import ConfigError, RunConfig
from engine.events import ExportProgress
from engine.fsio import publish_dir
from engine.generation import end_token_ids, generate
from engine.inference import checks
from engine.inference.loading import LoadedRun, load_run
from engine.inference.predict import classifier_log_probs, encode_texts, prompt_column, prompt_ids, run_end_ids
from engine.library_logs import bridged_logs
from engine.model_card import model_card
from engine.models import portable_id
from engine.runs import read_summary
from engine.sampling import GenerationSettings
from engine.sinks import EventSink, ListSink

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"fp32": 1e-3, "bf16": 0.5, "fp16": 0.1}
"""The largest log-probability difference (nats) an export may show against the run's model, per export dtype."""
QUANTISED_TOLERANCE = 1e-2
"""For a QLoRA run's merged export, at least this: the run's own model computes through bitsandbytes' 4-bit
kernels, whose arithmetic differs from a plain matmul over the same de-quantised weights (1.3e-3 nats measured on
tiny-llama, where the merge itself moved them by 5e-7)."""
CHECK_PROMPTS = 4
CHECK_NEW_TOKENS = 24
FALLBACK_PROMPTS = ("Hello!", "Write a short sentence about the sea.", "What is 2 + 2?", "Name three colours.")
STAGES = ("load", "answer", "merge", "save", "check", "publish")


@dataclass(frozen=True)
class ExportResult:
    """What `finetui export --json` prints (`out`, `same_greedy`, `max_logprob_diff`, and how they were found)."""

    out: str
    same_greedy: bool
    max_logprob_diff: float
    tolerance: float
    prompts: int
    dtype: str
    merged: bool
    published: bool
    notes: list[str] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return self.same_greedy and self.max_logprob_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ExportMismatch(Exception):
    """The exported folder does not answer as the run does: nothing was published."""

    def __init__(self, result: ExportResult) -> None:
        answers = "the same greedy answers" if result.same_greedy else "different greedy answers"
        super().__init__(
            f"the exported model gives {answers} on {result.prompts} fixed prompts, with log-probabilities up to "
            f"{result.max_logprob_diff:.3g} apart (tolerance {result.tolerance:g} for {result.dtype}); nothing was "
            "written to --out" + ("" if result.dtype == "fp32" else " (try --dtype fp32)")
        )
        self.result = result


@dataclass
class _Probe:
    """The fixed inputs of the check and the run's answers to them."""

    rows: list[dict[str, Any]]
    notes: list[str]
    answers: list[list[int]] = field(default_factory=list)
    """Causal: the prompt and greedy answer ids per prompt; classification: the predicted label per text."""
    log_probs: list[torch.Tensor] = field(default_factory=list)


def export_run(
    run_dir: Path, out: Path, *, dtype: str | None = None, adapter_only: bool = False, sink: EventSink | None = None
) -> ExportResult:
    """Export a run (see the module docstring); ConfigError for bad input, ExportMismatch when the check fails."""
    checks.check_export(checks.usable_run(run_dir), out, adapter_only=adapter_only, dtype=dtype)
    events = sink if sink is not None else ListSink()
    progress = _Progress(events)
    progress("load", f"loading {Path(run_dir).name}")
    loaded = load_run(Path(run_dir))
    chosen = dtype or ("bf16" if loaded.precision == "bf16" else "fp32")
    probe = _probe_rows(loaded)
    progress("answer", f"the run's greedy answers to {len(probe.rows)} fixed prompts")
    probe.answers, probe.log_probs = _answers(probe, loaded.config, loaded.model, loaded.tokenizer, run_end_ids(loaded))
    results: list[ExportResult] = []

    def write(folder: Path) -> None:
        merged = _write_model(loaded, folder, chosen, adapter_only, progress)
        progress("check", "reloading the folder from disk and answering the same prompts")
        result = _check(loaded, folder, probe, chosen, adapter_only, merged, out)
        results.append(result)
        if not result.matches:
            raise ExportMismatch(result)
        _write_card(loaded, folder, result, adapter_only)

    with bridged_logs(events):  # library warnings (de-quantising, loading) become log events, not stray lines
        publish_dir(out, write)
    progress("publish", f"published {out}")
    return replace(results[0], published=True)


class _Progress:
    def __init__(self, sink: EventSink) -> None:
        self.sink = sink

    def __call__(self, stage: str, message: str) -> None:
        step = STAGES.index(stage) + 1
        self.sink.emit(ExportProgress(step=step, steps=len(STAGES), stage=stage, message=message))


def _probe_rows(loaded: LoadedRun) -> _Probe:
    """The first rows of the run's validation file (else its training file) that hold a prompt, or fixed prompts
    when neither can be read any more."""
    cfg = loaded.config.data
    column = cfg.text_field if loaded.task == "classification" else prompt_column(cfg)
    for source in (cfg.validation, cfg.train):
        if source and Path(source).expanduser().is_file():
            try:
                table = data_lib.read_table(source, fmt=cfg.format, header=cfg.header)
            except ConfigError:
                continue
            rows = [
                row for row in table.select(range(min(len(table), 64))).to_list() if str(row.get(column, "")).strip()
            ]
            if rows:
                return _Probe(
                    rows[:CHECK_PROMPTS], [f"check prompts: the first {min(len(rows), CHECK_PROMPTS)} of {source}"]
                )
    return _Probe([{column: text} for text in FALLBACK_PROMPTS], ["check prompts: fixed ones (the run's data is gone)"])


def _answers(
    probe: _Probe,
    config: RunConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    end_ids: list[int],
    scored: list[list[int]] | None = None,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """A model's greedy answers to the probe (prompt and answer ids; a classifier's predicted label), and its
    log-probabilities of each token of the `scored` sequences (its own when None; a classifier's: of each label)."""
    cfg = config.data
    if config.model.task == "classification":
        texts = [str(row[cfg.text_field]) for row in probe.rows]
        log_probs = classifier_log_probs(model, tokenizer, encode_texts(cfg, tokenizer, texts))
        return [[int(row.argmax())] for row in log_probs], list(log_probs)
    prompts = [prompt_ids(cfg, tokenizer, row) for row in probe.rows]
    settings = GenerationSettings(max_new_tokens=CHECK_NEW_TOKENS)
    answers = generate(model, tokenizer, prompts, settings, end_ids=end_ids)
    sequences = [[*prompt, *answer.token_ids] for prompt, answer in zip(prompts, answers, strict=True)]
    return sequences, [_sequence_log_probs(model, ids) for ids in scored or sequences]


def _sequence_log_probs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """log p(token t+1 | tokens up to t) for each token of `ids` after the first."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].cpu()


def _write_model(loaded: LoadedRun, folder: Path, dtype: str, adapter_only: bool, progress: _Progress) -> bool:
    """Write the merged model (or the adapter) and the tokenizer into `folder`; True when merged."""
    if adapter_only:
        progress("merge", "adapter only: nothing to merge")
        progress("save", "writing the adapter and the tokenizer")
        # finetui never resizes the vocabulary: no hub lookup of the base's config to find out whether it did
        loaded.model.save_pretrained(str(folder), save_embedding_layers=False)  # type: ignore[operator]
        loaded.strategy.name_base(folder, portable_id(loaded.config.model))
        loaded.tokenizer.save_pretrained(str(folder))
        return False
    adapter = isinstance(loaded.model, PeftModel)
    progress(
        "merge", f"merging the {loaded.config.strategy.kind} adapter into the weights" if adapter else "no adapter"
    )
    model = _merged(loaded, DTYPES[dtype])
    progress("save", f"writing safetensors ({dtype}), the tokenizer and the generation config")
    if loaded.task == "causal":
        ends = end_token_ids(loaded.tokenizer, model.generation_config)
        model.generation_config.eos_token_id = ends if len(ends) > 1 else ends[0]
        model.generation_config.pad_token_id = loaded.tokenizer.pad_token_id
    model.save_pretrained(str(folder))
    loaded.tokenizer.save_pretrained(str(folder))
    return adapter


def _merged(loaded: LoadedRun, dtype: torch.dtype) -> PreTrainedModel:
    """The run's whole model at `dtype`: adapters merged in; QLoRA's into its base de-quantised to `dtype` (never
    into 4-bit weights)."""
    model = loaded.model
    if isinstance(model, PeftModel):
        if loaded.config.strategy.kind == "qlora":
            assert loaded.weights is not None
            base = loaded.weights.base().dequantize(dtype=dtype)  # type: ignore[operator]
            model = PeftModel.from_pretrained(base, str(loaded.source))
        model = model.merge_and_unload()  # type: ignore[operator]
    return model.to(dtype)  # type: ignore[return-value]


def _reloaded(loaded: LoadedRun, folder: Path, dtype: str, adapter_only: bool) -> tuple[torch.nn.Module, Any]:
    """The exported folder loaded back from disk: plain transformers, or, for an adapter, PEFT over a fresh base."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if adapter_only:
        assert loaded.weights is not None
        model = PeftModel.from_pretrained(loaded.weights.base(), str(folder))
        return model.eval(), tokenizer
    auto = AutoModelForSequenceClassification if loaded.task == "classification" else AutoModelForCausalLM
    compute = DTYPES[dtype] if loaded.device == "cuda" else torch.float32
    model = auto.from_pretrained(str(folder), dtype=compute).to(loaded.device)
    return model.eval(), tokenizer


def _tolerance(loaded: LoadedRun, dtype: str, adapter_only: bool) -> float:
    if loaded.config.strategy.kind == "qlora" and not adapter_only:
        return max(TOLERANCE[dtype], QUANTISED_TOLERANCE)
    return TOLERANCE[dtype]


def _check(
    loaded: LoadedRun, folder: Path, probe: _Probe, dtype: str, adapter_only: bool, merged: bool, out: Path
) -> ExportResult:
    model, tokenizer = _reloaded(loaded, folder, dtype, adapter_only)
    generation = getattr(model, "generation_config", None)
    answers, log_probs = _answers(
        probe, loaded.config, model, tokenizer, end_token_ids(tokenizer, generation), probe.answers
    )
    difference = max(
        float((mine - theirs).abs().max()) for mine, theirs in zip(probe.log_probs, log_probs, strict=True)
    )
    return ExportResult(
        out=str(out),
        same_greedy=answers == probe.answers,
        max_logprob_diff=difference,
        tolerance=_tolerance(loaded, dtype, adapter_only),
        prompts=len(probe.rows),
        dtype="adapter" if adapter_only else dtype,
        merged=merged,
        published=False,
        notes=[*loaded.notes, *probe.notes],
    )


def _write_card(loaded: LoadedRun, folder: Path, result: ExportResult, adapter_only: bool) -> None:
    summary = read_summary(loaded.run_dir) or {}
    answers = "the same predicted labels" if loaded.task == "classification" else "the same greedy answers"
    what = "the adapter" if adapter_only else f"{'merged ' if result.merged else ''}weights in {result.dtype}"
    export = [
        f"Exported from `{loaded.run_dir.name}` ({loaded.source.name}): {what}. Reloaded from this folder, it gives "
        f"{answers} as the run's model on {result.prompts} fixed prompts, with log-probabilities at most "
        f"{result.max_logprob_diff:.3g} apart (tolerance {result.tolerance:g})."
    ]
    card = model_card(
        loaded.config, summary, base_model=portable_id(loaded.config.model), adapter=adapter_only, export=export
    )
    (folder / "README.md").write_text(card, encoding="utf-8")
