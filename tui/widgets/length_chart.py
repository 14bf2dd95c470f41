"""The data report's length histogram, in its own module: textual-plotext loads with the first report, not
with the first paint of the setup screen."""

from __future__ import annotations

from textual_plotext import PlotextPlot


class LengthChart(PlotextPlot):
    """Token lengths of the train examples (before truncation) in bins, with a line at `data.max_length`."""

    def show(self, bins: list[tuple[str, int, bool]], max_length: int) -> None:
        plt = self.plt
        plt.clear_figure()
        plt.title(f"train examples per token-length bin (≤ tick) · red: over max_length {max_length}")
        below = [index for index, (_, _, beyond) in enumerate(bins, start=1) if not beyond]
        colors = ["green" if not beyond else "red" for _, _, beyond in bins]
        positions = list(range(1, len(bins) + 1))
        plt.bar(positions, [count for _, count, _ in bins], color=colors, width=0.6)
        plt.xticks(positions, [label.split("-")[-1] for label, _, _ in bins])  # upper bounds: short, never crowded
        if len(below) < len(bins):
            plt.vline(len(below) + 0.5, "red")
        self.refresh()
