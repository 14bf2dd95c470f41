"""Help, the command palette, the launcher, and a first screen that paints before torch is imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from textual.command import CommandPalette
from textual.widgets._footer import FooterKey

import tui.launcher as launcher
from tests.conftest import ROOT
from tests.tui.conftest import make_app, screen_text
from tui.screens.help import HelpScreen
from tui.screens.runs import RunsScreen
from tui.screens.setup import SetupScreen


async def test_help_screen_and_command_palette(tmp_path) -> None:  # type: ignore[no-untyped-def]
    app = make_app(runs_dir=tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        assert "^r Start" in screen_text(app)  # the footer (? is typed into the focused field here)
        await pilot.press("ctrl+p")
        await pilot.pause()
        assert isinstance(app.screen, CommandPalette)
        await pilot.press(*"Runs")
        await pilot.pause()
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, RunsScreen)
        assert "? Help" in screen_text(app)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.pause()
        lines = screen_text(app).splitlines()
        assert any("ctrl+r" in line for line in lines)
        first = next(line for line in lines if "ctrl+t " in line)
        wrapped = lines[lines.index(first) + 1]  # the rest of its description, under the description
        assert wrapped.index(wrapped.split()[1]) == first.index("start it in the background"), (first, wrapped)
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)
        await pilot.press("f1")
        assert isinstance(app.screen, SetupScreen)


def test_launcher_sends_subcommands_to_the_cli_and_opens_the_app_otherwise(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    opened: list[str | None] = []
    monkeypatch.setattr(launcher, "open_app", lambda preset: opened.append(preset) or 0)
    assert launcher.main([]) == 0 and launcher.main(["quickstart"]) == 0
    assert opened == [None, "quickstart"]
    assert launcher.main(["presets"]) == 0
    assert "quickstart" in capsys.readouterr().out
    assert launcher.main(["a", "b"]) == 2


def test_an_unknown_preset_is_one_line_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert launcher.open_app("no-such-preset") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("finetui: error: no-such-preset: no such preset") and "\n" not in error


def test_the_first_screen_paints_before_torch_is_imported() -> None:
    code = textwrap.dedent(
        """
        import asyncio, os, sys
        from tui.app import create_app

        async def main():
            app = create_app(None, cursor_blink=False)
            async with app.run_test(size=(80, 24)) as pilot:
                while app.first_paint is None:
                    await pilot.pause()
                print(app.first_paint[1])

        loop = asyncio.new_event_loop()
        loop.run_until_complete(main())
        sys.stdout.flush()
        os._exit(0)  # the background import of torch is of no use to this test
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"  # no torch, transformers or peft module when the first screen painted


def test_the_background_warm_up_loads_the_whole_engine() -> None:
    """Workers import the engine only through `load_engine`: transformers' lazy imports race across threads."""
    code = textwrap.dedent(
        """
        import sys
        from tui.heavy import ENGINE_MODULES, load_engine
        load_engine()
        print(sorted(name for name in (*ENGINE_MODULES, "torch", "transformers", "peft") if name not in sys.modules))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


async def test_the_footer_is_rebuilt_only_when_its_keys_change(tmp_path) -> None:  # type: ignore[no-untyped-def]
    app = make_app(runs_dir=tmp_path)
    async with app.run_test(size=(120, 34)) as pilot:
        setup = app.screen
        keys_before = list(setup.query(FooterKey))
        assert "^r Start" in screen_text(app)
        await pilot.press("f3")
        await pilot.press("f1")
        await pilot.pause()
        assert app.screen is setup
        assert list(setup.query(FooterKey)) == keys_before  # the same widgets: a switch does not rebuild it
        setup._bindings.bind("f9", "app.bell", "Ring")
        setup.refresh_bindings()
        await pilot.pause()
        await pilot.pause()
        assert "f9 Ring" in screen_text(app)
        assert list(setup.query(FooterKey)) != keys_before


async def test_the_footer_shows_whole_keys_only_and_follows_the_width(tmp_path) -> None:  # type: ignore[no-untyped-def]
    app = make_app(runs_dir=tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f4")
        await app.workers.wait_for_complete()
        await pilot.pause()
        footer = screen_text(app).splitlines()[-1]
        assert footer.startswith("space Mark c Compare d Diff R Resume s Stop a Attach t Try ? Help")
        assert footer.rstrip().endswith("▏^p palette") and "^t" not in footer  # no `^t Bac`, nothing after it
        await pilot.resize_terminal(120, 24)
        await pilot.pause()
        await pilot.pause()
        assert "^t Background ^o Load ^s Save" in screen_text(app).splitlines()[-1]
