"""The `finetui` console script.

Subcommands (`run`, `inspect`, `eval`, `presets`) go to the headless CLI in `engine.cli`; this
module is the one place where the app and the engine meet, so the engine never imports the UI.
"""

from __future__ import annotations

import sys

from engine.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return cli_main(args or ["--help"])


if __name__ == "__main__":
    sys.exit(main())
