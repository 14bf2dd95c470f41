"""The reproducibility record: what exactly ran, written as `environment.json` beside each run.

Two runs of the same config can still differ: another torch, another GPU, a data file edited in place, a dirty
checkout. `environment.json` keeps what a result depends on besides the config: Python and library versions,
finetui's version and git commit, the OS, CPU and GPUs, the sha256 and row count of every data file, and the seeds
and determinism settings. `finetui diff` and `finetui rerun` compare it. It is cheap to write (a few
milliseconds plus one chunked sha256 pass per data file, shared with the tokenisation cache's key), and
`engine.run_diff` compares two records.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from engine.cache import file_sha256
from engine.config import DataConfig, RunConfig
from engine.events import Log
from engine.fsio import write_atomic
from engine.run_diff import comparable_differences, data_differences, read_environment
from engine.runs import ENVIRONMENT_FILE, load_run_config
from engine.sinks import EventSink

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "textual")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
_NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")
_HEADER_PROBE_ROWS = 50


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def finetui_source() -> dict[str, Any]:
    """finetui's version, and its git commit and dirty flag when it runs from a checkout."""
    source: dict[str, Any] = {"version": package_version("finetui")}
    if (PROJECT_ROOT / ".git").exists():
        commit = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no")
        source.update(commit=commit.strip() if commit else None, dirty=bool(status.strip()) if status else False)
    return source


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpus() -> list[dict[str, Any]]:
    found = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            found.append({"name": properties.name, "memory_bytes": properties.total_memory})
    return found


def nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version (Linux), without starting nvidia-smi."""
    try:
        text = _NVIDIA_DRIVER.read_text(encoding="utf-8")
    except OSError:
        return None
    words = text.split()
    return next((word for word in words if word[:1].isdigit() and word.count(".") >= 1), None)


def count_rows(path: Path, data: DataConfig) -> int | None:
    """Rows of a data file as finetui reads it: records of a json/jsonl file, lines of csv/tsv (less a header)."""
    suffix = path.suffix.lower().lstrip(".") if data.format == "auto" else data.format
    try:
        if suffix == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, ImportError):
        return None
    if suffix == "json" and text.lstrip().startswith("["):
        try:
            return len(json.loads(text))
        except json.JSONDecodeError:
            return None
    lines = [line for line in text.split("\n") if line.strip(" \t\r")]
    if suffix in ("csv", "tsv"):
        return len(lines) - int(_has_header(lines, "\t" if suffix == "tsv" else ",", data.header))
    return len(lines)


def _has_header(lines: list[str], delimiter: str, header: bool | None) -> bool:
    if header is not None or not lines:
        return bool(header)
    from engine.data import _detect_header

    rows = list(csv.reader(io.StringIO("\n".join(lines[:_HEADER_PROBE_ROWS])), delimiter=delimiter))
    return _detect_header(rows[0], rows[1:]) if all(len(row) == len(rows[0]) for row in rows) else False


def data_files(data: DataConfig) -> dict[str, dict[str, Any]]:
    """sha256, size and row count of each local data file by role; a hub dataset by its id alone."""
    files: dict[str, dict[str, Any]] = {}
    for role, source in (("train", data.train), ("validation", data.validation), ("test", data.test)):
        if not source:
            continue
        path = Path(source).expanduser()
        if not path.is_file():
            files[role] = {"source": source, "hub": True}
            continue
        files[role] = {
            "path": str(path.resolve()),
            "sha256": file_sha256(path),
            "bytes": path.stat().st_size,
            "rows": count_rows(path, data),
        }
    return files


def determinism(config: RunConfig) -> dict[str, Any]:
    cudnn = torch.backends.cudnn
    return {
        "seed": config.train.seed,
        "data_seed": config.train.seed,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(cudnn.deterministic),
        "cudnn_benchmark": bool(cudnn.benchmark),
        "cuda_matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED"),
    }


def collect_environment(config: RunConfig) -> dict[str, Any]:
    """Everything `environment.json` holds, for this process and `config`'s data."""
    return {
        "written_at": time.time(),
        "python": platform.python_version(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "finetui": finetui_source(),
        "os": {"system": platform.system(), "release": platform.release(), "machine": platform.machine()},
        "cpu": {"model": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads()},
        "gpus": gpus(),
        "cuda": {"runtime": torch.version.cuda, "driver": nvidia_driver()},
        "data": data_files(config.data),
        "determinism": determinism(config),
        "argv": sys.argv,
    }


def record_environment(run_dir: Path, config: RunConfig, sink: EventSink) -> dict[str, Any]:
    """Write `environment.json` at a run's first session. A resumed session keeps that record and logs a warning
    for everything that differs now (another torch, another GPU, an edited data file). Returns this session's."""
    current = collect_environment(config)
    recorded = read_environment(run_dir)
    if recorded is None:
        write_atomic(run_dir / ENVIRONMENT_FILE, json.dumps(current, indent=2, default=str) + "\n")
        return current
    for key, (was, now) in changes(recorded, current).items():
        sink.emit(Log(level="warning", message=f"{key} was {was} when the run started, now {now}"))
    return current


def rerun_warnings(run_dir: Path) -> list[str]:
    """How this machine and the run's data files differ now from the record of `run_dir` (`finetui rerun`).

    Raises ConfigError when `run_dir` is not a run."""
    config = load_run_config(run_dir)
    recorded = read_environment(run_dir)
    if recorded is None:
        return [f"{run_dir} has no {ENVIRONMENT_FILE} (an older finetui wrote it): the environment is not compared"]
    changed = changes(recorded, collect_environment(config))
    return [f"{key}: {was} in the run, {now} now" for key, (was, now) in changed.items()]


def changes(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """Environment and data-file differences between a run's record and now, as {dotted key: [then, now]}."""
    changed = comparable_differences(recorded, current)
    for role, digests in data_differences(recorded.get("data") or {}, current.get("data") or {}).items():
        changed[f"data.{role}.sha256"] = digests
    return changed
