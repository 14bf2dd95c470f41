"""The presets shipped with finetui (`presets/*.toml`) and how a preset argument names a file.

`finetui run quickstart`, `finetui quickstart` and the app's preset picker all resolve names the same way.
"""

from __future__ import annotations

from pathlib import Path

from engine.config import ConfigError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


def bundled_presets() -> list[Path]:
    return sorted(PRESETS_DIR.glob("*.toml"))


def resolve_preset(name_or_path: str) -> Path:
    """A preset file path, or the name of a bundled preset (`quickstart` -> presets/quickstart.toml)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    bundled = PRESETS_DIR / f"{name_or_path}.toml"
    if bundled.is_file():
        return bundled
    names = ", ".join(p.stem for p in bundled_presets())
    raise ConfigError(f"{name_or_path}: no such preset file or bundled preset (bundled: {names})")
