"""Task metrics by name: how a task's predictions become its score and its breakdown.

A `Scorer` turns one trial's predictions into a corpus score (x100) and per-item scores, and
optionally a breakdown (`details`) the benchmark's authors report beside the headline: VQA accuracy
per answer type (VizWiz's "unanswerable" among them), CIDEr per NoCaps domain, POPE's precision /
recall / F1 / yes-ratio, accuracy per category. Text scorers receive the generated answers; choice
scorers (`choice=True`) receive the chosen option index per item, whether the option came from
log-likelihoods or from a generated letter (`mm1.eval.runner`). A task spec names its scorer in
`metric:`; a format sets the benchmark's own.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mm1.eval.bench_metrics import circular_accuracy, mmmu_open_correct, parse_choice, parse_yes_no, pope_metrics
from mm1.eval.metrics import cider_scores, exact_match, vqa_accuracy
from mm1.eval.readers import Example
from mm1.registry import Registry

Scores = tuple[float, list[float]]  # (corpus score, per-item scores), x100


def _no_details(items: list[Example], preds: Sequence, cfg: Any) -> dict:
    return {}


@dataclass(frozen=True)
class Scorer:
    score: Callable[[list[Example], Sequence, Any], Scores]
    details: Callable[[list[Example], Sequence, Any], dict] = _no_details
    choice: bool = False  # predictions are option indices, not text


SCORERS: Registry[Scorer] = Registry("metric", "metric")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _by(items: list[Example], per_item: Sequence[float], key: str) -> dict[str, float]:
    """Mean per-item score within each value of `meta[key]` (empty when no item has the key)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for ex, s in zip(items, per_item):
        if key in ex.meta:
            groups[str(ex.meta[key])].append(s)
    return {g: _mean(v) for g, v in sorted(groups.items())}


def _per_item(fn: Callable[[Example, Any, Any], float]) -> Callable[[list[Example], Sequence, Any], Scores]:
    def score(items: list[Example], preds: Sequence, cfg: Any) -> Scores:
        per = [100.0 * fn(ex, p, cfg) for ex, p in zip(items, preds)]
        return _mean(per), per

    return score


# ----------------------------------------------------------------------------- generated text


def _cider(items: list[Example], preds: Sequence[str], cfg: Any) -> Scores:
    per = cider_scores(
        {ex.id: p for ex, p in zip(items, preds)},
        {ex.id: ex.answers for ex in items},
        tokenizer=cfg.eval.cider_tokenizer,
    )
    scores = [per[ex.id] for ex in items]
    return _mean(scores), scores


def _cider_by_domain(items: list[Example], preds: Sequence[str], cfg: Any) -> dict:
    """NoCaps reports CIDEr within each domain (each subset its own corpus statistics)."""
    domains: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(items):
        if "domain" in ex.meta:
            domains[str(ex.meta["domain"])].append(i)
    return {
        f"cider_{d}": _cider([items[i] for i in idx], [preds[i] for i in idx], cfg)[0]
        for d, idx in sorted(domains.items())
    }


_vqa = _per_item(lambda ex, p, cfg: vqa_accuracy(p, ex.answers, cfg.eval.vqa_mode))
_exact = _per_item(lambda ex, p, cfg: exact_match(p, ex.answers))
_pope_item = _per_item(lambda ex, p, cfg: float(parse_yes_no(p) == ex.answers[0]))


def _vqa_details(items: list[Example], preds: Sequence[str], cfg: Any) -> dict:
    """VQAv2's official breakdown: accuracy per answer type (flat keys: yes/no, number, other ...) and,
    where items carry one, per question type (under "question_type"; the world's colour / shape /
    count ..., VQAv2's "what color is the" ...). Beside the image-shuffled control's own breakdown,
    it says which kinds of question the model answers from the image and which from the words."""
    per = _vqa(items, preds, cfg)[1]
    by_question = _by(items, per, "question_type")
    return _by(items, per, "answer_type") | ({"question_type": by_question} if by_question else {})


def _pope(items: list[Example], preds: Sequence[str], cfg: Any) -> Scores:
    """Headline: F1 (LLaVA's and lmms-eval's POPE number); the rest in `details`."""
    per = _pope_item(items, preds, cfg)[1]
    return pope_metrics([parse_yes_no(p) for p in preds], [ex.answers[0] for ex in items])["f1"], per


def _mmmu_choice(ex: Example, response: str) -> int:
    """MMMU: an answer naming no option counts as a random option (seeded by the question id)."""
    chosen = parse_choice(response, ex.options)
    return chosen if chosen is not None else random.Random(f"mmmu/{ex.id}").randrange(len(ex.options))


def _mmmu_correct(ex: Example, response: str, cfg: Any) -> float:
    if ex.options:
        return float(_mmmu_choice(ex, response) == ex.label)
    return float(mmmu_open_correct(response, ex.answers))


SCORERS.register("cider")(Scorer(_cider, _cider_by_domain))
SCORERS.register("vqa")(Scorer(_vqa, _vqa_details))
SCORERS.register("exact")(Scorer(_exact, lambda items, preds, cfg: _by(items, _exact(items, preds, cfg)[1], "type")))
SCORERS.register("pope")(
    Scorer(
        _pope, lambda items, preds, cfg: pope_metrics([parse_yes_no(p) for p in preds], [ex.answers[0] for ex in items])
    )
)
SCORERS.register("mmmu")(
    Scorer(
        _per_item(_mmmu_correct),
        lambda items, preds, cfg: _by(items, _per_item(_mmmu_correct)(items, preds, cfg)[1], "question_type"),
    )
)

# ----------------------------------------------------------------------------- chosen options

_option = _per_item(lambda ex, chosen, cfg: float(chosen == ex.label))


def _circular(items: list[Example], chosen: Sequence[int], cfg: Any) -> Scores:
    per = _option(items, chosen, cfg)[1]
    return circular_accuracy([s > 0 for s in per], [str(ex.meta["circular_group"]) for ex in items]), per


def _circular_details(items: list[Example], chosen: Sequence[int], cfg: Any) -> dict:
    per = _option(items, chosen, cfg)[1]
    first = [s for ex, s in zip(items, per) if ex.meta.get("circular_shift") == 0]
    return {
        "vanilla_accuracy": _mean(first),
        "questions": len({ex.meta["circular_group"] for ex in items}),
        **_by(items, per, "category"),
    }


SCORERS.register("option")(
    Scorer(_option, lambda items, chosen, cfg: _by(items, _option(items, chosen, cfg)[1], "category"), choice=True)
)
SCORERS.register("circular")(Scorer(_circular, _circular_details, choice=True))


def choice_from_text(ex: Example, response: str) -> int:
    """The option a generated answer names (-1 = none: scored wrong)."""
    chosen = parse_choice(response, ex.options)
    return -1 if chosen is None else chosen
