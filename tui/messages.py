"""Every Textual message of the app, in one place: what workers and the live run tell the screens.

Workers never touch widgets: they post one of these, and the screen or the app that handles it updates what is
shown ("attributes down, messages up").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual.message import Message

from engine.runs import RunInfo

if TYPE_CHECKING:
    from rich.text import Text

    from tui.sink import MessageSink


class EngineEvents(Message):
    """Engine events of the live run are waiting in `sink`; `sink.drain()` takes them (at most one in flight)."""

    def __init__(self, sink: MessageSink) -> None:
        super().__init__()
        self.sink = sink


class AnswerEvents(Message):
    """Generation events of the try screen are waiting in `sink` (`sink.drain()`); handled by that screen alone."""

    bubble = False

    def __init__(self, sink: MessageSink) -> None:
        super().__init__()
        self.sink = sink


class ExportEvents(Message):
    """Export progress events are waiting in `sink` (`sink.drain()`); handled by the export dialog alone."""

    bubble = False

    def __init__(self, sink: MessageSink) -> None:
        super().__init__()
        self.sink = sink


class RunEnded(Message):
    """The live run's worker is done (the sink has already delivered the run's last event)."""

    def __init__(self, run_id: int) -> None:
        super().__init__()
        self.run_id = run_id


class RunDetached(Message):
    """A detached run's process started, training `run_dir`."""

    def __init__(self, run_id: int, run_dir: Path) -> None:
        super().__init__()
        self.run_id, self.run_dir = run_id, run_dir


class PreviewReady(Message):
    """The data preview worker read `source` (or failed with `error`)."""

    def __init__(
        self,
        source: str,
        *,
        columns: list[str] | None = None,
        num_rows: int = 0,
        rows: list[dict[str, Any]] | None = None,
        error: str | None = None,
    ) -> None:
        super().__init__()
        self.source, self.columns, self.num_rows = source, columns or [], num_rows
        self.rows, self.error = rows or [], error


class DataReportComputed(Message):
    """The data-report worker's report (or the one-line error) for the setup `key`."""

    def __init__(self, key: str, report: Any = None, error: str | None = None) -> None:
        super().__init__()
        self.key, self.report, self.error = key, report, error


class DataFindings(Message):
    """The data report's findings as text by the config key they concern ({} when there is no report); what `run`
    would refuse is marked so."""

    def __init__(self, findings: dict[str, Text]) -> None:
        super().__init__()
        self.findings = findings


class FreezeMapComputed(Message):
    """The freeze-map worker mapped the setup whose map key is `key` (or failed with `error`)."""

    def __init__(self, key: str, report: dict[str, Any] | None, error: str | None = None) -> None:
        super().__init__()
        self.key, self.report, self.error = key, report, error


class RunsListed(Message):
    """The run folders under `folder`, newest first."""

    def __init__(self, folder: Path, runs: list[RunInfo]) -> None:
        super().__init__()
        self.folder, self.runs = folder, runs


class TryLoaded(Message):
    """The try screen's worker loaded the run (`loaded`: an `engine.inference.loading.LoadedRun`), or failed."""

    def __init__(self, loaded: Any | None, error: str | None = None) -> None:
        super().__init__()
        self.loaded, self.error = loaded, error


class LabelsAnswered(Message):
    """A classifier's label probabilities for the try screen's text."""

    def __init__(self, probabilities: dict[str, float]) -> None:
        super().__init__()
        self.probabilities = probabilities


class ExportDone(Message):
    """The export dialog's worker finished: `result` (an `engine.inference.export.ExportResult`), or `error`."""

    def __init__(self, result: Any | None, error: str | None = None) -> None:
        super().__init__()
        self.result, self.error = result, error


@dataclass(frozen=True)
class SetupChanged:
    """What `app.setup_signal` carries: the setup changed; `origin` made the change (and shows it already), None
    when a whole new setup replaced it (a loaded preset)."""

    origin: object | None
