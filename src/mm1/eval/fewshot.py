"""The few-shot protocol: which demonstrations a query sees, and how prompts are written.

Flamingo / IDEFICS / MM1 report 0/4/8-shot numbers where k demonstrations are drawn at random from
the task's train split for *every* query. Two details decide whether such numbers are comparable:
1. the query's own image must never appear among its demonstrations (otherwise the model can copy
   the answer) - we exclude every train example that shares an image key with the query;
2. the draw must be reproducible - each query gets its own RNG seeded from (seed, task, query id),
   so a prompt does not depend on batch size, `--limit` or the order queries are evaluated in.

A template is one demonstration, e.g. `<image>Question: {question} Short answer: {answer}`. The
query uses the same template cut just before its first target field ({answer}/{caption}, or
{rationale} for chain-of-thought), so the model continues exactly where a demonstration's answer
begins. Demonstrations and the query are joined by `spec.separator`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from mm1.data.tokenizer import IMAGE_TOKEN
from mm1.eval.tasks import Example, Task, TaskSpec

TARGET_FIELDS = ("{caption}", "{answer}")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Prompt:
    query_id: str
    text: str  # with literal <image> markers, one per entry of `images`
    images: list[str] = field(default_factory=list)  # image files in marker order
    demo_ids: list[str] = field(default_factory=list)
    demo_image_keys: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)  # mc: continuations to score after `text`
    chat: list[dict] | None = None  # under eval.chat: the conversation (demos = earlier turns); used instead of text


def _fields(spec: TaskSpec, ex: Example, answer: str) -> dict[str, str]:
    return {
        "caption": answer,
        "answer": answer,
        "a": answer,
        "question": ex.question,
        "q": ex.question,
        "rationale": ex.rationale,
        "images": IMAGE_TOKEN * len(ex.images),
        "image_lines": (IMAGE_TOKEN + "\n") * len(ex.images),
        "options": "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(ex.options)),
    }


def _cut_point(spec: TaskSpec) -> int:
    targets = TARGET_FIELDS + (("{rationale}",) if spec.cot_marker else ())
    hits = [spec.template.find(t) for t in targets if t in spec.template]
    if not hits:
        raise ValueError(
            f"task {spec.name}: template {spec.template!r} has no answer field "
            "({caption} or {answer}); the query would have nothing to complete"
        )
    return min(hits)


def _images_for(text: str, ex: Example, spec: TaskSpec, what: str) -> list[str]:
    n = text.count(IMAGE_TOKEN)
    if n == len(ex.images):
        return list(ex.images)
    if n == 0:
        return []  # a text-only template drops the images
    raise ValueError(
        f"task {spec.name}, {what} {ex.id}: the prompt has {n} {IMAGE_TOKEN} markers but the example "
        f"has {len(ex.images)} images; fix the template (use {{images}} for a variable number)"
    )


def demo_answer(spec: TaskSpec, ex: Example, rng: random.Random) -> str:
    """What a demonstration answers: one of a caption's references at random, the gold option's
    letter when multiple choice is scored by generating a letter, else the example's target."""
    if spec.kind == "caption" and ex.answers:
        return rng.choice(ex.answers)
    if spec.mc_mode == "generate" and ex.options and ex.label >= 0:
        return LETTERS[ex.label]
    return ex.target


def render_demo(spec: TaskSpec, ex: Example, rng: random.Random) -> tuple[str, list[str]]:
    """A complete demonstration (see `demo_answer`)."""
    text = spec.template.format(**_fields(spec, ex, demo_answer(spec, ex, rng)))
    return text, _images_for(text, ex, spec, "demonstration")


def render_query(spec: TaskSpec, ex: Example) -> tuple[str, list[str]]:
    """The template up to (not including) the first target field, trailing spaces removed."""
    text = spec.template[: _cut_point(spec)].format(**_fields(spec, ex, "")).rstrip(" ")
    return text, _images_for(text, ex, spec, "query")


def query_rng(seed: int, task: str, query_id: str) -> random.Random:
    """Independent of evaluation order (string seeds hash with SHA-512, not PYTHONHASHSEED)."""
    return random.Random(f"{seed}/{task}/{query_id}")


def sample_demos(pool: list[Example], query: Example, k: int, rng: random.Random) -> list[Example]:
    """k distinct examples of `pool`, none sharing an image (or id) with the query."""
    if k <= 0:
        return []
    banned = set(query.image_keys)

    def ok(ex: Example) -> bool:
        return ex.id != query.id and not banned.intersection(ex.image_keys)

    chosen: list[int] = []
    tries = 0
    while len(chosen) < k and tries < 20 * k:  # rejection sampling: cheap for large train splits
        i = rng.randrange(len(pool)) if pool else -1
        tries += 1
        if i >= 0 and i not in chosen and ok(pool[i]):
            chosen.append(i)
    if len(chosen) < k:  # small or crowded pools: draw from the full list of eligible examples
        eligible = [i for i in range(len(pool)) if i not in chosen and ok(pool[i])]
        if len(eligible) < k - len(chosen):
            raise ValueError(
                f"query {query.id}: only {len(chosen) + len(eligible)} train examples without the "
                f"query's image, {k} demonstrations needed; use fewer shots or a larger train split"
            )
        chosen += rng.sample(eligible, k - len(chosen))
    return [pool[i] for i in chosen]


def _chat_prompt(spec: TaskSpec, query: Example, demos: list[Example], rng: random.Random) -> Prompt:
    """Demonstrations as earlier user/assistant turns, the query as the last user turn."""
    turns: list[dict] = []
    images: list[str] = []
    for ex in demos + [query]:
        user = spec.chat_template.format(**_fields(spec, ex, ""))
        images += _images_for(user, ex, spec, "query" if ex is query else "demonstration")
        turns.append({"role": "user", "content": user})
        if ex is not query:
            turns.append({"role": "assistant", "content": demo_answer(spec, ex, rng)})
    text = "\n".join(f"[{t['role']}] {t['content']}" for t in turns)
    return Prompt(
        query.id,
        text,
        images,
        [d.id for d in demos],
        [k for d in demos for k in d.image_keys],
        list(query.options),
        chat=turns,
    )


def build_prompt(
    task: Task, query: Example, shots: int, seed: int = 0, chat: bool = False, image_donor: Example | None = None
) -> Prompt:
    """The prompt for one query; with `chat`, a conversation in the task's chat template.

    With `image_donor` (the image-shuffled control, see `mm1.eval.shuffle`) the query shows the
    donor's image(s) instead of its own; the demonstrations are drawn exactly as without it."""
    spec = task.spec
    rng = query_rng(seed, spec.name, query.id)
    n_demo = shots if shots > 0 else spec.zero_shot_demos
    if n_demo and not task.train:
        raise ValueError(f"task {spec.name}: {n_demo}-shot prompts need a train split (spec `train:`)")
    demos = sample_demos(task.train, query, n_demo, rng)
    if image_donor is not None:
        images, keys = list(image_donor.images), list(image_donor.image_keys)
        if IMAGE_TOKEN in query.question:  # markers placed by the data (MMMU): keep their count, cycle the donor's
            images = [images[i % len(images)] for i in range(len(query.images))]
            keys = [keys[i % len(keys)] for i in range(len(query.image_keys))]
        query = replace(query, images=images, image_keys=keys)
    if chat:
        return _chat_prompt(spec, query, demos if shots > 0 else [], rng)
    parts: list[str] = [spec.prefix] if spec.prefix else []
    images: list[str] = []
    for d in demos:
        text, imgs = render_demo(spec, d, rng)
        if shots == 0:  # zero-shot text-only demonstrations: the images are removed
            text, imgs = text.replace(IMAGE_TOKEN, ""), []
        parts.append(text)
        images += imgs
    text, imgs = render_query(spec, query)
    parts.append(text)
    return Prompt(
        query.id,
        spec.separator.join(parts),
        images + imgs,
        [d.id for d in demos],
        [k for d in demos for k in d.image_keys],
        list(query.options),
    )


def build_prompts(
    task: Task,
    queries: list[Example],
    shots: int,
    seed: int = 0,
    chat: bool = False,
    image_donors: list[Example | None] | None = None,
) -> list[Prompt]:
    donors = image_donors if image_donors is not None else [None] * len(queries)
    return [build_prompt(task, q, shots, seed, chat, d) for q, d in zip(queries, donors, strict=True)]


def extract_answer(generated: str, spec: TaskSpec) -> str:
    """The answer inside a (stop-truncated) generation: for chain-of-thought the text after the last
    `cot_marker` (the whole text when the marker never came), stripped and optionally lower-cased."""
    text = generated
    if spec.cot_marker:
        at = text.rfind(spec.cot_marker)
        if at >= 0:
            text = text[at + len(spec.cot_marker) :]
    text = text.strip()
    return text.lower() if spec.lowercase else text
