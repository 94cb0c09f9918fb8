"""Blind baselines: what a task gives away without looking at the image.

A few-shot VQA number means little until it is compared with the answer prior (always answering
"yes" to yes/no questions, "2" to counting...) and a CIDEr number until it is compared with the
best caption one could write without seeing any image. Both are scored with the same metrics as
the models, on the same test items.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable

from mm1.eval.metrics import CiderD, cider, vqa_accuracy
from mm1.eval.ptb import ptb_tokenize
from mm1.eval.tasks import Example, Task
from mm1.eval.vqa_norm import normalize_answer


def _question_type(ex: Example) -> str:
    """The annotated question type, else the first three words (VQAv2's types are such prefixes)."""
    qtype = ex.meta.get("question_type") or ex.meta.get("type")
    return str(qtype) if qtype else " ".join(normalize_answer(ex.question).split()[:3])


def answer_prior(train: list[Example]) -> Callable[[Example], str]:
    """Question-only predictor: the most frequent (normalised) train answer for the same question
    string, else for the same question type, else overall. Ties break alphabetically."""
    by_question: dict[str, Counter] = defaultdict(Counter)
    by_type: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for ex in train:
        answers = [normalize_answer(a) for a in ex.answers]
        by_question[normalize_answer(ex.question)].update(answers)
        by_type[_question_type(ex)].update(answers)
        overall.update(answers)
    if not overall:
        raise ValueError("answer_prior: the train split has no answers")

    def top(c: Counter) -> str:
        return min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    def predict(ex: Example) -> str:
        for table, key in ((by_question, normalize_answer(ex.question)), (by_type, _question_type(ex))):
            if key in table:
                return top(table[key])
        return top(overall)

    return predict


def best_constant_caption(train: list[Example], max_candidates: int = 300, seed: int = 0) -> str:
    """The train caption that, predicted for every train image, has the highest CIDEr-D there.
    Candidates: all train captions, or a seeded sample of `max_candidates` of them."""
    refs = {ex.id: [ptb_tokenize(r) for r in ex.answers] for ex in train if ex.answers}
    if not refs:
        raise ValueError("best_constant_caption: the train split has no captions")
    raw = sorted({c for ex in train for c in ex.answers})
    if len(raw) > max_candidates:
        raw = random.Random(seed).sample(raw, max_candidates)
    scorer = CiderD(refs)
    best, best_score = raw[0], float("-inf")
    for cand in raw:
        vec = scorer.vector(ptb_tokenize(cand))
        score = sum(scorer.score(k, vec) for k in refs) / len(refs)
        if score > best_score:
            best, best_score = cand, score
    return best


def blind_baseline(task: Task, limit: int = 0, vqa_mode: str = "always") -> dict:
    """Score the blind predictor of a caption / VQA / exact-match task on its test split."""
    spec, test = task.spec, task.test[:limit] if limit else task.test
    if spec.metric == "cider":
        caption = best_constant_caption(task.train)
        preds = {ex.id: caption for ex in test}
        score = cider(preds, {ex.id: ex.answers for ex in test})
        name = "constant caption"
        by_type: dict[str, dict[str, float]] = {}
    elif spec.metric in ("vqa", "exact"):
        prior = answer_prior(task.train)
        preds = {ex.id: prior(ex) for ex in test}
        if spec.metric == "vqa":
            per = [vqa_accuracy(preds[ex.id], ex.answers, vqa_mode) for ex in test]
        else:
            per = [float(normalize_answer(preds[ex.id]) in {normalize_answer(a) for a in ex.answers}) for ex in test]
        score = 100.0 * sum(per) / max(len(per), 1)
        name = "answer prior"
        by_type = _by_question_type(test, per)
    else:
        raise ValueError(f"task {spec.name}: no blind baseline for metric {spec.metric!r}")
    return {
        "task": spec.name,
        "baseline": name,
        "metric": spec.metric,
        "score": score,
        "n": len(test),
        **({"by_question_type": by_type} if by_type else {}),
        "predictions": [{"id": k, "prediction": v} for k, v in preds.items()],
    }


def _by_question_type(test: list[Example], per: list[float]) -> dict[str, dict[str, float]]:
    """The prior's score (x100) and item count per annotated question type (empty when none is)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for ex, value in zip(test, per):
        if "question_type" in ex.meta:
            groups[str(ex.meta["question_type"])].append(value)
    return {k: {"score": 100.0 * sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}
