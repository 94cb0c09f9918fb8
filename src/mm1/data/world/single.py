"""The `single` world: one large shape of one flat colour per image — a grounding sanity check.

The main world's questions can often be answered from the question alone (its blind prior is
~26 %), so a weak VQA score does not say whether a model reads the image. Here every question is
about the only object in the picture, answers are spread evenly, and the question never gives the
answer away:

- colour:   "What colour is the shape?" / "What color is the star?"        -> 8 colours (prior ~1/8)
- shape:    "What shape is this?" / "What shape is the red object?"         -> 4 shapes (prior ~1/4)
- presence: "Is there a blue square?"  yes/no balanced; a "no" differs from the image in exactly
            one attribute (colour or shape), so both must be seen.         -> prior 1/2

Written (relative to the world root): `sft/train.json` + `sft/images/` (LLaVA, one question per
conversation), `eval/vqa_{train,test}_{questions,annotations}.json` + `eval/images/` (VQAv2, three
questions per image, one of each type, ten annotator answers each), `tokenizer.json`, `world.json`.
`benchmarks/grounding.py` fine-tunes on the first and scores the second against its blind prior
and an image-shuffled control.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mm1.data.world import items
from mm1.data.world.language import pick
from mm1.data.world.questions import ANSWER_TYPES, QA, annotator_answers
from mm1.data.world.scenes import POSITIONS, TONES, Obj, Scene
from mm1.data.world.writers import vqa_records
from mm1.data.writers import write_bytes, write_json

SINGLE_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown")
SINGLE_SHAPES = ("circle", "square", "triangle", "star")
SINGLE_TYPES = ("colour", "shape", "yes/no")
SHORT = "Answer the question using a single word or phrase."


def single_scene(rng: np.random.Generator) -> Scene:
    """One huge shape near the centre on a plain muted background."""
    colour, shape = pick(rng, SINGLE_COLOURS), pick(rng, SINGLE_SHAPES)
    dx, dy, angle = ((rng.random(3) - 0.5) * [0.5, 0.5, 24]).tolist()
    obj = Obj(shape=shape, colour=colour, size="huge", cell=POSITIONS.index("center"), dx=dx, dy=dy, angle=angle)
    return Scene([obj], background="plain", tone=pick(rng, list(TONES)), texture_seed=int(rng.integers(2**31)))


def _colour_word(rng: np.random.Generator) -> str:
    return "color" if rng.random() < 0.6 else "colour"


def single_question(s: Scene, rng: np.random.Generator, qtype: str) -> QA:
    """A question of `qtype` about the scene's one object (the question never names the answer)."""
    o = s.objects[0]
    if qtype == "colour":
        return QA(
            pick(
                rng,
                [
                    f"What {_colour_word(rng)} is the shape?",
                    f"What {_colour_word(rng)} is the {o.shape}?",
                    f"Which {_colour_word(rng)} is the object?",
                ],
            ),
            o.colour,
            "colour",
        )
    if qtype == "shape":
        return QA(
            pick(
                rng,
                [
                    "What shape is this?",
                    "What shape is in the image?",
                    f"What shape is the {o.colour} object?",
                    "Which shape is shown?",
                ],
            ),
            o.shape,
            "shape",
        )
    colour, shape, answer = o.colour, o.shape, "yes"
    if rng.random() < 0.5:  # a "no" differs in exactly one attribute
        answer = "no"
        if rng.random() < 0.5:
            colour = pick(rng, [c for c in SINGLE_COLOURS if c != o.colour])
        else:
            shape = pick(rng, [sh for sh in SINGLE_SHAPES if sh != o.shape])
    return QA(
        pick(
            rng,
            [
                f"Is there a {colour} {shape}?",
                f"Is there a {colour} {shape} in the image?",
                f"Can you see a {colour} {shape}?",
            ],
        ),
        answer,
        "yes/no",
    )


def _scene_only(r: np.random.Generator) -> tuple[list[Scene], None]:
    return [single_scene(r)], None


def single_sft_item(seed: int, index: int, px: int, forbidden: frozenset[str]) -> dict:
    pngs, (scenes, _, rng) = items._draw(seed, "sft", index, px, forbidden, _scene_only)
    qa = single_question(scenes[0], rng, SINGLE_TYPES[index % len(SINGLE_TYPES)])
    q = qa.question + (f"\n{SHORT}" if rng.random() < 0.5 else "")
    return {
        "id": f"single-{index:08d}",
        "png": pngs[0],
        "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": qa.answer}],
    }


def single_eval_item(seed: int, index: int, split: str, px: int, forbidden: frozenset[str]) -> dict:
    pngs, (scenes, _, rng) = items._draw(seed, f"eval_{split}", index, px, forbidden, _scene_only)
    vqa = []
    for t in SINGLE_TYPES:
        qa = single_question(scenes[0], rng, t)
        vqa.append(
            {
                "question": qa.question,
                "answer": qa.answer,
                "question_type": qa.qtype,
                "answer_type": ANSWER_TYPES[qa.qtype],
                "answers": annotator_answers(qa, rng),
            }
        )
    return {"png": pngs[0], "scene": scenes[0].to_dict(), "vqa": vqa}


def write_single(root: Any, spec: Any, seed: int, imap: Any) -> tuple[dict[str, int], list[str]]:
    """Write the single world's parts under `root`; (counts, texts for the tokenizer)."""
    px, counts, texts = spec.image_px, {}, []
    forbidden: frozenset[str] = frozenset()
    for split in ("test", "train"):
        rows = list(imap(single_eval_item, ((seed, i, split, px, forbidden) for i in range(spec.eval_images))))
        questions, annotations = [], []
        for i, it in enumerate(rows):
            image_id, rel = i + 1, f"images/{split}_{i + 1:06d}.png"
            write_bytes(root / "eval" / rel, it["png"])
            qs, anns = vqa_records(image_id, rel, it["vqa"])
            questions += qs
            annotations += anns
            texts += [t for q in it["vqa"] for t in (q["question"], q["answer"])] if split == "train" else []
        write_json(root / "eval" / f"vqa_{split}_questions.json", {"data_subtype": split, "questions": questions})
        write_json(root / "eval" / f"vqa_{split}_annotations.json", {"data_subtype": split, "annotations": annotations})
        counts.update({f"eval_images_{split}": len(rows), f"vqa_{split}": len(questions)})
        if split == "test":
            forbidden = frozenset(items.digest(it["png"]) for it in rows)
    records = []
    for it in imap(single_sft_item, ((seed, i, px, forbidden) for i in range(spec.sft))):
        rel = f"images/{it['id']}.png"
        write_bytes(root / "sft" / rel, it["png"])
        records.append({"id": it["id"], "image": rel, "conversations": it["conversations"]})
        texts += [t["value"].replace("<image>\n", "") for t in it["conversations"]]
    write_json(root / "sft" / "train.json", records)
    counts["sft"] = len(records)
    return counts, texts
