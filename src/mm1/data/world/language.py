"""What the world says about a scene: noisy alt-text, dense descriptions, reference captions.

Three caption styles exist because they are MM1 axes: *alt-text* is short, partial and sometimes
off-topic, like web captions; *dense* is a complete synthetic description (counts, positions,
background, label), the VeCap role; *reference* captions are the short COCO-style sentences the
captioning eval scores against, five varied wordings per image. Every function takes the RNG
explicitly so that one seeded generator per item makes the whole corpus reproducible.
"""

from __future__ import annotations

import numpy as np

from mm1.data.world.scenes import Obj, Scene

NUMBERS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
)
BACKGROUND_WORDS = {"plain": "plain", "gradient": "gradient", "noise": "mottled", "stripes": "striped"}
POSITION_PHRASES = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}


def number_word(n: int) -> str:
    return NUMBERS[n] if 0 <= n < len(NUMBERS) else str(n)


def scene_tags(s: Scene) -> list[str]:
    """The scene's image-level labels, as tagging datasets (OpenImages, RAM) give them, extended to what
    the world's questions ask: the shapes present, their colours, the words of their places ("top",
    "left", "center") and the number of objects as a word, each group sorted, each word once. A bag of
    words, so no tag binds a colour or a place to its shape. Place and count are here because an
    encoder trained on shapes and colours alone lost them (probes: position 22-35 %, count 56 %;
    docs/grounding.md sections 16-17)."""
    places = sorted({w for o in s.objects for w in o.position.split()})
    return [
        *sorted({o.shape for o in s.objects}),
        *sorted({o.colour for o in s.objects}),
        *places,
        number_word(len(s.objects)),
        BACKGROUND_WORDS[s.background],
    ]


def plural(shape: str, n: int = 2) -> str:
    if n == 1:
        return shape
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


def pick(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    return str(options[int(rng.integers(len(options)))])


def group_phrase(colour: str, shape: str, n: int, digits: bool = False, article: str = "a") -> str:
    """'three red circles', 'a blue star', '3 red circles'."""
    if n == 1:
        det = "an" if article == "a" and colour[0] in "aeiou" else article
        return f"{det} {colour} {shape}"
    count = str(n) if digits else number_word(n)
    return f"{count} {colour} {plural(shape, n)}"


def join_list(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def objects_phrase(scene: Scene, rng: np.random.Generator | None = None, digits: bool = False) -> str:
    groups = scene.kinds()
    if rng is not None and len(groups) > 1 and rng.random() < 0.5:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    return join_list([group_phrase(c, s, n, digits) for c, s, n in groups])


def background_phrase(scene: Scene) -> str:
    return f"{BACKGROUND_WORDS[scene.background]} {scene.tone}"


def reference_captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """n short captions in varied wording (templates, digit/word counts, order, synonyms)."""
    bg_word = BACKGROUND_WORDS[scene.background]
    total = len(scene.objects)
    label = scene.label
    templates = [
        lambda o: f"{o} on a {bg_word} background.",
        lambda o: f"A {bg_word} background with {o}.",
        lambda o: (
            f"{'There is' if total == 1 else 'There are'} {number_word(total)} "
            f"{'shape' if total == 1 else 'shapes'}: {o}."
        ),
        lambda o: f"{o} against a {bg_word} {scene.tone} backdrop.",
        lambda o: f"An image of {o}.",
        lambda o: f"A picture showing {o}.",
        lambda o: f"Simple shapes: {o} on {bg_word} {scene.tone}.",
        lambda o: f"{o}, drawn on a {bg_word} background.",
    ]
    order = rng.permutation(len(templates))[:n]
    out = []
    for i, t in enumerate(order):
        text = templates[int(t)](objects_phrase(scene, rng, digits=rng.random() < 0.3))
        if label and (i < 2 or rng.random() < 0.4):  # the TextCaps role: some refs read the label
            text = text[:-1] + pick(
                rng, [f" with a label reading {label}.", f", one labeled {label}.", f" and the text {label}."]
            )
        out.append(text[0].upper() + text[1:])
    return out


def short_caption(scene: Scene, rng: np.random.Generator) -> str:
    return reference_captions(scene, rng, 1)[0]


# How an interleaved document's captions are written: one style per document, as a web page keeps
# its own. "reference" is the eval references' style (the COCO role); the others are the web's
# alt-text and the dense re-captions. Only some documents caption in the references' style, so a
# 0-shot prompt does not say which style the task wants and demonstrations do (MM1's few-shot gain
# on COCO, 0 -> 8 shots, is largely this).
CAPTION_STYLES = {"reference": 0.4, "alt": 0.3, "dense": 0.3}


def pick_caption_style(rng: np.random.Generator) -> str:
    names = list(CAPTION_STYLES)
    return names[int(rng.choice(len(names), p=list(CAPTION_STYLES.values())))]


def caption_in_style(scene: Scene, style: str, rng: np.random.Generator) -> str:
    if style == "reference":
        return short_caption(scene, rng)
    if style == "alt":
        return alt_text(scene, rng, int(rng.integers(10000)))
    if style == "dense":
        return dense_description(scene)
    raise ValueError(f"unknown caption style {style!r}; expected one of {sorted(CAPTION_STYLES)}")


def _object_detail(o: Obj) -> str:
    return f"a {o.size} one {POSITION_PHRASES[o.position]}"


def dense_description(scene: Scene) -> str:
    """The complete description: every group with its count, every object's size and position,
    the background and the label. Deterministic given the scene (no RNG): one canonical text."""
    total = len(scene.objects)
    parts = []
    for colour, shape, n in scene.kinds():
        objs = [o for o in scene.objects if o.kind == (colour, shape)]
        if n == 1:
            o = objs[0]
            parts.append(f"one {o.size} {colour} {shape} {POSITION_PHRASES[o.position]}")
        else:
            parts.append(f"{number_word(n)} {colour} {plural(shape)} ({join_list([_object_detail(o) for o in objs])})")
    bg = {
        "plain": f"a plain {scene.tone} background",
        "gradient": f"a background fading from {scene.tone} to {scene.tone2}",
        "noise": f"a mottled {scene.tone} background",
        "stripes": f"a background striped in {scene.tone} and {scene.tone2}",
    }[scene.background]
    head = f"{number_word(total).capitalize()} {'shape' if total == 1 else 'shapes'} on {bg}: "
    text = head + join_list(parts) + "."
    lab = scene.labelled
    if lab is not None:
        text += (
            f' The {lab.colour} {lab.shape} {POSITION_PHRASES[lab.position]} carries a label that reads "{lab.label}".'
        )
    return text


def alt_text(scene: Scene, rng: np.random.Generator, index: int) -> str:
    """Web-style alt-text: short, lowercase-ish, often partial, sometimes useless."""
    o = scene.objects[int(rng.integers(len(scene.objects)))]
    r = rng.random()
    if r < 0.12:
        return pick(
            rng,
            [
                "nice picture",
                "image",
                "untitled",
                "wallpaper",
                "clip art",
                "abstract art",
                "see more",
                "photo",
                "background design",
                "download",
            ],
        )
    if r < 0.22:
        return pick(
            rng,
            [
                f"img_{index % 10000:04d} shapes",
                f"IMG_{index % 10000:04d}.png",
                f"shapes_{index % 997}",
                f"dsc{index % 10000:04d}",
                f"pattern-{index % 500}",
            ],
        )
    if r < 0.55:
        return pick(
            rng,
            [
                f"{o.colour} {o.shape}",
                f"{o.shape}",
                f"{plural(o.shape)}",
                f"{o.colour} {plural(o.shape)}",
                f"{o.colour} shape",
                f"{o.shape} icon",
                f"{o.colour} {o.shape} clipart",
            ],
        )
    if r < 0.8:
        c, s, n = scene.kinds()[0]
        text = group_phrase(c, s, n, digits=rng.random() < 0.5)
        if rng.random() < 0.4:
            text += f" on {BACKGROUND_WORDS[scene.background]} background"
        return text
    if r < 0.9 and scene.label:
        return pick(rng, [f"{scene.label} sign", f"label {scene.label}", f"{o.shape} {scene.label}"])
    return pick(
        rng,
        [
            f"{o.colour} and {scene.tone} design",
            f"geometric {plural(o.shape)}",
            f"{len(scene.objects)} shapes",
            f"cute {o.shape} pattern",
            f"{scene.tone} background {plural(o.shape)}",
        ],
    )
