"""Multi-image compositions: interleaved documents, SFT conversations and image-pair questions.

Interleaved documents are why the world can teach in-context learning (MM1 lesson 3): their text
refers to their own images — lists, comparisons, and the very "Question: ... Short answer: ..."
and "A short description: ..." lines that few-shot prompts use — so a model that reads them learns
that the text after an image talks about *that* image. The functions here return scenes, not
pixels; `items.py` renders them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mm1.data.world.language import (
    caption_in_style,
    dense_description,
    group_phrase,
    number_word,
    objects_phrase,
    pick,
    pick_caption_style,
    plural,
    short_caption,
)
from mm1.data.world.questions import QA, ask, ask_many, distractors
from mm1.data.world.scenes import COLOURS, SHAPES, Scene, sample_scene

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
INTROS = (
    "Here are some pictures from my shape collection.",
    "Today's worksheet: look at each picture.",
    "A few examples of simple shapes.",
    "Practice sheet for counting and colors.",
    "Photos from the art class.",
    "Some drawings we made this week.",
    "Look at these images carefully.",
)


@dataclass
class PairQA:
    scenes: tuple[Scene, Scene]
    question: str
    answer: str
    qtype: str


def _merge(parts: list[str | Scene]) -> list[str | Scene]:
    """Join consecutive text parts, so texts and images alternate as in OBELICS."""
    out: list[str | Scene] = []
    for p in parts:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] = f"{out[-1]}{'' if out[-1].endswith(chr(10)) else ' '}{p}"
        else:
            out.append(p)
    return out


def _summary(s: Scene, rng: np.random.Generator) -> str:
    return objects_phrase(s, rng, digits=rng.random() < 0.3)


def interleaved_document(rng: np.random.Generator) -> list[str | Scene]:
    """A document of 2-10 images whose text is about those images. Caption and Q/A lines end in a
    newline, as in the few-shot prompts (`<image>Question: q Short answer: a` + "\n"): a model that
    never saw an answer end there would run on past it at evaluation. Up to 10 images so that the
    longest documents (~400 tokens) are as long as an 8-shot prompt (9 images): with at most 6, no
    training position ever reached an 8-shot prompt's length and 8-shot scores fell (docs/grounding.md).
    A document captions all its images in one style (`CAPTION_STYLES`), so what demonstrations show
    is worth copying: with every caption in the references' style, 0 shots already had it and 8
    shots could only add the demonstrations' objects (docs/grounding.md section 22)."""
    k = int(rng.integers(2, 11))
    scenes = [sample_scene(rng) for _ in range(k)]
    kind = pick(rng, ["captions", "vqa", "comparison", "gallery", "quiz"])
    parts: list[str | Scene] = [pick(rng, INTROS)] if rng.random() < 0.6 else []
    style = pick_caption_style(rng) if kind in ("captions", "comparison", "quiz") else "reference"
    if kind == "captions":
        fmt = pick(rng, ["A short description: {c}\n", "{c}\n", "Picture {i}: {c}\n", "Caption: {c}\n"])
        for i, s in enumerate(scenes):
            parts += [s, fmt.format(c=caption_in_style(s, style, rng), i=i + 1)]
    elif kind == "vqa":
        for s in scenes:
            parts.append(s)
            for qa in ask_many(s, rng, int(rng.integers(1, 3))):
                parts.append(f"Question: {qa.question} Short answer: {qa.answer}\n")
    elif kind == "comparison":
        parts += scenes[: min(k, 3)]
        lines = [f"The {ORDINALS[i]} image has {_summary(s, rng)}." for i, s in enumerate(scenes[:3])]
        a, b = scenes[0], scenes[1]
        if len(a.objects) != len(b.objects):
            more = "first" if len(a.objects) > len(b.objects) else "second"
            lines.append(f"The {more} image has more shapes.")
        else:
            lines.append(f"Both images have {number_word(len(a.objects))} shapes.")
        common = sorted({o.kind for o in a.objects} & {o.kind for o in b.objects})
        if common:
            lines.append(f"Both show {group_phrase(*common[0], 1)}.")
        parts.append(" ".join(lines))
        for s in scenes[3:]:
            parts += [s, caption_in_style(s, style, rng)]
    elif kind == "gallery":
        for i, s in enumerate(scenes):
            parts += [f"{i + 1}.", s, f"{_summary(s, rng).capitalize()}."]
        total = sum(len(s.objects) for s in scenes)
        parts.append(f"In total there are {total} shapes in these {number_word(k)} pictures.")
        labelled = [i for i, s in enumerate(scenes) if s.label]
        if labelled:
            i = labelled[0]
            parts.append(f"Picture {i + 1} has a label that reads {scenes[i].label}.")
    else:  # quiz: questions about earlier images, answered by position in the document
        for s in scenes:
            parts += [s, caption_in_style(s, style, rng)]
        target = int(rng.integers(k))
        o = scenes[target].objects[0]
        holders = [i for i, s in enumerate(scenes) if s.count(o.shape, o.colour)]
        ans = join_ordinals(holders)
        parts.append(f"Question: which picture shows {group_phrase(o.colour, o.shape, 1)}? Answer: the {ans}.\n")
        sh = scenes[-1].objects[0].shape if rng.random() < 0.7 else o.shape
        parts.append(f"Question: how many {plural(sh)} are in the last image? Short answer: {scenes[-1].count(sh)}\n")
    return _merge(parts)


def join_ordinals(idx: list[int]) -> str:
    words = [ORDINALS[i] for i in idx]
    body = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return body + (" one" if len(words) == 1 else " ones")


# ----------------------------------------------------------------------------- image pairs


def pair_qa(rng: np.random.Generator) -> PairQA:
    """Two scenes and a question that needs both of them."""
    kind = pick(rng, ["more", "both", "total", "label", "same"])
    if kind == "more":
        sh = pick(rng, SHAPES)
        while True:
            a, b = (
                sample_scene(
                    rng,
                    kinds=[(pick(rng, list(COLOURS)), sh)]
                    + ([(pick(rng, list(COLOURS)), pick(rng, SHAPES))] if rng.random() < 0.5 else []),
                )
                for _ in range(2)
            )
            if a.count(sh) != b.count(sh):
                break
        return PairQA(
            (a, b),
            f"Which image has more {plural(sh)}, the first or the second?",
            "first" if a.count(sh) > b.count(sh) else "second",
            "more",
        )
    a, b = sample_scene(rng), sample_scene(rng)
    if kind == "both":
        c = pick(rng, [o.colour for o in a.objects] + [pick(rng, list(COLOURS))])
        return PairQA(
            (a, b),
            f"Do both images contain a {c} object?",
            "yes" if a.count(colour=c) and b.count(colour=c) else "no",
            "both",
        )
    if kind == "total":
        sh = pick(rng, [o.shape for o in a.objects + b.objects])
        return PairQA(
            (a, b),
            f"How many {plural(sh)} are there in the two images together?",
            str(a.count(sh) + b.count(sh)),
            "total",
        )
    if kind == "label":
        a, b = sample_scene(rng, label_prob=1.0), sample_scene(rng, label_prob=0.0)
        if rng.random() < 0.5:
            a, b = b, a
        return PairQA(
            (a, b), "Which image has a label, the first or the second?", "first" if a.label else "second", "label"
        )
    return PairQA(
        (a, b),
        "Do the two images have the same kind of background?",
        "yes" if a.background == b.background else "no",
        "same",
    )


# ----------------------------------------------------------------------------- SFT


SHORT = "Answer the question using a single word or phrase."


def _answer_sentence(qa: QA) -> str:
    if qa.qtype == "label":
        return qa.answer.upper()
    return qa.answer


def sft_conversation(rng: np.random.Generator) -> tuple[list[Scene], list[dict]]:
    """(scenes, LLaVA conversation) — single, multi-turn, description, MC, label and pair examples."""
    kind = pick(rng, ["vqa", "vqa", "multi_turn", "detail", "caption", "label", "mc", "pair"])
    if kind == "pair":
        p = pair_qa(rng)
        return list(p.scenes), _turns([("<image>\n<image>\n" + p.question, p.answer)])
    s = sample_scene(rng, label_prob=1.0 if kind == "label" else 0.35)
    if kind == "detail":
        q = pick(
            rng,
            [
                "Describe the image in detail.",
                "Give a complete description of this picture.",
                "What is in this image? Describe every object.",
            ],
        )
        return [s], _turns([("<image>\n" + q, dense_description(s))])
    if kind == "caption":
        q = pick(
            rng,
            ["Give a short caption for this image.", "Describe the image briefly.", "Write a one-sentence caption."],
        )
        return [s], _turns([("<image>\n" + q, short_caption(s, rng))])
    if kind == "label":
        qa = ask(s, rng, "label")
        a = pick(rng, [qa.answer.upper(), f"The label says {qa.answer.upper()}.", f"It reads {qa.answer.upper()}."])
        return [s], _turns([("<image>\n" + qa.question, a)])
    if kind == "mc":
        qa = ask(s, rng, pick(rng, ["colour", "shape", "count", "position"]))
        opts = distractors(qa, rng) + [qa.answer]
        opts = [opts[int(i)] for i in rng.permutation(len(opts))]
        letters = "ABCD"
        body = "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(opts))
        ans = letters[opts.index(qa.answer)]
        return [s], _turns(
            [(f"<image>\n{qa.question}\n{body}\nAnswer with the option's letter from the given choices directly.", ans)]
        )
    n = 1 if kind == "vqa" else int(rng.integers(2, 5))
    qas = ask_many(s, rng, n)
    pairs = []
    for i, qa in enumerate(qas):
        q = qa.question + (f"\n{SHORT}" if rng.random() < 0.5 else "")
        pairs.append(("<image>\n" + q if i == 0 else q, _answer_sentence(qa)))
    return [s], _turns(pairs)


def _turns(pairs: list[tuple[str, str]]) -> list[dict]:
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out
