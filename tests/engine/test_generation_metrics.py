"""The metrics of `eval --generate` and training's generation metric, on real GSM8K answers where numbers count."""

from __future__ import annotations

import json
import random

import pytest

from engine.generation_metrics import (
    OUTSIDE,
    confidence_interval,
    contains,
    default_metric,
    exact,
    final_number,
    label_scores,
    last_number,
    normalise,
    number,
    rouge_l,
    score_answers,
)
from tests.conftest import SHARED, needs_shared

GSM8K = SHARED / "data" / "gsm8k" / "train.jsonl"


def gsm8k_answers(count: int) -> list[str]:
    with GSM8K.open(encoding="utf-8") as lines:
        return [json.loads(next(lines))["answer"] for _ in range(count)]


def test_normalise_ignores_case_whitespace_and_punctuation() -> None:
    assert normalise("  The  ANSWER is:\n\t“Paris”! ") == "the answer is paris"
    assert exact("Positive.", "positive") == 1.0
    assert exact("positive review", "positive") == 0.0
    assert contains("I think it is Positive, really", "positive") == 1.0
    assert contains("impositive", "positive") == 0.0  # whole words only
    assert contains("anything", "") == 0.0


@needs_shared
def test_final_number_of_real_gsm8k_answers() -> None:
    answers = gsm8k_answers(400)
    assert final_number(answers[0]) == 72  # "... #### 72"
    assert final_number(answers[1]) == 10
    with_commas = next(answer for answer in answers if "#### 1,080" in answer)
    assert final_number(with_commas) == 1080
    for answer in answers:
        written = answer.rsplit("####", 1)[1].strip().replace(",", "")
        assert final_number(answer) == float(written)
        assert number(f"{answer.rsplit('####', 1)[0]}So the answer is {written}.", answer) == 1.0
        assert number(f"So the answer is {float(written) + 1:g}.", answer) == 0.0
    assert default_metric(answers) == "number"


def test_number_takes_the_last_number_of_the_generation() -> None:
    assert last_number("48/2 = 24 clips, then 48 + 24 = 72.") == 72
    assert last_number("She earned $1,250.50 in total.") == 1250.5
    assert last_number("The change is -3 degrees") == -3
    assert last_number("no digits here") is None
    assert number("So the answer is 72.", "#### 72") == 1.0
    assert number("The answer is 72, not 73", "#### 72") == 0.0
    assert number("nothing", "#### 72") == 0.0
    assert number("1,080 apples", "some work\n#### 1,080") == 1.0


def test_rouge_l_comes_from_rouge_score() -> None:
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("completely different words", "the cat sat on the mat") == 0.0
    assert 0.5 < rouge_l("the cats sat on a mat", "the cat sat on the mat") < 1.0  # stemmed: cats = cat


def test_default_metric_follows_the_references() -> None:
    assert default_metric(["positive", "negative", "very negative"]) == "exact"
    assert default_metric(["Paris is the capital of France, on the Seine."]) == "rouge_l"
    assert default_metric(["work\n#### 4", "short"]) == "exact"


def test_wilson_interval_for_small_sets_and_bootstrap_for_rouge() -> None:
    interval = confidence_interval([1.0] * 8 + [0.0] * 2)
    assert interval.method == "wilson"
    assert interval.low == pytest.approx(0.4902, abs=1e-3)  # Wilson 95 % for 8 of 10
    assert interval.high == pytest.approx(0.9433, abs=1e-3)
    assert confidence_interval([1.0] * 5).high == 1.0
    draw = random.Random(1)
    scores = [draw.random() for _ in range(50)]
    spread = confidence_interval(scores)
    assert spread.method == "bootstrap"
    assert spread.low < sum(scores) / 50 < spread.high
    assert spread == confidence_interval(scores)  # seeded


def test_score_answers_means_each_rows_score() -> None:
    scored = score_answers("exact", ["Yes", "no", "maybe"], ["yes", "yes", "maybe"])
    assert scored.scores == [1.0, 0.0, 1.0]
    assert scored.score == pytest.approx(2 / 3)
    assert scored.rows == 3


def test_label_scores_count_answers_outside_the_set_as_wrong() -> None:
    words = ["negative", "positive"]
    outputs = ["Positive.", "negative", "I am not sure", "positive"]
    references = ["positive", "negative", "negative", "negative"]
    scores = label_scores(outputs, references, words)
    assert scores.predicted == ["positive", "negative", OUTSIDE, "positive"]
    assert scores.accuracy == 0.5
    assert scores.outside == 1
    # negative: precision 1/1, recall 1/3 -> 0.5; positive: precision 1/2, recall 1/1 -> 2/3
    assert scores.f1 == pytest.approx((0.5 + 2 / 3) / 2)
