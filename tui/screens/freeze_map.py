"""The freeze map screen: which layer groups train, their parameters, dtype, totals and the memory estimate.

The map comes from `engine.inspect.inspect_config` (the model built on the meta device from its config, no
weights), computed in a thread worker whenever the model, the strategy or its options, the batch size or the
length change. Toggling a row switches the setup to the `custom` strategy with exactly the rows shown trainable.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.widgets import Input, Label, Select, Static

from engine.views import format_bytes, format_count
from tui.form import FIELDS_BY_KEY, LORA_KINDS, MISSING, effective_value, parse_text, to_text, with_value
from tui.heavy import load_engine
from tui.messages import FreezeMapComputed
from tui.screens.base import SetupScreenBase
from tui.widgets.freeze_table import FreezeMapTable
from tui.widgets.mode_bar import ModeBar
from tui.widgets.steady_footer import SteadyFooter

# the inputs of `inspect_config`: a change to any of them means a new map
MAP_KEYS = (
    "model.id",
    "model.task",
    "model.num_labels",
    "model.revision",
    "model.trust_remote_code",
    "strategy",
    "train.batch_size",
    "train.gradient_checkpointing",
    "data.max_length",
)
OPTION_OF_KIND = {"last_layers": "strategy.layers", **{kind: "strategy.r" for kind in LORA_KINDS}}
SHORT_LABEL = {"strategy.layers": "layers", "strategy.r": "rank r"}


def map_data(data: dict[str, Any]) -> dict[str, Any]:
    """The part of the setup that `inspect_config` reads (other fields may be invalid without spoiling the map)."""
    from tui.form import get_value

    result: dict[str, Any] = {}
    for key in MAP_KEYS:
        value = get_value(data, key)
        if value is not MISSING:
            result = with_value(result, key, value)
    return result


def map_key(data: dict[str, Any]) -> str:
    return json.dumps(map_data(data), sort_keys=True, default=str)


def model_name(model: str) -> str:
    """A local model folder by its own name (its path is on the setup screen), so the title fits 80 columns."""
    return os.path.basename(model.rstrip("/")) if os.path.isdir(model) else model


class FreezeMapScreen(SetupScreenBase):
    MODE = "freeze"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("space", "toggle", "Toggle row"),
        Binding("a", "all_trainable", "All"),
        Binding("f", "fold", "Fold", show=False),
        Binding("shift+r", "recompute", "Recompute", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.report: dict[str, Any] | None = None
        self.computed_key: str | None = None
        self.pending_key: str | None = None

    def compose(self) -> ComposeResult:
        yield ModeBar("freeze")
        with Horizontal(id="fm-controls"):
            yield Label("strategy", classes="control-label")
            yield Select(
                [(kind, kind) for kind in FIELDS_BY_KEY["strategy.kind"].choices],
                value=effective_value(self.finetui.setup_data, "strategy.kind"),
                allow_blank=False,
                id="fm-kind",
                compact=True,
            )
            data = self.finetui.setup_data
            option_key = OPTION_OF_KIND.get(effective_value(data, "strategy.kind"), "strategy.layers")
            yield Label(SHORT_LABEL[option_key], classes="control-label", id="fm-option-label")
            yield Input(self._text(option_key), id="fm-option", compact=True)
            yield Label("batch", classes="control-label")
            yield Input(self._text("train.batch_size"), id="fm-batch", compact=True)
            yield Label("length", classes="control-label")
            yield Input(self._text("data.max_length"), id="fm-length", compact=True)
        yield Label("", id="fm-status")
        yield FreezeMapTable(id="fm-table")
        yield Static("", id="fm-totals")
        yield Static("", id="fm-memory")
        yield SteadyFooter()

    def _text(self, key: str) -> str:
        return to_text(FIELDS_BY_KEY[key], effective_value(self.finetui.setup_data, key))

    def on_mount(self) -> None:
        self.query_one(FreezeMapTable).focus()

    def show_setup(self) -> None:
        """Show the app's setup: the controls, and its map (recomputed when its inputs changed)."""
        self.stale = False
        self._show_controls()
        self.maybe_recompute()

    # controls (the strategy and its main option, batch size and length)

    def _show_controls(self) -> None:
        data = self.finetui.setup_data
        kind = effective_value(data, "strategy.kind")
        option_key = OPTION_OF_KIND.get(kind)
        with self.prevent(Select.Changed, Input.Changed):
            self.query_one("#fm-kind", Select).value = kind
            option = self.query_one("#fm-option", Input)
            label = self.query_one("#fm-option-label", Label)
            option.display = label.display = option_key is not None
            if option_key is not None:
                label.update(SHORT_LABEL[option_key])
                option.value = to_text(FIELDS_BY_KEY[option_key], effective_value(data, option_key))
            for widget_id, key in (("#fm-batch", "train.batch_size"), ("#fm-length", "data.max_length")):
                self.query_one(widget_id, Input).value = to_text(FIELDS_BY_KEY[key], effective_value(data, key))

    def _edit(self, key: str, value: Any) -> None:
        if value is MISSING:
            return
        self.finetui.update_setup(with_value(self.finetui.setup_data, key, value), origin=self)
        self.maybe_recompute()

    @on(Select.Changed, "#fm-kind")
    def _kind_changed(self, event: Select.Changed) -> None:
        if event.value == effective_value(self.finetui.setup_data, "strategy.kind"):
            return
        self._edit("strategy.kind", event.value)
        self._show_controls()

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        keys = {
            "fm-option": OPTION_OF_KIND.get(effective_value(self.finetui.setup_data, "strategy.kind")),
            "fm-batch": "train.batch_size",
            "fm-length": "data.max_length",
        }
        key = keys.get(event.input.id or "")
        if key is None:
            return
        value = parse_text(FIELDS_BY_KEY[key], event.value)
        if value != effective_value(self.finetui.setup_data, key):
            self._edit(key, value)

    # computing the map

    def maybe_recompute(self, force: bool = False) -> None:
        from engine.config import build_config, field_errors

        data = map_data(self.finetui.setup_data)
        key = map_key(data)
        if not force and key in (self.computed_key, self.pending_key):
            return
        errors = field_errors(data)
        status = self.query_one("#fm-status", Label)
        if errors:
            self.pending_key = None
            self.computed_key = None
            message = next(iter(errors.values())).removeprefix("preset: ")
            status.update(f"[b $error]fix the setup:[/] {message}")
            return
        config = build_config(data)
        self.pending_key = key
        first = " (the first map loads torch and transformers: a few seconds)" if self.report is None else ""
        status.update(f"computing the freeze map of {config.model.id} with {config.strategy.kind}…{first}")
        self._inspect(config, key)

    @work(thread=True, exclusive=True, exit_on_error=False, group="inspect", name="freeze map")
    def _inspect(self, config: Any, key: str) -> None:
        load_engine()
        from engine.config import ConfigError
        from engine.inspect import inspect_config

        try:
            report = inspect_config(config)
        except ConfigError as exc:
            self.post_message(FreezeMapComputed(key, None, str(exc)))
            return
        self.post_message(FreezeMapComputed(key, report))

    def on_freeze_map_computed(self, message: FreezeMapComputed) -> None:
        if message.key != self.pending_key:
            return  # an older request
        self.pending_key = None
        self.computed_key = message.key
        status = self.query_one("#fm-status", Label)
        if message.report is None:
            status.update(f"[b $error]freeze map:[/] {message.error}")
            return
        self.show_report(message.report)

    def worker_failed(self, worker, message: str) -> None:  # type: ignore[no-untyped-def]
        if worker.group == "inspect":
            self.pending_key = None
            self.query_one("#fm-status", Label).update(f"[b $error]freeze map failed:[/] {message}")
            return
        super().worker_failed(worker, message)

    def show_report(self, report: dict[str, Any], *, pending: bool = False) -> None:
        self.report = report
        table = self.query_one(FreezeMapTable)
        table.show(report)
        fold = " · f unfolds" if table.folded() else " · f folds" if table.foldable else ""
        note = "  [dim](updating…)[/]" if pending else ""
        self.query_one("#fm-status", Label).update(
            f"[b]{model_name(report['model'])}[/] · {report['strategy']} · {len(report['layers'])} groups · "
            f"space toggles{fold}{note}"
        )
        self.query_one("#fm-totals", Static).update(
            f"[b]total[/] {format_count(report['total_params'])} parameters · [b $success]trainable[/] "
            f"{format_count(report['trainable_params'])} ({report['trainable_percent']:.4g} %)"
        )
        memory = report.get("memory")
        if memory:  # the sum two terms a line, aligned: at 80 columns one line wrapped inside a term
            parts = ("weights", "gradients", "optimizer", "activations", "overhead")
            terms = [f"{part} {format_bytes(memory[f'{part}_bytes'])}" for part in parts if f"{part}_bytes" in memory]
            total = f"memory {format_bytes(memory['total_bytes'])} "
            lines = [" + ".join(terms[start : start + 2]) for start in range(0, len(terms), 2)]
            self.query_one("#fm-memory", Static).update(
                f"[b]{total}[/]= " + f"\n{' ' * len(total)}+ ".join(lines) + f"\n[dim]{memory['note']}[/]"
            )

    def action_recompute(self) -> None:
        self.maybe_recompute(force=True)

    # toggling rows: the custom strategy

    def _trainable_rows(self) -> list[str]:
        assert self.report is not None
        return [row["name"] for row in self.report["layers"] if row["trainable"] > 0]

    def action_toggle(self) -> None:
        groups = self.query_one(FreezeMapTable).highlighted_groups()
        if self.report is not None and groups:
            self._set_custom(set(self._trainable_rows()) ^ set(groups))

    def action_fold(self) -> None:
        table = self.query_one(FreezeMapTable)
        if self.report is not None and table.foldable:
            table.fold = not table.folded()
            self.show_report(self.report)

    def action_all_trainable(self) -> None:
        if self.report is not None:
            self._set_custom({row["name"] for row in self.report["layers"]})

    def _set_custom(self, chosen: set[str]) -> None:
        assert self.report is not None
        layers = self.report["layers"]
        ordered = [row["name"] for row in layers if row["name"] in chosen]
        data = with_value(self.finetui.setup_data, "strategy.kind", "custom")
        self.finetui.update_setup(with_value(data, "strategy.trainable", ordered), origin=self)
        # show the toggle at once; the exact map (memory included) follows from the worker
        rows = [dict(row, trainable=row["total"] if row["name"] in chosen else 0) for row in layers]
        total = sum(row["total"] for row in rows)
        trainable = sum(row["trainable"] for row in rows)
        optimistic = dict(
            self.report,
            strategy="custom",
            layers=rows,
            trainable_params=trainable,
            trainable_percent=100.0 * trainable / total if total else 0.0,
        )
        self._show_controls()
        self.show_report(optimistic, pending=True)
        self.maybe_recompute()
