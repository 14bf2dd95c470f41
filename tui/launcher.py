"""The `finetui` console script.

`finetui` opens the app; `finetui PRESET` opens it with that preset loaded; subcommands (`run`, `inspect`,
`data`, `eval`, `presets`) go to the headless CLI in `engine.cli`. This module is the one place where the app and the
engine meet, so the engine never imports the UI. The app module is imported only when the app opens, so the
headless commands never load Textual.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading

from engine.cli import SUBCOMMANDS
from engine.cli import main as cli_main
from engine.events import EXIT_BAD_INPUT

USAGE = f"""usage: finetui [PRESET]   open the app (with a preset file or a bundled preset loaded)
       finetui {{{",".join(SUBCOMMANDS)}}} ...   headless commands (finetui COMMAND --help)
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE + "\n")
        return cli_main(args)
    if args and (args[0] in SUBCOMMANDS or args[0].startswith("-")):
        return cli_main(args)
    if len(args) > 1:
        sys.stderr.write(f"finetui: error: expected at most one preset, got {' '.join(args)}\n{USAGE}")
        return EXIT_BAD_INPUT
    return open_app(args[0] if args else None)


def open_app(preset: str | None) -> int:
    from engine.config import ConfigError
    from engine.presets import resolve_preset

    try:
        path = resolve_preset(preset) if preset else None
        if path is not None:
            from tui.presets import load_preset

            setup = load_preset(path)
        else:
            setup = None
    except ConfigError as exc:
        sys.stderr.write(f"finetui: error: {exc}\n")
        return EXIT_BAD_INPUT
    from tui.app import create_app

    app = create_app(path, setup=setup)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(app.run_async())
    finally:
        loop.close()
    code = app.return_code or 0
    if any(thread.is_alive() and not thread.daemon for thread in threading.enumerate()[1:]):
        # A worker thread still imports torch or maps a model: nothing of value, and Python would wait for it
        # at exit. (An active run was stopped with a checkpoint before the app let itself quit.)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
