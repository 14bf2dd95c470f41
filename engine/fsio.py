"""Writing files and folders so that a reader, or a process killed halfway, never sees a half-written one.

Every durable write of finetui goes through here: run configs and summaries, cache entries, checkpoints and the
final model folder, presets saved from the app. A file is written under a temporary name, fsynced and renamed
into place; a folder is written complete under a temporary name and renamed (`publish_dir`), or swapped in for
an older one (`replace_dir`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, content: str | bytes, *, overwrite: bool = True) -> None:
    """Write a file so that readers see the old content or the new one, never a mix.

    `overwrite=False` never replaces an existing file, even one created meanwhile (FileExistsError).
    """
    data = content.encode("utf-8") if isinstance(content, str) else content
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the name is taken: never clobbers
    finally:
        Path(tmp).unlink(missing_ok=True)


def publish_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Write a folder under a temporary name, then rename it to `target`, so readers see all of it or nothing.

    When two processes build the same folder at once, the first rename wins and the other copy is discarded.
    Parent folders it had to create are removed again when `write` fails.
    """
    created = [folder for folder in (target.parent, *target.parent.parents) if not folder.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            write(staging)
            staging.chmod(0o755)
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        for folder in created:  # deepest first; a folder someone else filled meanwhile stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then the directories, so a completed rename never exposes lost data."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def replace_dir(staged: Path, target: Path) -> None:
    """Move the complete directory `staged` to `target`, replacing an old `target` without a moment of neither.

    The old one is first renamed aside (`.old-<name>`) and deleted after the new one is in place. A kill
    between the two renames leaves the old one complete under `.old-<name>`, and
    `engine.runs.clean_partial_writes` puts it back.
    """
    old = target.parent / f".old-{target.name}"
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
