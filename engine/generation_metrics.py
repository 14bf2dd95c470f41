"""Scoring generated answers against references: the metrics of `finetui eval --generate` and of training's
`train.generation_metric`.

Each metric scores one (output, reference) pair from 0 to 1, so a set's score is the mean and a confidence
interval says how far a small set can be trusted: Wilson's score interval for the 0/1 metrics (exact, contains,
number), a seeded percentile bootstrap for rouge_l. `number` follows GSM8K's convention (the reference's final
answer after `####`); `rouge_l` is Google's rouge-score package, never a hand-written one. Labels as words
(`data.label_words`) are scored as a classifier is: accuracy and macro-F1 over the label set, with answers outside
it counted as wrong. Nothing here needs torch, so the CLI checks and the training loop both use it.
"""

from __future__ import annotations

import math
import random
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

METRICS = ("exact", "contains", "number", "rouge_l")
METRIC_PREFIX = "generation_"
"""A generation metric among a run's validation metrics is `generation_<metric>` (`train.generation_metric`)."""
COST_KEY = "generation_s"
"""The validation metric holding the seconds an evaluation spent generating."""
Z_95 = 1.959964  # the normal quantile of a two-sided 95 % interval
BOOTSTRAP_RESAMPLES = 2000
SHORT_LABEL_WORDS = 3  # references of at most this many words are labels: scored by exact match
_NUMBER = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")
_FINAL_ANSWER = re.compile(r"####\s*(\S+)\s*$")
_PUNCTUATION = str.maketrans("", "", string.punctuation + "“”‘’«»…–—")


def normalise(text: str) -> str:
    """Text as compared by `exact` and `contains`: Unicode NFKC, case-folded, punctuation removed, runs of
    whitespace as one space."""
    folded = unicodedata.normalize("NFKC", text).casefold().translate(_PUNCTUATION)
    return " ".join(folded.split())


def exact(output: str, reference: str) -> float:
    return float(normalise(output) == normalise(reference))


def contains(output: str, reference: str) -> float:
    """1 when the normalised reference occurs in the normalised output as whole words."""
    wanted = normalise(reference)
    return float(bool(wanted) and f" {wanted} " in f" {normalise(output)} ")


def parse_number(text: str) -> float | None:
    """A number as people write it (`1,080`, `$12`, `-3.5`, `7.`), or None."""
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "")
    try:
        return float(cleaned)
    except ValueError:
        return None


def last_number(text: str) -> float | None:
    """The last number in a text (a model's final answer), or None when it has none."""
    found = _NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def final_number(reference: str) -> float | None:
    """A reference's answer: the number after its last `####` (GSM8K), else its last number."""
    marked = _FINAL_ANSWER.search(reference.strip())
    return parse_number(marked.group(1)) if marked else last_number(reference)


def number(output: str, reference: str) -> float:
    """1 when the last number of the output equals the reference's final number."""
    wanted, given = final_number(reference), last_number(output)
    return float(wanted is not None and given is not None and math.isclose(wanted, given, rel_tol=1e-9, abs_tol=1e-9))


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words, Porter-stemmed), from the rouge-score package."""
    return _rouge_scorer().score(reference, output)["rougeL"].fmeasure


@cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer  # imports nltk (~4 s): only when rouge_l is asked for

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact": exact,
    "contains": contains,
    "number": number,
    "rouge_l": rouge_l,
}


def default_metric(references: Sequence[str]) -> str:
    """The metric the references call for: `number` where they all end in `#### N` (GSM8K), `exact` where they
    are short labels (at most three words each), `rouge_l` for free text."""
    texts = [str(reference).strip() for reference in references]
    if texts and all(_FINAL_ANSWER.search(text) for text in texts):
        return "number"
    if texts and all(len(text.split()) <= SHORT_LABEL_WORDS for text in texts):
        return "exact"
    return "rouge_l"


@dataclass(frozen=True)
class Interval:
    """A 95 % confidence interval of a mean score, and how it was found."""

    low: float
    high: float
    method: str
    """"wilson" (0/1 scores) or "bootstrap" (percentile bootstrap of the mean)."""


def confidence_interval(scores: Sequence[float], *, seed: int = 0) -> Interval:
    """The 95 % interval of the mean of `scores`: Wilson's score interval when every score is 0 or 1 (it stays
    inside [0, 1] and is sound for small sets, where the normal approximation is not), otherwise a percentile
    bootstrap over `BOOTSTRAP_RESAMPLES` seeded resamples."""
    count = len(scores)
    if count == 0:
        return Interval(0.0, 1.0, "wilson")
    if all(score in (0.0, 1.0) for score in scores):
        return wilson(sum(scores), count)
    draw = random.Random(seed)
    means = sorted(sum(draw.choices(scores, k=count)) / count for _ in range(BOOTSTRAP_RESAMPLES))
    return Interval(means[int(0.025 * BOOTSTRAP_RESAMPLES)], means[int(0.975 * BOOTSTRAP_RESAMPLES) - 1], "bootstrap")


def wilson(successes: float, count: int) -> Interval:
    """Wilson's 95 % score interval for a proportion of `successes` in `count` trials."""
    share = successes / count
    z2 = Z_95 * Z_95
    centre = (share + z2 / (2 * count)) / (1 + z2 / count)
    spread = Z_95 * math.sqrt(share * (1 - share) / count + z2 / (4 * count * count)) / (1 + z2 / count)
    return Interval(max(0.0, centre - spread), min(1.0, centre + spread), "wilson")


@dataclass(frozen=True)
class Scored:
    """A set of answers scored with one metric: each row's score, their mean, and its interval."""

    metric: str
    scores: list[float]
    interval: Interval

    @property
    def score(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else 0.0

    @property
    def rows(self) -> int:
        return len(self.scores)


def score_answers(metric: str, outputs: Sequence[str], references: Sequence[str]) -> Scored:
    """Every output scored against its reference with `metric` (one of METRICS)."""
    scorer = SCORERS[metric]
    scores = [scorer(output, str(reference)) for output, reference in zip(outputs, references, strict=True)]
    return Scored(metric, scores, confidence_interval(scores))


OUTSIDE = "(outside the label set)"


@dataclass(frozen=True)
class LabelScores:
    """Answers of a label-word run scored as a classifier: exact-match accuracy and macro-F1 over the label
    words, and the answers that are no label word at all (they count as wrong)."""

    accuracy: float
    f1: float
    outside: int
    predicted: list[str]
    """Each answer as a label word, or OUTSIDE."""


def label_scores(outputs: Sequence[str], references: Sequence[str], words: Sequence[str]) -> LabelScores:
    """Each output read as the label word it equals (after `normalise`); macro-F1 over `words`, so that answers
    outside the set lower the recall of the label they should have been."""
    from sklearn.metrics import f1_score  # ~1 s: only for label-word runs

    by_form = {normalise(word): word for word in words}
    predicted = [by_form.get(normalise(output), OUTSIDE) for output in outputs]
    truth = [str(reference) for reference in references]
    correct = sum(guess == wanted for guess, wanted in zip(predicted, truth, strict=True))
    f1 = f1_score(truth, predicted, labels=list(words), average="macro", zero_division=0.0)
    return LabelScores(
        accuracy=correct / len(truth) if truth else 0.0,
        f1=float(f1),
        outside=predicted.count(OUTSIDE),
        predicted=predicted,
    )
