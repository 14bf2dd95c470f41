"""The freeze map as a table: one row per layer group with a bar in proportion to its parameters.

The trainable part of a bar is drawn in one colour and the frozen part in another, with eighth-cell blocks so
that small groups still show; a cell shared by both parts shows the trainable part in the foreground and the
frozen part as the background.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import DataTable

from engine.views import fold_blocks, format_count

EIGHTHS = " ▏▎▍▌▋▊▉█"
TRAINABLE_STYLE = "green3"
FROZEN_STYLE = "grey46"
HEADERS = {"mark": "", "name": "group", "bar": "size", "total": "params", "trainable": "trainable", "dtype": "dtype"}


def bar(total: int, trainable: int, largest: int, width: int) -> Text:
    """A bar `width` cells long for the largest group, trainable part first."""
    text = Text()
    if total <= 0 or largest <= 0 or width <= 0:
        return text
    length = max(1, round(total / largest * width * 8))
    train = round(length * trainable / total)
    if trainable and not train:
        train = 1
    if trainable < total and train >= length:
        train = length - 1 if length > 1 else length
    full, rest = divmod(train, 8)
    text.append("█" * full, style=TRAINABLE_STYLE)
    frozen = length - train
    if rest:
        shared_background = frozen >= (8 - rest) / 2
        style = f"{TRAINABLE_STYLE} on {FROZEN_STYLE}" if shared_background else TRAINABLE_STYLE
        text.append(EIGHTHS[rest], style=style)
        frozen = max(0, frozen - (8 - rest))
    full, rest = divmod(frozen, 8)
    text.append("█" * full, style=FROZEN_STYLE)
    if rest:
        text.append(EIGHTHS[rest], style=FROZEN_STYLE)
    return text


def group_label(row: dict[str, Any]) -> str:
    """A group's name, with ` (new)` for layers the checkpoint lacks (initialised for the task), as `inspect` shows."""
    return row["name"] + (" (new)" if row.get("new") else "")


def trainable_label(row: dict[str, Any]) -> str:
    """The trainable count, with its share of the group where only part of it trains."""
    partial = 0 < row["trainable"] != row["total"]
    return format_count(row["trainable"]) + (f" ({row['trainable'] / row['total']:.0%})" if partial else "")


def dtype_label(row: dict[str, Any]) -> str:
    return f"{row['dtype']} {row['quantization']}" if row.get("quantization") else row["dtype"]


class FreezeMapTable(DataTable):
    """Rows keyed by group name; `show(report)` redraws from an `inspect_config` report. Runs of alike blocks fold
    into one row (`model.layers.0-31 ×32`) where there are more than `FOLD_OVER` groups (a 12-block BERT stays
    whole, a 32-block 7B folds to 4 rows), unless `fold` says."""

    BAR_MIN, BAR_MAX = 6, 60
    FOLD_OVER = 16

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)
        self.report: dict[str, Any] | None = None
        self.fold: bool | None = None  # None: fold where there are more than FOLD_OVER groups
        self.shown: list[dict[str, Any]] = []  # as shown: groups, or folded runs of them
        self.foldable = False  # the report has runs of alike blocks to fold

    def on_mount(self) -> None:
        self.add_columns_for(bar_width=self.BAR_MIN)

    def add_columns_for(self, bar_width: int) -> None:
        widths = {"mark": 1, "bar": bar_width}
        for key, label in HEADERS.items():
            self.add_column(label, key=key, width=widths.get(key))

    def bar_width(self, rows: list[tuple[str, str, str, str]]) -> int:
        """What is left of the table's width for the bar, given each row's name, params, trainable and dtype cells
        (a column is as wide as its header at least)."""
        headers = [HEADERS[key] for key in ("name", "total", "trainable", "dtype")]
        others = sum(max([len(header)] + [len(cells[index]) for cells in rows]) for index, header in enumerate(headers))
        padding = 2 * len(HEADERS) + 1 + self.styles.scrollbar_size_vertical  # 2 cells a column; the mark
        return max(self.BAR_MIN, min(self.BAR_MAX, self.size.width - others - padding))

    def show(self, report: dict[str, Any]) -> None:
        keep = self.cursor_row
        self.report = report
        folded = fold_blocks(report["layers"])
        self.foldable = len(folded) < len(report["layers"])
        fold = len(report["layers"]) > self.FOLD_OVER if self.fold is None else self.fold
        layers = self.shown = folded if fold else report["layers"]
        largest = max((row["total"] for row in layers), default=0)
        cells = [
            (group_label(row), format_count(row["total"]), trainable_label(row), dtype_label(row)) for row in layers
        ]
        width = self.bar_width(cells)
        self.clear(columns=True)  # columns sized to these rows, not to earlier ones (folded names are longer)
        self.add_columns_for(bar_width=width)
        for row, (name, total, trainable, dtype) in zip(layers, cells, strict=True):
            trains = row["trainable"] > 0
            self.add_row(
                Text("●", style=TRAINABLE_STYLE) if trains else Text("○", style=FROZEN_STYLE),
                Text(name, style="bold" if trains else ""),
                bar(row["total"], row["trainable"], largest, width),
                Text(total, justify="right"),
                Text(trainable, justify="right"),
                dtype,
                key=row["name"],
            )
        if layers:
            self.move_cursor(row=min(keep, len(layers) - 1), animate=False)

    def on_resize(self) -> None:
        if self.report is not None:
            self.show(self.report)

    def highlighted_groups(self) -> list[str]:
        """The groups of the highlighted row: one, or those a folded row stands for."""
        if not self.row_count:
            return []
        row = self.shown[self.cursor_row]
        return row.get("groups", [row["name"]])

    def folded(self) -> bool:
        return self.report is not None and len(self.shown) < len(self.report["layers"])
