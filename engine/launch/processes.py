"""Starting the process that trains a run: `python -m engine.cli run --resume RUN_DIR --detached-child`, or
torchrun with `train.nproc` workers that each run that command.

Either way the process gets its own session (no controlling terminal: a dropped SSH connection sends it no
SIGHUP), stdin from /dev/null, stdout and stderr appended to the run's `run.log`, and its id in the run's `pid`
file. A child meant to outlive the caller (`detached`) is reaped by a thread of a long-lived caller (the TUI),
so no zombie keeps its pid "alive"; otherwise it ends when the caller dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from engine.config import RunConfig
from engine.models import resolve_model
from engine.parallel import LAUNCHED_ENV, unpinned_cuda_devices
from engine.runs import LOG_FILE, STOP_FILE, load_run_config, write_pid

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_PR_SET_PDEATHSIG = 1


def launch_command(run_dir: Path, nproc: int) -> list[str]:
    """The command line that trains `run_dir`: the CLI's worker entry, under torchrun when `nproc` > 1."""
    worker = ["-m", "engine.cli", "run", "--resume", str(run_dir), "--detached-child"]
    if nproc == 1:
        return [sys.executable, *worker]
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable, *torchrun, *worker]


def child_env(nproc: int) -> dict[str, str]:
    """This process's environment for the child: finetui importable, unbuffered output; for workers their
    thread share of the cores, the launched flag, and every GPU the caller could see before it kept to one."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if nproc == 1:
        return env
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    env[LAUNCHED_ENV] = "1"
    pinned, visible = unpinned_cuda_devices()
    if pinned:  # an earlier one-process run in this process (the TUI) kept to one GPU; the workers need all
        env.pop("CUDA_VISIBLE_DEVICES", None)
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
    return env


def materialise_model(config: RunConfig) -> None:
    """Build a `builtin:` model into the cache once, before the workers start: rank > 0 alone would save an
    incomplete copy (transformers saves weights on the main process only). Failures are left to the workers,
    which report them in the run."""
    with contextlib.suppress(Exception):
        resolve_model(config.model.id)


def spawn(run_dir: Path, nproc: int, *, detached: bool) -> subprocess.Popen[bytes]:
    """Start the process that trains the prepared (or resumable) `run_dir`; its id goes into the pid file.

    One process turns SIGINT into a clean stop (the pid file says so); torchrun would end its workers without a
    checkpoint, so those stop through the `stop` file, which every rank sees.
    """
    run_dir = run_dir.resolve()
    (run_dir / STOP_FILE).unlink(missing_ok=True)  # a request meant for an earlier session
    if nproc > 1:
        materialise_model(load_run_config(run_dir))
    with (run_dir / LOG_FILE).open("ab") as log:
        process = subprocess.Popen(
            launch_command(run_dir, nproc),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=child_env(nproc),
            preexec_fn=None if detached else _die_with_parent,
        )
    write_pid(run_dir, process.pid, signals=nproc == 1)
    if detached:
        threading.Thread(target=process.wait, name=f"finetui-reap-{process.pid}", daemon=True).start()
    return process


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (torchrun then ends the workers)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
