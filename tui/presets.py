"""Presets for the app: where they are, loading one into the setup, saving the setup as a TOML preset.

Saving is atomic (a temporary file renamed into place) and never replaces an existing file unless asked:
without `overwrite`, the file is linked into place, which fails if the name was taken meanwhile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from engine.config import ConfigError, read_preset_file
from engine.fsio import write_atomic
from engine.presets import PRESETS_DIR, bundled_presets
from tui.form import PATH_KEYS, get_value, relativize_paths, with_value


def preset_files(cwd: Path | None = None) -> list[Path]:
    """Bundled presets, then those in `./presets/` of the working directory (if that is another folder)."""
    found = list(bundled_presets())
    local = (cwd or Path.cwd()) / "presets"
    if local.is_dir() and local.resolve() != PRESETS_DIR.resolve():
        found.extend(sorted(local.glob("*.toml")))
    return found


def preset_description(path: Path) -> str:
    """The preset's `description` (or its strategy and model), for the preset picker."""
    try:
        data = read_preset_file(path)
    except ConfigError:
        return "(cannot be read)"
    if data.get("description"):
        return str(data["description"])
    model, strategy = data.get("model", {}), data.get("strategy", {})
    return f"{strategy.get('kind', '')} on {model.get('id', '')}".strip()


def load_preset(path: Path) -> dict[str, Any]:
    """A preset file as the setup dict (paths relative to the working directory where they lie below it)."""
    return relativize_paths(read_preset_file(path))


def default_preset_path(data: dict[str, Any], cwd: Path | None = None) -> Path:
    folder = (cwd or Path.cwd()) / "presets"
    name = str(data.get("name") or "preset")
    return (folder if folder.is_dir() else (cwd or Path.cwd())) / f"{name}.toml"


def _portable_paths(data: dict[str, Any], preset: Path) -> dict[str, Any]:
    """Data paths as `read_preset_file` will resolve them: relative to the preset's folder when below it, else
    absolute (a relative path in the setup is relative to the working directory)."""
    folder = preset.parent.resolve()
    for key in PATH_KEYS:
        value = get_value(data, key)
        if not isinstance(value, str) or not value:
            continue
        path = Path(value).expanduser()
        if not path.exists():
            continue
        absolute = path.resolve()
        try:
            shown = str(absolute.relative_to(folder))
        except ValueError:
            shown = str(absolute)
        data = with_value(data, key, shown)
    return data


def save_preset(data: dict[str, Any], path: Path, *, overwrite: bool = False) -> Path:
    """Write the setup as a preset TOML at `path`; FileExistsError when it exists and `overwrite` is False."""
    path = path.expanduser()
    if not overwrite and path.exists():
        raise FileExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, tomli_w.dumps(_portable_paths(data, path)), overwrite=overwrite)
    return path
