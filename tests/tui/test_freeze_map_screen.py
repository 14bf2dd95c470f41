"""The freeze map screen: the engine's inspect report, recomputed as the strategy changes; rows toggle to custom."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

from textual.widgets import Input, Select, Static

from engine.cli import main as cli_main
from engine.config import build_config, load_config
from engine.inspect import inspect_config
from engine.views import format_bytes
from tests.conftest import needs_shared
from tests.tui.conftest import make_app, plain, quickstart, screen_text
from tui.form import with_value
from tui.screens.freeze_map import FreezeMapScreen, map_data
from tui.widgets.freeze_table import FreezeMapTable, bar, dtype_label


def cli_inspect(*args: str) -> dict:
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main(["inspect", *args, "--json"]) == 0
    return json.loads(out.getvalue())


async def open_map(app, pilot) -> FreezeMapScreen:  # type: ignore[no-untyped-def]
    await pilot.press("f2")
    await app.workers.wait_for_complete()
    await pilot.pause()
    assert isinstance(app.screen, FreezeMapScreen)
    return app.screen


async def test_quickstart_map_equals_inspect_json_and_follows_the_strategy() -> None:
    app = make_app()
    async with app.run_test(size=(120, 34)) as pilot:
        screen = await open_map(app, pilot)
        expected = cli_inspect("quickstart")
        assert screen.report is not None
        for key in ("total_params", "trainable_params", "trainable_percent", "layers", "memory"):
            assert screen.report[key] == expected[key], key
        totals = plain(screen.query_one("#fm-totals", Static))
        assert f"total {expected['total_params']:,} parameters" in totals
        assert f"trainable {expected['trainable_params']:,} (100 %)" in totals
        assert screen.query_one(FreezeMapTable).row_count == len(expected["layers"]) == 9

        screen.query_one("#fm-kind", Select).value = "last_layers"
        await app.workers.wait_for_complete()
        await pilot.pause()
        option = screen.query_one("#fm-option", Input)
        assert option.display and option.value == "2"
        assert app.setup_data["strategy"]["kind"] == "last_layers"
        expected = cli_inspect("quickstart", "--strategy", "last_layers")
        assert screen.report["trainable_params"] == expected["trainable_params"] < expected["total_params"]
        assert f"trainable {expected['trainable_params']:,}" in plain(screen.query_one("#fm-totals", Static))

        option.value = "4"
        await app.workers.wait_for_complete()
        await pilot.pause()
        more = cli_inspect("quickstart", "--strategy", "last_layers", "--set", "strategy.layers=4")
        assert screen.report["trainable_params"] == more["trainable_params"] > expected["trainable_params"]

        screen.query_one("#fm-kind", Select).value = "lora"
        await app.workers.wait_for_complete()
        await pilot.pause()
        lora = cli_inspect("quickstart", "--strategy", "lora")
        assert screen.report["trainable_params"] == lora["trainable_params"]
        assert "rank r" in screen_text(app)


async def test_toggling_rows_trains_exactly_those_groups_with_the_custom_strategy(tmp_path: Path) -> None:
    setup = with_value(with_value(quickstart(), "model.id", "builtin:tiny-bert"), "strategy.kind", "head")
    app = make_app(setup)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_map(app, pilot)
        table = screen.query_one(FreezeMapTable)
        names = [row["name"] for row in screen.report["layers"]]
        assert [row["name"] for row in screen.report["layers"] if row["trainable"]] == ["bert.pooler", "classifier"]
        table.move_cursor(row=names.index("bert.encoder.layer.3"))
        await pilot.press("space")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.setup_data["strategy"]["kind"] == "custom"
        assert app.setup_data["strategy"]["trainable"] == ["bert.encoder.layer.3", "bert.pooler", "classifier"]
        expected = inspect_config(build_config(map_data(app.setup_data)))
        assert screen.report == expected
        assert [row["name"] for row in expected["layers"] if row["trainable"]] == app.setup_data["strategy"][
            "trainable"
        ]
        assert screen.query_one("#fm-kind", Select).value == "custom"

        table.move_cursor(row=names.index("bert.pooler"))
        await pilot.press("space")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.setup_data["strategy"]["trainable"] == ["bert.encoder.layer.3", "classifier"]
        assert screen.report["trainable_params"] == sum(
            row["total"] for row in screen.report["layers"] if row["name"] in ("bert.encoder.layer.3", "classifier")
        )
        # the saved setup records the custom strategy, and the CLI maps it identically
        payload = json.dumps(app.setup_data["strategy"]["trainable"])
        cli = cli_inspect(
            "--model", "builtin:tiny-bert", "--strategy", "custom", "--set", f"strategy.trainable={payload}",
            "--set", "model.task=classification", "--set", "data.max_length=64",
        )  # fmt: skip
        assert cli["trainable_params"] == screen.report["trainable_params"]
        assert cli["total_params"] == screen.report["total_params"]

        await pilot.press("ctrl+s")  # a saved preset records the hand-picked groups
        app.screen.query_one(Input).value = str(tmp_path / "picked.toml")
        await pilot.press("enter")
    saved = load_config(tmp_path / "picked.toml")
    assert (saved.strategy.kind, saved.strategy.trainable) == ("custom", ["bert.encoder.layer.3", "classifier"])


async def test_a_strategy_that_does_not_fit_the_model_is_reported_on_the_map() -> None:
    setup = with_value(with_value(quickstart(), "strategy.kind", "last_layers"), "strategy.layers", 9)
    app = make_app(setup)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_map(app, pilot)
        assert "strategy.layers: 9 is more than the model's 6 blocks" in plain(screen.query_one("#fm-status"))


def test_bars_are_proportional_with_trainable_and_frozen_parts() -> None:
    full = bar(100, 100, 100, 10)
    assert full.plain == "█" * 10 and {span.style for span in full.spans} == {"green3"}
    half = bar(100, 50, 100, 10)
    assert half.plain == "█" * 10 and [span.style for span in half.spans] == ["green3", "grey46"]
    small = bar(1, 0, 1000, 10)
    assert small.plain == "▏"  # a tiny group still shows
    assert len(bar(500, 0, 1000, 10).plain) == 5


async def test_at_80x24_new_layers_say_so_and_the_memory_sum_shows_whole() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_map(app, pilot)
        assert screen.report is not None
        new = {row["name"] for row in cli_inspect("quickstart")["layers"] if row.get("new")}
        assert new == {"classifier"}  # the task's head; MiniLM's checkpoint has the rest
        lines = [line.rstrip() for line in screen_text(app).splitlines()]
        for row in screen.report["layers"]:
            line = next(line for line in lines if line[4:].startswith(f"{row['name']} "))
            assert ("(new)" in line) == (row["name"] in new), line
        memory = {part: format_bytes(screen.report["memory"][f"{part}_bytes"]) for part in ("weights", "gradients",
                  "optimizer", "activations", "total")}  # fmt: skip
        first = f" memory {memory['total']} = weights {memory['weights']} + gradients {memory['gradients']}"
        assert first in lines
        assert (
            lines[lines.index(first) + 1].strip()
            == f"+ optimizer {memory['optimizer']} + activations {memory['activations']}"
        )


@needs_shared
async def test_a_7b_map_folds_its_32_blocks_and_fits_80_columns(shared_configs: Path) -> None:
    llama = str(shared_configs / "meta-llama__Llama-2-7b-hf")
    setup = with_value(with_value(quickstart(), "model.id", llama), "model.task", "causal")
    app = make_app(with_value(setup, "strategy.kind", "qlora"))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_map(app, pilot)
        assert screen.report is not None and len(screen.report["layers"]) == 35
        lines = [line.rstrip() for line in screen_text(app).splitlines()]
        assert lines[2] == " meta-llama__Llama-2-7b-hf · qlora · 35 groups · space toggles · f unfolds"  # one line
        rows = [line for line in lines[4:] if line[4:].startswith(("model.", "lm_head"))]
        assert [row[4:].split("  ")[0] for row in rows] == [
            "model.embed_tokens", "model.layers.0-31 ×32", "model.norm", "lm_head",
        ]  # fmt: skip
        blocks = [row for row in screen.report["layers"] if row["name"].startswith("model.layers.")]
        assert rows[1].endswith(f"{sum(row['total'] for row in blocks):,}  4,194,304 (0%)  float32 nf4")
        await pilot.press("down", "space")  # a folded row toggles the groups it stands for: their adapters off
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert (app.setup_data["strategy"]["kind"], app.setup_data["strategy"]["trainable"]) == ("custom", [])
        table = screen.query_one(FreezeMapTable)
        shown = [line.rstrip() for line in screen_text(app).splitlines() if line[4:].startswith(("model.", "lm_head"))]
        assert [line.endswith(dtype_label(row)) for line, row in zip(shown, table.shown, strict=True)] == [True] * 4
        await pilot.press("space")  # and on again, whole
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.setup_data["strategy"]["trainable"] == [row["name"] for row in blocks]
        await pilot.press("f")
        await pilot.pause()
        lines = [line.rstrip(" ▁▂▃▄▅▆▇█") for line in screen_text(app).splitlines()]  # no scrollbar
        assert lines[2].endswith("35 groups · space toggles · f folds")
        assert lines[5][4:].startswith("model.layers.0 ") and lines[5].endswith("float32")
