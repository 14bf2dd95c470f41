"""What `finetui generate`, `chat`, `export` and `eval --generate` check before torch loads.

Everything the command line and the run folder show is checked here, from files alone: a folder that is no run,
a run with no model and no checkpoint, chat with a classifier, an empty prompt, an export folder that is not
empty. Each is one line (a ConfigError: exit 2), found in a fraction of a second, with nothing written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.config import ConfigError, RunConfig
from engine.runs import MODEL_DIR, checkpoint_step, latest_checkpoint, load_run_config, read_summary

ADAPTER_STRATEGIES = ("lora", "dora", "qlora")
EXPORT_DTYPES = ("fp32", "bf16", "fp16")


def run_model_source(run_dir: Path) -> tuple[Path, str | None]:
    """Where a run's trained weights are: `model/`, else its last checkpoint (with a note saying so)."""
    model_dir = run_dir / MODEL_DIR
    if model_dir.is_dir():
        return model_dir, None
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        status = (read_summary(run_dir) or {}).get("status", "unknown")
        again = (
            f"train it again with finetui rerun {run_dir}"
            if status == "finished"
            else f"continue it with finetui run --resume {run_dir}, or train a new run"
        )
        raise ConfigError(f"{run_dir}: no model and no checkpoint to load (run status: {status}); {again}")
    note = (
        f"the run has no final model: using its last checkpoint, {checkpoint.name} (step {checkpoint_step(checkpoint)})"
    )
    return checkpoint, note


@dataclass(frozen=True)
class UsableRun:
    """A run folder that holds a model to use, as read from its files."""

    run_dir: Path
    config: RunConfig

    @property
    def task(self) -> str:
        return self.config.model.task

    @property
    def strategy(self) -> str:
        return self.config.strategy.kind


def usable_run(run_dir: Path) -> UsableRun:
    """The run in `run_dir`, when it has a model or a checkpoint to load (ConfigError otherwise)."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    run_model_source(run_dir)
    if config.strategy.kind == "feature" and not (run_dir / MODEL_DIR).is_dir():
        raise ConfigError(f"{run_dir}: the feature strategy keeps no checkpoint; its run did not finish")
    return UsableRun(run_dir, config)


def check_prompts(prompts: list[str]) -> None:
    for prompt in prompts:
        if not prompt.strip():
            raise ConfigError("the prompt is empty: give some text (--prompt TEXT, or rows with text in --data FILE)")


def check_base(run: UsableRun) -> None:
    """The base model can answer beside the fine-tuned one: causal runs only (a classifier's base has no head)."""
    if run.task != "causal":
        raise ConfigError(
            f"{run.run_dir.name}: --base and --compare are for causal LMs; the base of a classifier has no trained "
            "head (its answers would be random)"
        )


def check_chat(run: UsableRun) -> None:
    if run.task != "causal":
        raise ConfigError(
            f"{run.run_dir.name} is a classification run: chat needs a causal LM; "
            f"use finetui generate {run.run_dir} --prompt TEXT for its label probabilities"
        )


def check_data_file(path: str) -> None:
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"--data {path}: no such file")


def check_export(run: UsableRun, out: Path, *, adapter_only: bool, dtype: str | None) -> None:
    """An export the run and the target folder allow."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty folder; give a new or empty folder")
    if run.strategy == "feature":
        raise ConfigError(
            f"{run.run_dir.name}: the feature strategy's classifier is a scikit-learn model over the encoder's "
            "embeddings, which transformers cannot load; train with head, lora or full to export"
        )
    if adapter_only and run.strategy not in ADAPTER_STRATEGIES:
        raise ConfigError(
            f"--adapter-only: {run.run_dir.name} trained with {run.strategy}, which saves the whole model, not an "
            "adapter; drop --adapter-only"
        )
    if adapter_only and dtype is not None:
        raise ConfigError("--dtype: an adapter is written as it trained; drop --dtype or --adapter-only")


def check_generate_eval(run: UsableRun, metric: str | None, *, generate: bool, base: bool) -> None:
    """`eval --generate` on a run that generates; --metric and --base only with --generate."""
    if not generate:
        given = [flag for flag, value in (("--metric", metric), ("--base", base)) if value]
        if given:
            raise ConfigError(f"{' and '.join(given)}: score generated answers; add --generate")
        return
    if run.task == "classification":
        raise ConfigError(
            f"--generate: {run.run_dir.name} is a classification run (a head scores the labels, nothing is "
            "generated); drop --generate, or train a causal model with data.label_words to judge its answers"
        )
    if base:
        check_base(run)
