"""The setup screen: model, task, data (with a file picker, a preview and a report), strategy and training options.

Every field edits one key of the app's setup dict; after each edit the whole dict is validated with
`engine.config.field_errors` (the CLI's pydantic models and wording) and each problem is shown under its field.
The data report (`tui.widgets.data_report`) follows the setup too; its findings show beside their fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import Button, DataTable, Input, Label, Select

from tui.form import (
    BUILTIN_MODELS,
    DEFAULTS,
    FIELDS,
    FIELDS_BY_KEY,
    MISSING,
    Field,
    effective_value,
    get_value,
    parse_text,
    task_of,
    to_text,
    with_value,
)
from tui.heavy import load_engine
from tui.messages import DataFindings, PreviewReady
from tui.screens.base import SetupScreenBase
from tui.screens.dialogs import FilePickerScreen
from tui.widgets.data_report import DataReportView
from tui.widgets.mode_bar import ModeBar
from tui.widgets.steady_footer import SteadyFooter

PREVIEW_ROWS = 5
BROWSE_KEYS = ("data.train", "data.validation", "data.test")
# narrow terminals stack the two columns; wide ones show them side by side
LEFT_SECTIONS = ("Run", "Model", "Data")
RIGHT_SECTIONS = ("Strategy", "Training")


def _cell(value: Any, width: int = 40) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


class SetupScreen(SetupScreenBase):
    MODE = "setup"
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]] | None] = [(0, "-narrow"), (150, "-wide")]
    AUTO_FOCUS = "#f-name"  # focusing the whole form would restyle every field: slow first paint
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+b", "browse", "Browse data"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.stale = False  # composed showing the current setup
        self._columns: list[str] = []
        self._preview_source: str | None = None
        self._shown_errors: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        yield ModeBar("setup")
        yield Label("", id="setup-problems")
        with VerticalScroll(id="setup-form", can_focus=False):
            for column, sections in (("left", LEFT_SECTIONS), ("right", RIGHT_SECTIONS)):
                with Vertical(classes="form-column", id=f"setup-{column}"):
                    for section in sections:
                        yield from self._section(section)
        yield SteadyFooter()

    def _section(self, section: str) -> ComposeResult:
        with Vertical(classes="form-section", id=f"section-{section.lower()}"):
            yield Label(section, classes="section-title")
            for field in (f for f in FIELDS if f.section == section):
                yield from self._field_row(field)
                if field.key == "model.id":
                    with Horizontal(classes="field-row", id="row-builtin"):
                        yield Label("builtin", classes="field-label")
                        yield Select(
                            [(f"{name}  ({size})", name) for name, size, _ in BUILTIN_MODELS],
                            prompt="pick a builtin model",
                            id="builtin-models",
                            compact=True,
                        )
                if field.key == "data.test":
                    yield Label("", id="preview-status", classes="dim")
                    yield DataTable(id="preview-table", show_cursor=False, zebra_stripes=True)
                    yield DataReportView(id="data-report")

    def _field_row(self, field: Field) -> ComposeResult:
        classes = "field-row"
        if field.strategies:
            classes += " strategy-only"
        if field.tasks:
            classes += " task-only"
        with Horizontal(classes=classes, id=f"row-{field.widget_id}"):
            yield Label(field.label, classes="field-label")
            yield self._widget(field)
            if field.key in BROWSE_KEYS:
                yield Button("…", id=f"browse-{field.widget_id}", classes="browse", compact=True)
        yield Label("", classes="field-error", id=f"err-{field.widget_id}")
        yield Label("", classes="field-warning", id=f"warn-{field.widget_id}")

    def _widget(self, field: Field) -> Widget:
        """The field's widget, showing the current setup already (so mounting it changes nothing)."""
        value = effective_value(self.finetui.setup_data, field.key)
        if field.kind == "choice":
            widget: Widget = Select(
                [(choice, choice) for choice in field.choices],
                value=value if value in field.choices else field.choices[0],
                allow_blank=False,
                id=field.widget_id,
                compact=True,
            )
        elif field.kind == "column":
            current = str(value or "")
            widget = Select(
                [(current, current)] if current else [],
                value=current if current else Select.BLANK,
                prompt="(pick a column)",
                id=field.widget_id,
                compact=True,
            )
        elif field.kind == "bool":
            # a Select that reads "off"/"on": a checkbox's X shows whatever its state in plain text and over SSH
            widget = Select(
                [("off", False), ("on", True)], value=bool(value), allow_blank=False, id=field.widget_id, compact=True
            )
        else:
            widget = Input(
                to_text(field, value), id=field.widget_id, compact=True, placeholder=self._placeholder(field)
            )
        widget.tooltip = field.help
        return widget

    @staticmethod
    def _placeholder(field: Field) -> str:
        if field.kind in ("optional", "optional_number"):
            return "(unset)"
        if field.key == "data.train":
            return "data file (csv, tsv, json, jsonl, parquet) or hub dataset id"
        return ""

    # populate from the app's setup

    def on_mount(self) -> None:
        # the widgets were composed showing the current setup already
        self._refresh_visibility()
        self.show_errors()
        self._maybe_preview()
        self.query_one(DataReportView).request(self.finetui.setup_data, pause=False)

    def show_setup(self) -> None:
        """Show the app's setup in every field (without echoing change events back)."""
        data = self.finetui.setup_data
        self.stale = False
        self._maybe_preview()
        with self.prevent(Input.Changed, Select.Changed):
            for field in FIELDS:
                value = effective_value(data, field.key)
                widget = self.query_one(f"#{field.widget_id}")
                if isinstance(widget, Input):
                    widget.value = to_text(field, value)
                elif isinstance(widget, Select):
                    if field.kind == "bool":
                        widget.value = bool(value)
                    elif field.kind == "column":
                        self._set_column_options(widget, str(value) if value is not None else "")
                    elif value in field.choices:
                        widget.value = value
            model_id = effective_value(data, "model.id")
            builtin = self.query_one("#builtin-models", Select)
            if model_id in {name for name, _, _ in BUILTIN_MODELS}:
                builtin.value = model_id
            else:
                builtin.clear()
        self._refresh_visibility()
        self.show_errors()
        self.query_one(DataReportView).request(data)

    def _set_column_options(self, select: Select, current: str) -> None:
        names = list(self._columns)
        if current and current not in names:
            names.append(current)
        select.set_options([(name, name) for name in names])
        if current:
            select.value = current

    # edits

    def _edit(self, key: str, value: Any) -> None:
        data = self.finetui.setup_data
        current = get_value(data, key)
        if value is MISSING:
            if current is MISSING:
                return
        elif current is MISSING:
            if value == get_value(DEFAULTS, key, None):
                return  # the field shows its default: nothing to record
        elif value == current and type(value) is type(current):
            return
        self.finetui.update_setup(with_value(data, key, value), origin=self)
        if key in ("strategy.kind", "model.task", "model.id"):
            self._refresh_visibility()
        self.show_errors()
        self.query_one(DataReportView).request(self.finetui.setup_data)

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        field = self._field_of(event.input)
        if field is None:
            return
        self._edit(field.key, parse_text(field, event.value))
        if field.key == "data.train":
            self._maybe_preview()
        if field.key == "model.id":
            builtin = self.query_one("#builtin-models", Select)
            with self.prevent(Select.Changed):
                if event.value in {name for name, _, _ in BUILTIN_MODELS}:
                    builtin.value = event.value
                else:
                    builtin.clear()

    @on(Input.Submitted, "#f-data-train")
    def _train_submitted(self) -> None:
        self._maybe_preview(force=True)
        self.query_one(DataReportView).request(self.finetui.setup_data, force=True, pause=False)

    def on_data_findings(self, message: DataFindings) -> None:
        """Each finding of the data report beside the field it concerns."""
        for field in FIELDS:
            shown = message.findings.get(field.key, "")
            label = self.query_one(f"#warn-{field.widget_id}", Label)
            label.update(shown)
            label.display = bool(shown) and self.query_one(f"#row-{field.widget_id}").display

    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "builtin-models":
            if event.value is not Select.BLANK:
                self.query_one("#f-model-id", Input).value = str(event.value)
            return
        field = self._field_of(event.select)
        if field is None or event.value is Select.BLANK:
            return
        self._edit(field.key, event.value)

    @staticmethod
    def _field_of(widget: Widget) -> Field | None:
        if not widget.id or not widget.id.startswith("f-"):
            return None
        return next((field for field in FIELDS if field.widget_id == widget.id), None)

    # errors and visibility

    def show_errors(self) -> dict[str, str]:
        from engine.config import field_errors

        errors = field_errors(self.finetui.setup_data)
        for field in FIELDS:
            message = errors.get(field.key, "")
            shown = message.removeprefix("preset: ").removeprefix(f"{field.key}: ")
            if shown == self._shown_errors.get(field.key, ""):
                continue
            self._shown_errors[field.key] = shown
            label = self.query_one(f"#err-{field.widget_id}", Label)
            label.update(shown)
            label.display = bool(shown) and self.query_one(f"#row-{field.widget_id}").display
            self.query_one(f"#row-{field.widget_id}").set_class(bool(shown), "-invalid")
        summary = self.query_one("#setup-problems", Label)
        if errors:
            count = f"{len(errors)} problems" if len(errors) > 1 else "1 problem"
            first = next(iter(errors.values())).removeprefix("preset: ")
            summary.update(f"[b]{count}[/] (marked red below): {first}")
        summary.display = bool(errors)
        self._reveal_error()
        return errors

    def on_descendant_focus(self) -> None:
        self._reveal_error()

    def _reveal_error(self) -> None:
        """Scroll the focused field's error into view: under a field near the bottom, it was cut off."""
        field = self._field_of(self.focused) if self.focused is not None else None
        if field is None:
            return
        error = self.query_one(f"#err-{field.widget_id}", Label)
        if error.display:
            form = self.query_one("#setup-form", VerticalScroll)
            self.call_after_refresh(form.scroll_to_widget, error, animate=False)

    def _refresh_visibility(self) -> None:
        data = self.finetui.setup_data
        kind = effective_value(data, "strategy.kind")
        task = task_of(data)
        for field in FIELDS:
            if not (field.strategies or field.tasks):
                continue
            shown = (not field.strategies or kind in field.strategies) and (
                not field.tasks or task == "auto" or task in field.tasks
            )
            row = self.query_one(f"#row-{field.widget_id}")
            if row.display != shown:
                row.display = shown
                error = self.query_one(f"#err-{field.widget_id}", Label)
                error.display = shown and bool(self._shown_errors.get(field.key))

    # data preview

    def _maybe_preview(self, force: bool = False) -> None:
        """Preview the train data when it is a local file, or on enter in its field (a hub dataset, a folder)."""
        source = str(effective_value(self.finetui.setup_data, "data.train") or "").strip()
        if source and source == self._preview_source and not force:
            return
        if not source or not (force or Path(source).expanduser().is_file()):
            self._clear_preview()  # the data report line below says that enter reads it
            return
        self._preview_source = source
        self.query_one("#preview-status", Label).update(f"reading {source}…")
        data = self.finetui.setup_data
        self._read_preview(
            source,
            effective_value(data, "data.format"),
            effective_value(data, "data.header"),
            effective_value(data, "data.config_name"),
        )

    def _clear_preview(self) -> None:
        """No preview: the one shown was of other data (another preset's, a path being typed)."""
        self._preview_source = None
        self._columns = []
        self.query_one("#preview-status", Label).update("")
        table = self.query_one("#preview-table", DataTable)
        table.clear(columns=True)
        table.display = False

    @work(thread=True, exclusive=True, exit_on_error=False, group="preview", name="data preview")
    def _read_preview(self, source: str, fmt: str, header: bool | None, config_name: str | None) -> None:
        load_engine()
        from engine.config import ConfigError
        from engine.data import read_table

        try:
            table = read_table(source, fmt=fmt, header=header, config_name=config_name)
        except ConfigError as exc:
            self.post_message(PreviewReady(source, error=str(exc)))
            return
        rows = table.select(range(min(PREVIEW_ROWS, len(table)))).to_list()
        self.post_message(PreviewReady(source, columns=list(table.column_names), num_rows=len(table), rows=rows))

    def on_preview_ready(self, message: PreviewReady) -> None:
        if message.source != self._preview_source:
            return
        status = self.query_one("#preview-status", Label)
        table = self.query_one("#preview-table", DataTable)
        table.clear(columns=True)
        if message.error:
            status.update(f"[b $error]preview:[/] {message.error}")
            table.display = False
            return
        self._columns = message.columns
        status.update(f"[b]{message.num_rows:,}[/] rows · columns: {', '.join(message.columns)}")
        table.display = True
        for column in message.columns:
            table.add_column(column, key=column)
        for row in message.rows:
            table.add_row(*[_cell(row.get(column, "")) for column in message.columns])
        data = self.finetui.setup_data
        with self.prevent(Select.Changed):
            for field in FIELDS:
                if field.kind == "column":
                    current = effective_value(data, field.key)
                    self._set_column_options(self.query_one(f"#{field.widget_id}", Select), str(current or ""))
        self.show_errors()

    def worker_failed(self, worker, message: str) -> None:  # type: ignore[no-untyped-def]
        if worker.group == "preview":
            self.query_one("#preview-status", Label).update(f"[b $error]preview:[/] {message}")
            return
        if worker.group == "data-report":
            self.query_one(DataReportView).failed(message)
            return
        super().worker_failed(worker, message)

    # file picker

    @on(Button.Pressed, ".browse")
    def _browse_pressed(self, event: Button.Pressed) -> None:
        key = next(k for k in BROWSE_KEYS if event.button.id == f"browse-{FIELDS_BY_KEY[k].widget_id}")
        self.browse(key)

    def action_browse(self) -> None:
        focused = self.focused
        key = "data.train"
        for candidate in BROWSE_KEYS:
            widget_id = FIELDS_BY_KEY[candidate].widget_id
            if focused is not None and focused.id in (widget_id, f"browse-{widget_id}"):
                key = candidate
        self.browse(key)

    def browse(self, key: str) -> None:
        current = str(effective_value(self.finetui.setup_data, key) or "")
        start = Path(current).expanduser().parent if current and Path(current).expanduser().exists() else Path.cwd()
        field = FIELDS_BY_KEY[key]

        def chosen(path: Path | None) -> None:
            if path is not None:
                self.query_one(f"#{field.widget_id}", Input).value = to_text(field, str(path.resolve()))

        self.app.push_screen(FilePickerScreen(f"Pick the {field.label} file", start), chosen)
