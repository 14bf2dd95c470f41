"""The setup screen's data report: what the picked data holds, as training will see it (`engine.data_report`).

It is computed in a thread worker whenever a data field, the model or the seed changes (after a short pause in
typing), for local files only; a hub dataset is read when Enter is pressed in the train field, as for the preview.
It shows the rows per split, the label bars with the majority-class baseline, the length histogram with the
`max_length` marker, the rows left out (their reasons a key away: Enter on the collapsed line) and, for causal
data, one example with the tokens that carry the loss highlighted. What it finds goes up to the screen as a
`DataFindings` message, which puts each finding beside the field it concerns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.timer import Timer
from textual.widgets import Collapsible, Label, Static

from tui.form import FIELDS_BY_KEY, MISSING, effective_value, get_value, with_value
from tui.heavy import load_engine
from tui.messages import DataFindings, DataReportComputed

# the inputs of `engine.data_report.build_report`: a change to any of them means a new report
REPORT_KEYS = ("model.id", "model.task", "model.revision", "model.trust_remote_code", "data", "train.seed")
PAUSE_S = 0.4  # typing pause before a changed setup is reported
SHOWN_LABELS = 8
BAR_WIDTH = 30


def report_data(setup: dict[str, Any]) -> dict[str, Any]:
    """The part of the setup that the report reads."""
    result: dict[str, Any] = {}
    for key in REPORT_KEYS:
        value = get_value(setup, key)
        if value is not MISSING:
            result = with_value(result, key, value)
    return result


class DataReportView(Vertical):
    """The report of the setup's data, recomputed as the setup changes (`request`)."""

    DEFAULT_CSS = """
    DataReportView {
        height: auto;
        margin-top: 1;
    }
    DataReportView #report-status, DataReportView #report-labels, DataReportView #report-example {
        width: 100%;
        height: auto;
    }
    DataReportView #report-lengths {
        height: 9;
    }
    DataReportView #report-lengths LengthChart {
        height: 100%;
    }
    DataReportView #report-dropped {
        background: transparent;
        border-top: none;
        padding: 0;
    }
    DataReportView #report-dropped Contents {
        padding: 0 0 0 2;
    }
    DataReportView .-hidden {
        display: none;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.report: Any = None
        self.computed_key: str | None = None
        self.pending_key: str | None = None
        self._timer: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Label("", id="report-status", classes="dim")
        yield Static("", id="report-labels", classes="-hidden")
        yield Vertical(id="report-lengths", classes="-hidden")  # the chart is mounted with the first report
        with Collapsible(title="", id="report-dropped", classes="-hidden"):
            yield Static("", id="report-reasons")
        yield Static("", id="report-example", classes="-hidden")

    def request(self, setup: dict[str, Any], *, force: bool = False, pause: bool = True) -> None:
        """Report the data of `setup` unless it is reported (or being reported) already; a hub dataset only when
        `force`d. After `pause` seconds without another request (typing), or at once."""
        from engine.config import build_config, field_errors

        data = report_data(setup)
        key = json.dumps(data, sort_keys=True, default=str)
        if not force and key in (self.computed_key, self.pending_key):
            return
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        status = self.query_one("#report-status", Label)
        source = str(effective_value(setup, "data.train") or "").strip()
        errors = field_errors(data)
        if not source or errors:
            self._clear("data report: fix the setup first" if source else "data report: pick the train data")
            return
        if not force and not Path(source).expanduser().is_file():
            self._clear(f"data report: press Enter in the train field to read {source}")
            return
        self.pending_key = key
        status.update(f"reading the data as training will ({effective_value(setup, 'model.id')}'s tokenizer)…")
        config = build_config(data)
        if pause:
            self._timer = self.set_timer(PAUSE_S, lambda: self._compute(config, key))
        else:
            self._compute(config, key)

    def _clear(self, status: str) -> None:
        self.pending_key = self.computed_key = None
        self.report = None
        self.query_one("#report-status", Label).update(status)
        for widget_id in ("#report-labels", "#report-lengths", "#report-dropped", "#report-example"):
            self.query_one(widget_id).add_class("-hidden")
        self.post_message(DataFindings({}))

    @work(thread=True, exclusive=True, exit_on_error=False, group="data-report", name="data report")
    def _compute(self, config: Any, key: str) -> None:
        load_engine()
        from engine.config import ConfigError
        from engine.data_report import build_report

        try:
            report = build_report(config)
        except ConfigError as exc:
            self.post_message(DataReportComputed(key, error=str(exc)))
            return
        self.post_message(DataReportComputed(key, report))

    def on_data_report_computed(self, message: DataReportComputed) -> None:
        if message.key != self.pending_key:
            return  # an older request
        if message.report is None:
            self._clear(f"[b $error]data:[/] {message.error}")
        else:
            self.show(message.report)
        self.pending_key, self.computed_key = None, message.key

    def failed(self, message: str) -> None:
        """The worker raised something unexpected: say so, keep the app alive."""
        self._clear(f"[b $error]data report failed:[/] {message}")

    def show(self, report: Any) -> None:
        from engine.data_report import length_histogram

        self.report = report
        self.query_one("#report-status", Label).update(_status(report))
        labels = self.query_one("#report-labels", Static)
        labels.set_class(report.task != "classification", "-hidden")
        if report.task == "classification":
            labels.update(_label_bars(report))
        train = report.splits["train"]
        holder = self.query_one("#report-lengths", Vertical)
        holder.set_class(not len(train.lengths), "-hidden")
        if len(train.lengths):
            from tui.widgets.length_chart import LengthChart  # textual-plotext: not needed for the first paint

            chart = next(iter(holder.query(LengthChart)), None)
            if chart is None:
                chart = LengthChart()
                holder.mount(chart)
            chart.show(length_histogram(train.lengths, report.max_length), report.max_length)
        dropped = sum(split.dropped_count for split in report.splits.values())
        collapsible = self.query_one("#report-dropped", Collapsible)
        collapsible.set_class(not dropped, "-hidden")
        collapsible.title = f"{dropped:,} row{'s' if dropped > 1 else ''} left out (Enter: why)"
        self.query_one("#report-reasons", Static).update(_reasons(report))
        example = self.query_one("#report-example", Static)
        example.set_class(report.example is None, "-hidden")
        if report.example is not None:
            example.update(_example(report.example))
        findings: dict[str, Text] = {}
        for finding in report.findings:
            text = findings.setdefault(finding.field, Text())
            if text:
                text.append("\n")
            if finding.blocking:
                text.append("run refuses: ", style="bold red")
            text.append(finding.message)
        self.post_message(DataFindings(findings))


def _status(report: Any) -> Text:
    rows = ", ".join(f"{split.rows:,} {role}" for role, split in report.splits.items())
    text = Text.from_markup(f"[b]data:[/] {rows} rows · {report.task}")
    percentiles = report.splits["train"].percentiles()
    if percentiles is not None:
        text.append(f" · 95 % of train within {percentiles['95']} tokens (max_length {report.max_length})")
    if report.error:
        text.append("\nrun would refuse: ", style="bold red")
        text.append(report.error)
    for finding in report.findings:  # those about a setting the form does not show
        if not finding.blocking and finding.field not in FIELDS_BY_KEY:
            text.append(f"\n{finding.message}", style="yellow")
    return text


def _label_bars(report: Any) -> Text:
    train = report.splits["train"].labels or {}
    largest = max(train.values(), default=0) or 1
    total = sum(train.values()) or 1
    names = sorted(train, key=lambda name: -train[name])[:SHOWN_LABELS]
    width = max((len(name) for name in names), default=0)
    text = Text()
    for name in names:
        count = train[name]
        text.append(f"{name[:20]:<{min(width, 20)}} ")
        text.append("█" * max(1 if count else 0, round(BAR_WIDTH * count / largest)), style="cyan")
        text.append(f" {count:,} ({count / total:.0%})\n")
    if len(train) > len(names):
        text.append(f"... {len(train) - len(names)} more labels\n")
    baselines = [
        f"{value:.1%} on {role}"
        for role in report.splits
        if role != "train" and (value := report.baseline(role)) is not None
    ]
    if baselines:
        text.append("majority-class baseline: " + ", ".join(baselines), style="dim")
    return text


def _reasons(report: Any) -> Text:
    from engine.data_report import row_numbers

    text = Text()
    for role, split in report.splits.items():
        for reason, info in split.dropped.items():
            text.append(f"{role}: {info['count']:,} {reason} ({row_numbers(info)})\n")
    text.rstrip()
    return text


def _example(pieces: list[tuple[str, bool]]) -> Text:
    text = Text("example as trained (loss tokens highlighted):\n", style="bold")
    for piece, loss in pieces:
        text.append(piece, style="bold green underline" if loss else "dim")
    return text
