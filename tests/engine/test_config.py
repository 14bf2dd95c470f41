"""Run config: TOML presets, `--set` overrides, and one-line errors naming the field."""

from pathlib import Path

import pytest

from engine.cli import preset_keys
from engine.config import ConfigError, build_config, load_config, parse_override
from engine.presets import bundled_presets


def test_every_bundled_preset_validates() -> None:
    presets = bundled_presets()
    assert {p.stem for p in presets} >= {
        "quickstart",
        "distilbert-imdb-feature",
        "distilbert-imdb-head",
        "distilbert-imdb-last-layers",
        "distilbert-imdb-full",
        "distilbert-imdb-lora",
        "llama2-7b-qlora-alpaca",
    }
    for path in presets:
        config = load_config(path)
        assert config.name == path.stem


def test_qlora_preset_matches_the_seed_recipe() -> None:
    config = load_config(next(p for p in bundled_presets() if p.stem == "llama2-7b-qlora-alpaca"))
    assert (config.strategy.r, config.strategy.alpha, config.strategy.dropout) == (64, 16, 0.1)
    assert (config.train.lr, config.train.batch_size, config.train.grad_accum) == (2e-4, 4, 4)
    assert (config.train.max_steps, config.data.max_length, config.strategy.quant_type) == (500, 512, "nf4")


def test_preset_relative_paths_resolve_against_the_preset_folder(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n')
    preset = tmp_path / "p.toml"
    preset.write_text('[data]\ntrain = "train.jsonl"\ntest = "imdb-test-split-name"\n')
    config = load_config(preset)
    assert config.data.train == str((tmp_path / "train.jsonl").resolve())
    assert config.data.test == "imdb-test-split-name"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train.lr=2e-4", 2e-4),
        ("train.epochs=8", 8),
        ("train.gradient_checkpointing=true", True),
        ('strategy.target_modules=["q_proj","v_proj"]', ["q_proj", "v_proj"]),
        ("model.id=builtin:tiny-bert", "builtin:tiny-bert"),
        ("data.train=../shared/data/x.jsonl", "../shared/data/x.jsonl"),
    ],
)
def test_override_values_are_toml_when_they_parse(text: str, expected: object) -> None:
    assert parse_override(text)[1] == expected


def test_overrides_reach_every_section() -> None:
    config = build_config(
        {}, ["strategy.kind=dora", "strategy.r=4", "train.max_steps=3", "name=x", "model.num_labels=3"]
    )
    assert (config.strategy.kind, config.strategy.r, config.train.max_steps, config.name) == ("dora", 4, 3, "x")
    assert config.model.num_labels == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1"], "train.lrr: unknown key"),
        (["strategy.r=0"], "strategy.r: Input should be greater than or equal to 1 (got 0)"),
        (["train.lr=fast"], "train.lr: Input should be a valid number"),
        (["strategy.kind=magic"], "strategy.kind: Input should be"),
        (["train.precision=fp16"], "train.precision: pure fp16 training diverges"),
        (["strategy.target_modules=some"], 'strategy.target_modules: must be "auto", "all-linear"'),
        (["strategy.kind=feature", "model.task=causal"], "feature needs model.task = classification"),
        (["train"], "expected section.key=value"),
        (["train.lr.x=1"], "lr is not a section"),
        (["train.metric_for_best_model=bleu"], "train.metric_for_best_model: 'bleu' is not a validation metric"),
        (["train.metric_for_best_model=loss", "train.eval_steps=5"], "set train.save_steps equal to train.eval_steps"),
        (["train.metric_for_best_model=generation_exact"], "generation_exact is computed only with"),
        (["model.task=causal", "train.metric_for_best_model=f1"], "a causal run has no f1; use loss"),
        (["strategy.kind=feature", "train.metric_for_best_model=f1"], "the feature strategy fits its classifier once"),
    ],
)
def test_bad_values_are_one_line_naming_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({"train": {"lr": 1e-4}}, overrides)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    preset = tmp_path / "bad.toml"
    preset.write_text('name = "x"\n[train\nlr = 1\n')
    with pytest.raises(ConfigError, match=r"bad.toml: TOML syntax error: .*line 2, column"):
        load_config(preset)


def test_readme_documents_every_preset_key() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    missing = [key for key, _, _ in preset_keys() if f"| `{key}` |" not in readme]
    assert not missing, f"README lacks preset keys: {missing}"
