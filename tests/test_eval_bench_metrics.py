"""Benchmark metrics against hand-worked examples: POPE's F1 and yes-ratio, MMBench's CircularEval,
MMMU's choice parser and open-answer rule."""

from __future__ import annotations

import pytest

from mm1.config import Config
from mm1.eval.bench_metrics import circular_accuracy, mmmu_open_correct, parse_choice, parse_yes_no, pope_metrics
from mm1.eval.readers import Example
from mm1.eval.task_metrics import SCORERS


def test_pope_answers_are_no_when_the_first_sentence_says_no_or_not():
    assert [
        parse_yes_no(a)
        for a in [
            "Yes.",
            "No, there is none.",
            "There is not a dog.",
            "There is a dog. No cat.",
            "yes there is",
            "Nothing is there",
        ]
    ] == ["yes", "no", "no", "yes", "yes", "yes"]


def test_pope_metrics_by_hand():
    # labels: 4 yes, 2 no. predictions: TP at 0 and 3, FN at 1 and 2, FP at 4, TN at 5
    labels = ["yes", "yes", "yes", "yes", "no", "no"]
    preds = ["yes", "no", "no", "yes", "yes", "no"]
    m = pope_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(300 / 6)  # (2 TP + 1 TN) / 6
    assert m["precision"] == pytest.approx(200 / 3)  # 2 / (2 + 1)
    assert m["recall"] == pytest.approx(50.0)  # 2 / (2 + 2)
    assert m["f1"] == pytest.approx(400 / 7)  # 2 * (2/3 * 1/2) / (2/3 + 1/2) = 4/7
    assert m["yes_ratio"] == pytest.approx(50.0)  # 3 yes of 6


def test_pope_always_yes_gets_half_accuracy_and_a_yes_ratio_of_one():
    m = pope_metrics(["yes"] * 4, ["yes", "no", "yes", "no"])
    assert (m["accuracy"], m["recall"], m["yes_ratio"]) == (50.0, 100.0, 100.0)
    assert m["f1"] == pytest.approx(200 / 3)


def test_pope_scorer_headline_is_f1_with_every_figure_in_details():
    items = [Example(str(i), answers=[y]) for i, y in enumerate(["yes", "yes", "yes", "yes", "no", "no"])]
    preds = ["Yes.", "No.", "no", "yes", "Yes, a dog.", "Not at all."]
    scorer = SCORERS.get("pope")
    score, per = scorer.score(items, preds, Config())
    assert score == pytest.approx(400 / 7) and per == [100.0, 0.0, 0.0, 100.0, 0.0, 100.0]
    assert scorer.details(items, preds, Config())["precision"] == pytest.approx(200 / 3)


def _rotations(group: int, n_options: int, gold: int) -> list[Example]:
    opts = [f"option {i}" for i in range(n_options)]
    return [
        Example(
            str(s * 1_000_000 + group),
            options=opts[s:] + opts[:s],
            label=(gold - s) % n_options,
            meta={"circular_group": group, "circular_shift": s, "category": "c"},
        )
        for s in range(n_options)
    ]


def test_circular_eval_by_hand():
    # question 0: 4 rotations, all right -> solved; question 1: 4 rotations, the third wrong -> not solved;
    # question 2: 2 rotations, both right -> solved. CircularEval = 2 / 3; plain accuracy on the
    # first rotation of each = 3 / 3.
    items = _rotations(0, 4, 2) + _rotations(1, 4, 0) + _rotations(2, 2, 1)
    chosen = [ex.label for ex in items]
    chosen[6] = (chosen[6] + 1) % 4  # question 1, rotation 2
    assert circular_accuracy(
        [c == ex.label for c, ex in zip(chosen, items)], [ex.meta["circular_group"] for ex in items]
    ) == pytest.approx(200 / 3)
    scorer = SCORERS.get("circular")
    score, per = scorer.score(items, chosen, Config())
    assert score == pytest.approx(200 / 3) and sum(per) == 100.0 * 9
    details = scorer.details(items, chosen, Config())
    assert details["vanilla_accuracy"] == 100.0 and details["questions"] == 3


def test_choice_parser_follows_mmmus_rule():
    options = ["red", "green", "blue"]
    assert parse_choice("(B)", options) == 1
    assert parse_choice("The answer is C.", options) == 2
    assert parse_choice("(A) is wrong but (C) is right", options) == 2  # the last one mentioned
    assert parse_choice("I think the picture is mostly green in colour", options) == 1  # > 5 words: option text
    assert parse_choice("green", options) is None  # short answers must name a letter
    assert parse_choice("D", options) is None  # not an option letter


def test_mmmu_open_rule_matches_numbers_and_contained_text():
    assert mmmu_open_correct("The answer is 4.", ["4", "4.0"])
    assert mmmu_open_correct("so the total is 1,000", ["1000"])
    assert not mmmu_open_correct("so it is 3.99", ["4"])
    assert mmmu_open_correct("The capital is Paris, France", ["paris"])
    assert not mmmu_open_correct("it is b", ["a"])  # a one-letter gold needs a word boundary
    assert mmmu_open_correct("Therefore x = 12.004", ["12"])  # numbers round to 2 decimals


def test_mmmu_scorer_mixes_choice_and_open_questions_and_falls_back_to_a_seeded_guess():
    mc = Example("q1", options=["red", "green"], label=1)
    open_q = Example("q2", answers=["4"])
    unparsed = Example("q3", options=["a", "b", "c", "d"], label=0)
    scorer = SCORERS.get("mmmu")
    _, per = scorer.score([mc, open_q], ["(B)", "It is 4"], Config())
    assert per == [100.0, 100.0]
    first = scorer.score([unparsed], ["no idea"], Config())[1]
    assert first == scorer.score([unparsed], ["no idea"], Config())[1]  # the same guess every time
