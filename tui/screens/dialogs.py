"""Modal dialogs: confirm, pick a file, pick a preset, name a preset file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from rich.console import Group
from rich.padding import Padding
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Input, Label, OptionList
from textual.widgets.option_list import Option

from engine.sources import FORMAT_BY_SUFFIX
from tui.presets import preset_description

DATA_SUFFIXES = tuple(FORMAT_BY_SUFFIX)


class ConfirmScreen(ModalScreen[bool]):
    """A question with yes/no; `y`/`n`, enter or escape answer it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, yes: str = "Yes", no: str = "No") -> None:
        super().__init__(classes="dialog-screen")
        self.question, self.yes, self.no = question, yes, no

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="confirm"):
            yield Label(self.question, classes="dialog-question")
            with Horizontal(classes="dialog-buttons"):
                yield Button(f"{self.yes} (y)", id="yes", variant="primary")
                yield Button(f"{self.no} (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#yes", Button).focus()

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class DataTree(DirectoryTree):
    """Folders and files with the given suffixes; hidden entries left out."""

    def __init__(self, path: Path, suffixes: tuple[str, ...], **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(path, **kwargs)
        self.suffixes = suffixes

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [
            path
            for path in paths
            if not path.name.startswith(".")
            and (path.is_dir() or not self.suffixes or path.suffix.lower() in self.suffixes)
        ]


class FilePickerScreen(ModalScreen[Path | None]):
    """Browse for a file: arrows and enter in the tree, backspace for the parent folder, or type a path."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("backspace", "parent", "Parent folder", show=True),
    ]

    def __init__(self, title: str, start: Path, suffixes: tuple[str, ...] = DATA_SUFFIXES) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.start = start if start.is_dir() else Path.cwd()
        self.suffixes = suffixes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="file-picker"):
            yield Label(self.title_text, classes="dialog-question")
            yield Label(str(self.start), id="picker-folder", classes="dim")
            yield DataTree(self.start, self.suffixes, id="picker-tree")
            yield Input(placeholder="or type a path and press enter", id="picker-path", compact=True)

    def on_mount(self) -> None:
        self.query_one(DataTree).focus()

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_parent(self) -> None:
        tree = self.query_one(DataTree)
        if self.focused is not tree:
            return
        parent = Path(tree.path).resolve().parent
        tree.path = parent
        self.query_one("#picker-folder", Label).update(str(parent))

    @on(DirectoryTree.FileSelected)
    def _file(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss(Path(event.path))

    @on(Input.Submitted, "#picker-path")
    def _typed(self, event: Input.Submitted) -> None:
        path = Path(event.value.strip()).expanduser()
        if path.is_dir():
            self.query_one(DataTree).path = path
            self.query_one("#picker-folder", Label).update(str(path.resolve()))
        elif path.is_file():
            self.dismiss(path)
        else:
            self.notify(f"{path}: no such file", severity="error")


class PresetPickerScreen(ModalScreen[Path | None]):
    """The bundled presets (and ./presets), or any preset file."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+b", "browse", "Browse files"),
    ]

    def __init__(self, presets: list[Path]) -> None:
        super().__init__(classes="dialog-screen")
        self.presets = presets

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="preset-picker"):
            yield Label("Load a preset (enter), or type a file path; ctrl+b browses", classes="dialog-question")
            yield OptionList(
                *[Option(self._prompt(path), id=str(path)) for path in self.presets],
                id="preset-list",
            )
            yield Input(placeholder="path/to/preset.toml", id="preset-path", compact=True)

    @staticmethod
    def _prompt(path: Path) -> Group:
        """The preset's name, and its description indented under it, wrapped lines included."""
        description = Padding(Text(preset_description(path), style="dim"), (0, 0, 0, 2))
        return Group(Text(path.stem, style="bold"), description)

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_browse(self) -> None:
        def chosen(path: Path | None) -> None:
            if path is not None:
                self.dismiss(path)

        self.app.push_screen(FilePickerScreen("Preset file", Path.cwd(), (".toml",)), chosen)

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(Path(str(event.option.id)))

    @on(Input.Submitted, "#preset-path")
    def _typed(self, event: Input.Submitted) -> None:
        path = Path(event.value.strip()).expanduser()
        if path.is_file():
            self.dismiss(path)
        else:
            self.notify(f"{path}: no such preset file", severity="error")


class SavePresetScreen(ModalScreen[Path | None]):
    """Ask where to save the current setup as a preset TOML."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, default: Path) -> None:
        super().__init__(classes="dialog-screen")
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="save-preset"):
            yield Label("Save the setup as a preset (enter saves, escape cancels)", classes="dialog-question")
            yield Input(value=str(self.default), id="save-path")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        path = Path(text).expanduser()
        self.dismiss(path if path.suffix == ".toml" else path.with_suffix(".toml"))
