"""The setup screen: a preset fills the form, the data preview and report, invalid values shown under their field."""

from __future__ import annotations

import json
import re
from pathlib import Path

from textual.widgets import Collapsible, DataTable, Input, Label, Select, Static
from textual.widgets._collapsible import CollapsibleTitle

from engine.config import field_errors
from tests.tui.conftest import make_app, plain, quickstart, screen_text, wait_for
from tui.form import MISSING, with_value
from tui.screens.dialogs import FilePickerScreen, PresetPickerScreen, SavePresetScreen
from tui.screens.setup import SetupScreen
from tui.widgets.data_report import DataReportView


async def test_quickstart_preset_fills_the_form_and_previews_the_data() -> None:
    app = make_app()
    async with app.run_test(size=(120, 34)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, SetupScreen)
        assert screen.query_one("#f-name", Input).value == "quickstart"
        assert screen.query_one("#f-model-id", Input).value == "builtin:minilm-l6"
        assert screen.query_one("#builtin-models", Select).value == "builtin:minilm-l6"
        assert screen.query_one("#f-data-train", Input).value == "presets/data/quickstart/train.jsonl"
        assert screen.query_one("#f-strategy-kind", Select).value == "full"
        assert screen.query_one("#f-train-lr", Input).value == "0.0001"
        assert screen.query_one("#f-train-gradient_checkpointing", Select).value is False
        assert "320 rows · columns: text, label" in plain(screen.query_one("#preview-status", Label))
        preview = screen.query_one("#preview-table", DataTable)
        assert preview.row_count == 5 and [c.label.plain for c in preview.columns.values()] == ["text", "label"]
        assert screen.query_one("#f-data-label_field", Select).value == "label"
        # strategy options follow the strategy: `full` has none, LoRA shows r/alpha/dropout/targets
        assert not screen.query_one("#row-f-strategy-r").display
        screen.query_one("#f-strategy-kind", Select).value = "lora"
        await pilot.pause()
        assert screen.query_one("#row-f-strategy-r").display
        assert app.setup_data["strategy"]["kind"] == "lora"


async def test_an_invalid_value_is_shown_next_to_its_field_and_blocks_the_start() -> None:
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        lr = screen.query_one("#f-train-lr", Input)
        lr.focus()
        lr.value = ""
        await pilot.press(*"fast")
        await pilot.pause()
        error = screen.query_one("#err-f-train-lr", Label)
        assert error.display
        expected = field_errors(app.setup_data)["train.lr"].removeprefix("train.lr: ")
        assert plain(error) == expected
        assert expected.startswith("Input should be a valid number")
        assert screen.query_one("#row-f-train-lr").has_class("-invalid")
        assert expected in screen_text(app)

        await pilot.press("ctrl+r")  # refused: the app stays on the setup screen, nothing starts
        await pilot.pause()
        assert app.session.history is None and isinstance(app.screen, SetupScreen)

        lr.value = "3e-4"
        await pilot.pause()
        assert not error.display
        assert app.setup_data["train"]["lr"] == 3e-4

        batch = screen.query_one("#f-train-batch_size", Input)
        batch.value = "0"
        await pilot.pause()
        assert plain(screen.query_one("#err-f-train-batch_size", Label)) == (
            "Input should be greater than or equal to 1 (got 0)"
        )


async def test_file_picker_sets_the_data_path(tmp_path: Path) -> None:
    data = tmp_path / "mine.csv"
    data.write_text("sentence,target\ngood,1\nbad,0\nfine,1\n")
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+b")
        await pilot.pause()
        assert isinstance(app.screen, FilePickerScreen)
        app.screen.query_one("#picker-path", Input).focus()
        await pilot.press(*str(data), "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, SetupScreen)
        assert app.setup_data["data"]["train"] == str(data)
        status = plain(app.screen.query_one("#preview-status", Label))
        assert "3 rows · columns: sentence, target" in status
        # the mapping offers the detected columns; the preset's `text` is no column of this file
        text_field = app.screen.query_one("#f-data-text_field", Select)
        text_field.value = "sentence"
        await pilot.pause()
        assert app.setup_data["data"]["text_field"] == "sentence"


async def test_a_loaded_preset_replaces_the_preview_of_the_last_one() -> None:
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        screen = app.screen
        assert "320 rows" in plain(screen.query_one("#preview-status", Label))
        await pilot.press("ctrl+o")
        await pilot.pause()
        options = app.screen.query_one("#preset-list")
        names = [options.get_option_at_index(i).id for i in range(options.option_count)]
        options.highlighted = next(i for i, name in enumerate(names) if name.endswith("distilbert-imdb-head.toml"))
        await pilot.press("enter")
        await pilot.pause()
        assert app.setup_data["data"]["train"] == "imdb"  # a hub dataset: previewed on enter, not on load
        assert plain(screen.query_one("#preview-status", Label)) == ""
        report = plain(screen.query_one("#report-status", Label))
        assert report == "data report: press Enter in the train field to read imdb"  # the one hint
        assert not screen.query_one("#preview-table", DataTable).display


async def test_load_and_save_presets_never_overwriting_without_asking(tmp_path: Path) -> None:
    app = make_app(setup={})
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+o")
        await pilot.pause()
        assert isinstance(app.screen, PresetPickerScreen)
        options = app.screen.query_one("#preset-list")
        names = [options.get_option_at_index(i).id for i in range(options.option_count)]
        options.highlighted = next(i for i, name in enumerate(names) if name.endswith("quickstart.toml"))
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, SetupScreen)
        assert app.setup_data["name"] == "quickstart"
        assert app.screen.query_one("#f-name", Input).value == "quickstart"

        target = tmp_path / "mine.toml"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, SavePresetScreen)
        app.screen.query_one(Input).value = str(target)
        await pilot.press("enter")
        await pilot.pause()
        saved = target.read_text()
        assert 'kind = "full"' in saved

        app.setup_data = {**app.setup_data, "name": "changed"}
        await pilot.press("ctrl+s")
        await pilot.pause()
        app.screen.query_one(Input).value = str(target)
        await pilot.press("enter")
        await pilot.pause()
        assert "Replace it?" in screen_text(app)
        await pilot.press("n")
        await pilot.pause()
        assert target.read_text() == saved
    from engine.config import load_config

    config = load_config(target)
    assert config.name == "quickstart" and Path(config.data.train).is_file()
    assert config.data.train.endswith("presets/data/quickstart/train.jsonl")


def test_the_builtin_model_list_matches_the_engine() -> None:
    from engine.models import BUILTIN_MODELS as ENGINE_BUILTINS
    from tui.form import BUILTIN_MODELS

    assert [name for name, _, _ in BUILTIN_MODELS] == [f"builtin:{name}" for name in ENGINE_BUILTINS]
    for (_, size, task), model in zip(BUILTIN_MODELS, ENGINE_BUILTINS.values(), strict=True):
        assert task == model.task
        number, unit = size.split()
        assert abs(float(number) * {"k": 1e3, "M": 1e6}[unit] - model.approx_params) / model.approx_params < 0.01


async def test_the_data_report_follows_the_setup_and_puts_findings_beside_their_fields(tmp_path: Path) -> None:
    rows = [{"text": f"review {index % 30}", "label": ["neg", "pos"][index % 2]} for index in range(60)]
    rows += [{"text": "", "label": "pos"}, {"text": "long " * 80, "label": "neg"}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    setup = with_value(with_value(quickstart(), "model.id", "builtin:tiny-bert"), "data.train", str(train))
    for key in ("data.validation", "data.test"):
        setup = with_value(setup, key, MISSING)
    app = make_app(with_value(setup, "data.max_length", 32))
    async with app.run_test(size=(80, 24)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        screen = app.screen
        report = screen.query_one(DataReportView)
        status = plain(report.query_one("#report-status", Label))
        assert "data: 55 train, 7 validation rows · classification" in status
        assert "run would refuse: data.validation:" in status and "also occur in train (carved from train" in status
        bars = plain(report.query_one("#report-labels", Static))
        assert "majority-class baseline:" in bars and "neg" in bars and "pos" in bars
        train_warning = screen.query_one("#warn-f-data-train", Label)
        assert train_warning.display
        assert "rows repeat an earlier row" in plain(train_warning) and "data.dedupe = true" in plain(train_warning)
        length_warning = plain(screen.query_one("#warn-f-data-max_length", Label))
        assert "is longer than max_length 32 (50 tokens of text cut off)" in length_warning
        dropped = report.query_one("#report-dropped", Collapsible)
        assert dropped.title == "1 row left out (Enter: why)" and dropped.collapsed
        dropped.query_one(CollapsibleTitle).focus()
        await pilot.press("enter")
        await pilot.pause()
        assert not dropped.collapsed
        assert plain(report.query_one("#report-reasons", Static)).startswith("train: 1 empty text (row 61)")

        screen.query_one("#f-data-max_length", Input).value = "128"  # a change: the report follows
        await wait_for(pilot, lambda: "(max_length 128)" in plain(report.query_one("#report-status", Label)))
        await wait_for(pilot, lambda: not screen.query_one("#warn-f-data-max_length", Label).display)


async def test_the_data_report_shows_a_causal_example_with_its_loss_tokens(tmp_path: Path) -> None:
    rows = [{"instruction": f"Say {word}.", "input": "", "output": word} for word in ("hi", "yes", "no", "ok")] * 3
    train, validation = tmp_path / "alpaca.json", tmp_path / "validation.json"
    train.write_text(json.dumps([{**row, "output": f"{row['output']} {index}"} for index, row in enumerate(rows)]))
    validation.write_text(json.dumps([{"instruction": "Say bye.", "input": "", "output": "bye"}]))
    setup = {
        "name": "causal",
        "model": {"id": "builtin:tiny-llama"},
        "data": {"train": str(train), "validation": str(validation)},
    }
    app = make_app(setup)
    async with app.run_test(size=(80, 24)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        report = app.screen.query_one(DataReportView)
        example = report.query_one("#report-example", Static)
        assert example.display
        text = example.visual
        shown = text.plain if hasattr(text, "plain") else str(text)
        assert "### Instruction:\nSay hi.\n\n### Response:\nhi 0</s>" in shown
        loss = "".join(shown[span.start : span.end] for span in text.spans if "green" in str(span.style))
        assert loss == "hi 0</s>"


async def test_at_80x24_a_long_error_shows_whole_under_its_field_and_yes_no_fields_say_their_state() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        seed = app.screen.query_one("#f-train-seed", Input)
        seed.focus()  # near the end of the form; the problem summary that appears on top pushes the form down
        seed.value = ""
        await pilot.press(*"abc")
        await pilot.pause()
        await pilot.pause()
        expected = field_errors(app.setup_data)["train.seed"].removeprefix("train.seed: ")
        lines = screen_text(app).splitlines()
        row = next(index for index, line in enumerate(lines) if line.startswith(" seed "))
        assert " ".join(line.strip() for line in lines[row + 1 : row + 3]) == expected  # two lines at 80
        assert all(line.startswith(" " * 18) for line in lines[row + 1 : row + 3])

        app.screen.query_one("#f-train-gradient_checkpointing", Select).focus()
        await pilot.pause()
        assert re.search(r"grad checkpoint +off", screen_text(app))
        await pilot.press("enter", "down", "enter")
        await pilot.pause()
        assert app.setup_data["train"]["gradient_checkpointing"] is True
        assert re.search(r"grad checkpoint +on", screen_text(app))


async def test_at_80x24_the_file_and_preset_pickers_show_whole() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+b")
        await pilot.pause()
        assert isinstance(app.screen, FilePickerScreen)
        assert "or type a path and press enter" in screen_text(app)  # the path field under the tree
        await pilot.press("escape", "ctrl+o")
        await pilot.pause()
        assert isinstance(app.screen, PresetPickerScreen)
        lines = screen_text(app).splitlines()
        first = next(line for line in lines if "features from frozen DistilBERT" in line)
        wrapped = lines[lines.index(first) + 1]  # the description's second line, under its first
        assert wrapped.index("regression (Raschka") == first.index("DistilBERT on IMDB"), (first, wrapped)
