"""One function per corpus part that turns (world seed, item index) into a finished record.

Each item gets its own `numpy.random.Generator` seeded by (seed, part, index, attempt), so items
are independent of each other, of the order they are made in and of how many processes make them:
the corpus is byte-identical for a seed. An item whose rendered image equals a held-out test image
(compared by hash) is drawn again with the next attempt, so no test image is ever trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from mm1.data.world.documents import interleaved_document, pair_qa, sft_conversation
from mm1.data.world.language import alt_text, dense_description, reference_captions, scene_tags
from mm1.data.world.lexicon import make_lexicon, text_document
from mm1.data.world.questions import ANSWER_TYPES, QUESTION_TYPES, annotator_answers, ask, distractors
from mm1.data.world.scenes import Scene, png_bytes, render, sample_scene

PART_IDS = {
    "caption": 1,
    "interleaved": 2,
    "text_train": 3,
    "text_test": 4,
    "sft": 5,
    "eval_train": 6,
    "eval_test": 7,
    "multi_train": 8,
    "multi_test": 9,
    "text_eval": 10,
}
MAX_ATTEMPTS = 50


def digest(png: bytes) -> str:
    return hashlib.sha1(png).hexdigest()


def item_rng(seed: int, part: str, index: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, PART_IDS[part], index, attempt])


def _draw(
    seed: int,
    part: str,
    index: int,
    px: int,
    forbidden: frozenset[str],
    make: Callable[[np.random.Generator], tuple[list[Scene], Any]],
) -> tuple[list[bytes], Any]:
    """Run `make` and render its scenes, re-drawing while any image collides with `forbidden`."""
    for attempt in range(MAX_ATTEMPTS):
        rng = item_rng(seed, part, index, attempt)
        scenes, payload = make(rng)
        pngs = [png_bytes(render(s, px)) for s in scenes]
        if not any(digest(p) in forbidden for p in pngs):
            return pngs, (scenes, payload, rng)
    raise RuntimeError(
        f"world {part} item {index}: {MAX_ATTEMPTS} draws all collided with test images; "
        "the scene space is too small for this size"
    )


def caption_item(seed: int, index: int, px: int, forbidden: frozenset[str]) -> dict:
    pngs, (scenes, _, rng) = _draw(seed, "caption", index, px, forbidden, lambda r: ([sample_scene(r)], None))
    s = scenes[0]
    return {
        "key": f"{index:09d}",
        "png": pngs[0],
        "alt": alt_text(s, rng, index),
        "dense": dense_description(s),
        "scene": s.to_dict(),
        "tags": scene_tags(s),
    }


def interleaved_item(seed: int, index: int, px: int, forbidden: frozenset[str]) -> dict:
    def make(r: np.random.Generator) -> tuple[list[Scene], list]:
        doc = interleaved_document(r)
        return [p for p in doc if isinstance(p, Scene)], doc

    pngs, (_, doc, _) = _draw(seed, "interleaved", index, px, forbidden, make)
    it = iter(pngs)
    texts = [p if isinstance(p, str) else None for p in doc]
    images = [None if isinstance(p, str) else next(it) for p in doc]
    return {"id": f"doc-{index:08d}", "texts": texts, "images": images}


def text_item(seed: int, index: int, split: str, lexicon_size: int) -> dict:
    rng = item_rng(seed, f"text_{split}", index)
    return {"id": f"text-{split}-{index:08d}", "text": text_document(make_lexicon(seed, lexicon_size), rng)}


def sft_item(seed: int, index: int, px: int, forbidden: frozenset[str]) -> dict:
    pngs, (_, conv, _) = _draw(seed, "sft", index, px, forbidden, lambda r: sft_conversation(r))
    return {"id": f"sft-{index:08d}", "pngs": pngs, "conversations": conv}


def eval_item(seed: int, index: int, split: str, px: int, forbidden: frozenset[str], n_questions: int = 3) -> dict:
    """One eval image with its 5 reference captions, VQA questions (10 answers each) and one MC question."""
    # labels on half the images: enough label-reading questions to measure the resolution effect
    pngs, (scenes, _, rng) = _draw(
        seed, f"eval_{split}", index, px, forbidden, lambda r: ([sample_scene(r, label_prob=0.5)], None)
    )
    s = scenes[0]
    # cycle through the question types so every type is represented evenly
    types = [QUESTION_TYPES[(index * n_questions + j) % len(QUESTION_TYPES)] for j in range(n_questions)]
    vqa, seen = [], set()
    for t in types:
        qa = ask(s, rng, t)
        if qa.question in seen:
            qa = ask(s, rng)
        if qa.question in seen:
            continue
        seen.add(qa.question)
        vqa.append(
            {
                "question": qa.question,
                "answer": qa.answer,
                "question_type": qa.qtype,
                "answer_type": ANSWER_TYPES[qa.qtype],
                "answers": annotator_answers(qa, rng),
            }
        )
    mc_qa = ask(s, rng, ["colour", "shape", "count", "position", "label"][index % 5])
    options = distractors(mc_qa, rng) + [mc_qa.answer]
    options = [options[int(i)] for i in rng.permutation(len(options))]
    return {
        "png": pngs[0],
        "scene": s.to_dict(),
        "captions": reference_captions(s, rng),
        "vqa": vqa,
        "mc": {
            "question": mc_qa.question,
            "options": options,
            "answer": options.index(mc_qa.answer),
            "question_type": mc_qa.qtype,
        },
    }


def multi_item(seed: int, index: int, split: str, px: int, forbidden: frozenset[str]) -> dict:
    def make(r: np.random.Generator) -> tuple[list[Scene], Any]:
        p = pair_qa(r)
        return list(p.scenes), p

    pngs, (_, p, _) = _draw(seed, f"multi_{split}", index, px, forbidden, make)
    return {"pngs": pngs, "question": p.question, "answer": p.answer, "question_type": p.qtype}
