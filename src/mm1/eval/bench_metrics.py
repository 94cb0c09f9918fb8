"""The official metrics of released benchmarks that are not plain accuracy, as pure functions.

- `parse_choice`: which option a generated answer names. MMMU's rule: a bracketed letter "(B)"
  first, then a bare letter " B ", then (for answers longer than five words) an option's text; when
  several match, the one mentioned last wins.
- `mmmu_open_correct`: MMMU's open-answer rule. The key part of the response is what follows the
  last "is", "so", "therefore", "answer" ... of each sentence (or "=" in the last one); numbers in
  it are compared as numbers rounded to 2 decimals, text by containment of the lower-cased gold.
- `parse_yes_no`, `pope_metrics`: POPE. An answer is "no" when its first sentence contains the
  word no/not; everything else is "yes". "yes" is the positive class: accuracy, precision, recall,
  F1 and the share of "yes" answers (a model that always says yes gets 50 % accuracy and a yes-ratio
  of 1; the ratio exposes that bias).
- `circular_accuracy`: MMBench's CircularEval. A question is asked once per rotation of its options
  and counts as solved only when every rotation is answered correctly.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_KEY_WORDS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_NUMBER = re.compile(
    r"-?\d{1,3}(?:,\d{3})+(?![\d])|-?\d+(?:\.\d+)?[eE][+-]?\d+|-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d)"
)


def parse_choice(response: str, options: Sequence[str]) -> int | None:
    """Index of the option `response` names, or None when it names none."""
    letters = LETTERS[: len(options)]
    text = " " + response.strip().strip(",.!?;:'") + " "
    found = [(text.rfind(f"({c})"), i) for i, c in enumerate(letters) if f"({c})" in text]
    if not found:
        found = [(text.rfind(f" {c} "), i) for i, c in enumerate(letters) if f" {c} " in text]
    if not found and len(text.split()) > 5:
        low = text.lower()
        found = [(low.rfind(o.lower()), i) for i, o in enumerate(options) if o and o.lower() in low]
    if not found:
        return None
    return max(found)[1]  # the last one mentioned


def _as_number(text: str) -> float | None:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return round(value, 2) if math.isfinite(value) else None


def _normalized(text: str) -> list[float | str]:
    """A number rounded to 2 decimals, or lower-cased text (a single character padded with a space on
    either side, so that "a" does not match inside every word)."""
    text = text.strip()
    number = _as_number(text)
    if number is not None:
        return [number]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _key_parts(response: str) -> list[str]:
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response.strip().strip("."))
    parts = []
    for n, sentence in enumerate(sentences):
        sentence = sentence.lower()
        words = _KEY_WORDS + (("=",) if n == len(sentences) - 1 else ())
        tails = [sentence.split(w)[-1].strip() for w in words if w in sentence]
        tails = [t for t in tails if t and t not in ":,.!?;'"]
        if tails:
            parts.append(min(tails, key=len))  # the shortest tail: the answer sits at the end
    return parts or [response.strip().strip(".").lower()]


def mmmu_open_predictions(response: str) -> set[float | str]:
    """Every candidate answer in a free-text response: its key parts and the numbers in them."""
    parts = _key_parts(response)
    candidates = list(parts) + [m for p in parts for m in _NUMBER.findall(p)]
    return {x for c in candidates for x in _normalized(c)}


def mmmu_open_correct(response: str, golds: Sequence[str]) -> bool:
    """MMMU's rule for open questions: a predicted number equals a gold number, or a gold text is
    contained in a predicted text."""
    gold = [g for answer in golds for g in _normalized(str(answer))]
    for pred in mmmu_open_predictions(response):
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in gold):
                return True
        elif pred in gold:
            return True
    return False


def parse_yes_no(response: str) -> str:
    """POPE's answer rule: "no" when the first sentence has the word no or not, else "yes"."""
    first = response.strip().split(".")[0]
    words = re.findall(r"[a-z']+", first.lower())
    return "no" if "no" in words or "not" in words else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (x100, "yes" = positive) and yes-ratio (share of "yes"
    predictions, x100) of parsed yes/no predictions against yes/no labels."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"pope_metrics: {len(predictions)} predictions for {len(labels)} labels")
    pairs = list(zip(predictions, labels))
    tp = sum(p == "yes" and y == "yes" for p, y in pairs)
    fp = sum(p == "yes" and y == "no" for p, y in pairs)
    fn = sum(p == "no" and y == "yes" for p, y in pairs)
    tn = sum(p == "no" and y == "no" for p, y in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / len(pairs),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / len(pairs),
    }


def circular_accuracy(correct: Sequence[bool], groups: Sequence[str]) -> float:
    """Share (x100) of question groups (one question under every rotation of its options) whose
    rotations are all answered correctly."""
    if len(correct) != len(groups) or not groups:
        raise ValueError(f"circular_accuracy: {len(correct)} answers for {len(groups)} group labels")
    solved: dict[str, bool] = defaultdict(lambda: True)
    for ok, group in zip(correct, groups):
        solved[group] = solved[group] and bool(ok)
    return 100.0 * sum(solved.values()) / len(solved)
