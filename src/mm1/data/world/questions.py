"""Questions about scenes, with answers that are true of the scene by construction.

One generator per question type (colour, shape, count, position, label, yes/no) returns a `QA` or
None when the scene cannot support that type unambiguously ("What colour is the circle?" needs a
single circle colour). The same QAs feed the VQAv2-format eval, the VQA-style lines of interleaved
documents, multiple choice and the SFT conversations, so every format asks the same things.
`annotator_answers` turns a canonical answer into ten human-like answers: mostly agreeing, with
the spelling, number-word, punctuation and occasional real disagreements of VQAv2 annotators.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mm1.data.world.language import NUMBERS, number_word, pick, plural
from mm1.data.world.scenes import COLOURS, LABEL_CHARS, POSITIONS, SHAPES, Scene

QUESTION_TYPES = ("colour", "shape", "count", "position", "label", "yes/no")
ANSWER_TYPES = {
    "colour": "other",
    "shape": "other",
    "count": "number",
    "position": "other",
    "label": "other",
    "yes/no": "yes/no",
}
NEAR_COLOUR = {
    "red": "orange",
    "orange": "red",
    "pink": "purple",
    "purple": "pink",
    "yellow": "orange",
    "brown": "orange",
    "white": "grey",
    "black": "brown",
    "green": "teal",
    "blue": "purple",
}
NEAR_POSITION = {
    "top left": "upper left",
    "top right": "upper right",
    "bottom left": "lower left",
    "bottom right": "lower right",
    "center": "middle",
    "top": "top middle",
    "bottom": "bottom middle",
    "left": "left side",
    "right": "right side",
}


@dataclass
class QA:
    question: str
    answer: str  # canonical short answer, lowercase
    qtype: str  # one of QUESTION_TYPES


def _color_word(rng: np.random.Generator) -> str:
    return "color" if rng.random() < 0.6 else "colour"


def colour_qa(s: Scene, rng: np.random.Generator) -> QA | None:
    options = [sh for sh in SHAPES if s.count(sh) and len({o.colour for o in s.objects if o.shape == sh}) == 1]
    if not options:
        return None
    sh = pick(rng, options)
    col = next(o.colour for o in s.objects if o.shape == sh)
    noun = sh if s.count(sh) == 1 else plural(sh)
    verb = "is" if s.count(sh) == 1 else "are"
    q = pick(
        rng,
        [
            f"What {_color_word(rng)} {verb} the {noun}?",
            f"Which {_color_word(rng)} {verb} the {noun}?",
            f"What is the {_color_word(rng)} of the {sh}?"
            if s.count(sh) == 1
            else f"What {_color_word(rng)} are the {noun}?",
        ],
    )
    return QA(q, col, "colour")


def shape_qa(s: Scene, rng: np.random.Generator) -> QA | None:
    options = [c for c in COLOURS if s.count(colour=c) and len({o.shape for o in s.objects if o.colour == c}) == 1]
    if not options:
        return None
    c = pick(rng, options)
    sh = next(o.shape for o in s.objects if o.colour == c)
    q = pick(rng, [f"What shape is the {c} object?", f"Which shape is {c}?", f"What is the shape of the {c} object?"])
    if s.count(colour=c) > 1:
        q = pick(rng, [f"What shape are the {c} objects?", f"Which shape are the {c} things?"])
    return QA(q, sh, "shape")


def count_qa(s: Scene, rng: np.random.Generator) -> QA:
    r = rng.random()
    if r < 0.25:
        return QA(
            pick(
                rng,
                [
                    "How many shapes are there?",
                    "How many objects are in the image?",
                    "How many shapes are in the picture?",
                ],
            ),
            str(len(s.objects)),
            "count",
        )
    if r < 0.75:
        present = sorted({o.shape for o in s.objects})
        sh = pick(rng, present) if rng.random() < 0.85 else pick(rng, SHAPES)
        return QA(
            pick(
                rng,
                [
                    f"How many {plural(sh)} are there?",
                    f"How many {plural(sh)} are in the image?",
                    f"How many {plural(sh)} can you see?",
                ],
            ),
            str(s.count(sh)),
            "count",
        )
    c = pick(rng, sorted({o.colour for o in s.objects}))
    return QA(
        pick(rng, [f"How many {c} shapes are there?", f"How many {c} objects are in the picture?"]),
        str(s.count(colour=c)),
        "count",
    )


def position_qa(s: Scene, rng: np.random.Generator) -> QA | None:
    unique = [o for o in s.objects if s.count(o.shape, o.colour) == 1]
    if not unique:
        return None
    o = unique[int(rng.integers(len(unique)))]
    name = f"{o.colour} {o.shape}" if s.count(o.shape) > 1 else pick(rng, [o.shape, f"{o.colour} {o.shape}"])
    q = pick(
        rng,
        [f"Where is the {name}?", f"Where is the {name} in the image?", f"In which part of the image is the {name}?"],
    )
    return QA(q, o.position, "position")


def label_qa(s: Scene, rng: np.random.Generator) -> QA | None:
    o = s.labelled
    if o is None:
        return None
    q = pick(
        rng,
        [
            "What does the label say?",
            "What is written on the label?",
            f"What is written on the {o.shape}?",
            f"What text is on the {o.colour} {o.shape}?",
            "What does the sign read?",
        ],
    )
    return QA(q, o.label.lower(), "label")


def yesno_qa(s: Scene, rng: np.random.Generator) -> QA:
    r = rng.random()
    if r < 0.5:  # existence, balanced yes/no
        if rng.random() < 0.5:
            o = s.objects[int(rng.integers(len(s.objects)))]
            c, sh = o.colour, o.shape
        else:
            while True:
                c, sh = pick(rng, list(COLOURS)), pick(rng, SHAPES)
                if not s.count(sh, c):
                    break
        ans = "yes" if s.count(sh, c) else "no"
        return QA(
            pick(rng, [f"Is there a {c} {sh}?", f"Is there a {c} {sh} in the image?", f"Can you see a {c} {sh}?"]),
            ans,
            "yes/no",
        )
    if r < 0.75:
        a, b = (pick(rng, sorted({o.shape for o in s.objects})), pick(rng, SHAPES))
        if a == b:
            b = SHAPES[(SHAPES.index(a) + 1) % len(SHAPES)]
        if rng.random() < 0.5:
            a, b = b, a
        return QA(f"Are there more {plural(a)} than {plural(b)}?", "yes" if s.count(a) > s.count(b) else "no", "yes/no")
    o = s.objects[int(rng.integers(len(s.objects)))]
    side = pick(rng, ["left", "right", "top", "bottom"])
    truth = side in o.position.split()
    name = f"{o.colour} {o.shape}" if s.count(o.shape, o.colour) == 1 else None
    if name is None:
        return QA(
            f"Is there a {o.shape} on the {side}?"
            if side in ("left", "right")
            else f"Is there a {o.shape} at the {side}?",
            "yes" if any(side in p.position.split() for p in s.objects if p.shape == o.shape) else "no",
            "yes/no",
        )
    prep = "on the" if side in ("left", "right") else "at the"
    return QA(f"Is the {name} {prep} {side}?", "yes" if truth else "no", "yes/no")


GENERATORS = {
    "colour": colour_qa,
    "shape": shape_qa,
    "count": count_qa,
    "position": position_qa,
    "label": label_qa,
    "yes/no": yesno_qa,
}


def ask(s: Scene, rng: np.random.Generator, qtype: str | None = None) -> QA:
    """A question of `qtype` if the scene supports it, else of a random supported type."""
    if qtype is not None:
        qa = GENERATORS[qtype](s, rng)
        if qa is not None:
            return qa
    weights = {"colour": 2, "shape": 2, "count": 2, "position": 1.5, "label": 3 if s.label else 0, "yes/no": 2}
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=float)
    # a weighted random order over the types, then the first the scene supports
    order = rng.choice(len(names), int((p > 0).sum()), replace=False, p=p / p.sum())
    for i in order:
        qa = GENERATORS[names[int(i)]](s, rng)
        if qa is not None:
            return qa
    return count_qa(s, rng)


def ask_many(s: Scene, rng: np.random.Generator, n: int) -> list[QA]:
    """n questions, of distinct types while the scene allows it, always with distinct texts."""
    out: list[QA] = []
    for attempt in range(n * 6):
        qa = ask(s, rng)
        if attempt < n * 3 and any(qa.qtype == o.qtype for o in out):
            continue
        if all(qa.question != o.question for o in out):
            out.append(qa)
        if len(out) == n:
            break
    return out


# ----------------------------------------------------------------------------- annotators


def _variant(qa: QA, rng: np.random.Generator) -> str:
    """One annotator's wording of the canonical answer (same meaning after VQA normalisation)."""
    a = qa.answer
    r = rng.random()
    if qa.qtype == "count" and r < 0.35 and int(a) < len(NUMBERS):
        return number_word(int(a))
    if qa.qtype == "label":
        return a.upper() if r < 0.5 else a
    if r < 0.15:
        return a.capitalize() + "."
    if r < 0.3:
        return a.capitalize()
    if qa.qtype == "shape" and r < 0.38:
        return f"a {a}"
    if qa.qtype == "position" and r < 0.38:
        return f"{a} corner" if " " in a else f"on the {a}"
    return a


def _disagreement(qa: QA, rng: np.random.Generator) -> str:
    """A genuinely different answer, the kind real annotators give now and then."""
    a = qa.answer
    if qa.qtype == "count":
        return str(max(0, int(a) + (1 if rng.random() < 0.6 else -1)))
    if qa.qtype == "colour":
        return NEAR_COLOUR.get(a, "grey")
    if qa.qtype == "position":
        return NEAR_POSITION.get(a, a)
    if qa.qtype == "yes/no":
        return "no" if a == "yes" else "yes"
    if qa.qtype == "label":
        i = int(rng.integers(len(a)))
        return a[:i] + LABEL_CHARS[int(rng.integers(len(LABEL_CHARS)))].lower() + a[i + 1 :]
    if qa.qtype == "shape":
        return {"diamond": "square", "hexagon": "circle", "square": "diamond", "star": "cross"}.get(a, "polygon")
    return a


def annotator_answers(qa: QA, rng: np.random.Generator, n: int = 10) -> list[dict]:
    """VQAv2 `answers`: n dicts {answer, answer_confidence, answer_id}, mostly agreeing."""
    n_wrong = int(rng.choice([0, 1, 2, 3], p=[0.55, 0.3, 0.1, 0.05]))
    wrong = set(int(i) for i in rng.choice(n, n_wrong, replace=False))
    out = []
    for i in range(n):
        ans = _disagreement(qa, rng) if i in wrong else _variant(qa, rng)
        conf = "maybe" if (i in wrong and rng.random() < 0.5) or rng.random() < 0.05 else "yes"
        out.append({"answer": ans, "answer_confidence": conf, "answer_id": i + 1})
    return out


def distractors(qa: QA, rng: np.random.Generator, k: int = 3) -> list[str]:
    """k wrong options for multiple choice, of the same kind as the answer."""
    pool = {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "position": list(POSITIONS),
        "count": [str(i) for i in range(0, 7)],
        "yes/no": ["yes", "no"],
    }.get(qa.qtype)
    if pool is None:  # label: perturbed readings
        pool = sorted({_disagreement(qa, rng) for _ in range(12)})  # sorted: set order varies per process
    pool = [p for p in pool if p != qa.answer]
    idx = rng.choice(len(pool), min(k, len(pool)), replace=False)
    return [pool[int(i)] for i in idx]
