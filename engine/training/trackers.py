"""Experiment trackers (`train.report_to`): the Trainer's own integrations, pointed at the run's folder.

TensorBoard's callback writes under the Trainer's output directory (`checkpoints/runs/<date>_<host>`) unless told
otherwise; a run's logs belong in the run, in one known place, so `tensorboard --logdir RUN_DIR/tensorboard`
shows it. wandb and mlflow keep their own configuration (environment variables). Whether the packages are
installed is checked before anything loads (`engine.preflight.check_trackers`).
"""

from __future__ import annotations

from pathlib import Path

from transformers import Trainer
from transformers.integrations import TensorBoardCallback

TENSORBOARD_DIR = "tensorboard"


def point_trackers_at(trainer: Trainer, run_dir: Path) -> None:
    """TensorBoard logs go to `run_dir/tensorboard` (when it is among `train.report_to`)."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(run_dir / TENSORBOARD_DIR)
