"""Text-only knowledge: invented names for object kinds, their point values, shape geometry and
small arithmetic, written as varied prose documents plus the questions that test them.

These facts appear *only* in the text part of the world (never in captions or interleaved
documents), so a model can answer "What colour is a zib?" only if text-only data reached it; that
is what lets the text share of the mixture (MM1 lesson 4) show up in a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from mm1.data.world.language import number_word, pick, plural
from mm1.data.world.scenes import COLOURS, SHAPES, SIZES

ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "bl",
    "dr",
    "gl",
    "pl",
    "tr",
    "sk",
    "sn",
    "zw",
)
VOWELS = ("a", "e", "i", "o", "u", "oo", "ei")
CODAS = ("", "b", "k", "m", "n", "p", "t", "x", "rk", "sh", "nd")
CORNERS = {"triangle": 3, "square": 4, "diamond": 4, "hexagon": 6, "circle": 0, "star": 10, "cross": 12}
# generated words containing these are rejected (rude or too close to real words)
BLOCKED = (
    "boob",
    "poo",
    "pee",
    "dic",
    "dik",
    "fuk",
    "fuc",
    "sex",
    "tit",
    "ass",
    "cum",
    "nig",
    "fag",
    "cok",
    "bum",
    "rap",
    "nazi",
    "porn",
    "turd",
    "fart",
    "piss",
    "anal",
    "anus",
    "kkk",
    "gay",
    "sin",
    "kil",
    "die",
    "dead",
)
REAL_WORDS = frozenset(
    "skin skit snap snip snob snub snot plan plot plum plus glad glum glut trap trim trip trot drum drip drop "
    "blob blot blur drug trek skim skid sked bled plod pled slid dram drab glib glen tram "
    "bond band bend bind fond fund land lend mend mind pond sand send tend wind rind "
    "damn dent done gone line mine nine pine tune zone vine lone bone tone cone".split()
)
NAMES = ("Mia", "Tom", "Ana", "Leo", "Sara", "Omar", "Yuki", "Ben", "Lena", "Ravi", "Ines", "Kofi")


@dataclass(frozen=True)
class Creature:
    """An invented word for one (size, colour, shape) kind, with a point value."""

    name: str
    size: str
    colour: str
    shape: str
    points: int

    @property
    def plural(self) -> str:
        return plural(self.name)


@lru_cache(maxsize=8)
def make_lexicon(seed: int, n: int) -> tuple[Creature, ...]:
    """n invented words with distinct spellings and distinct (size, colour, shape) kinds."""
    rng = np.random.default_rng([seed, 7001])
    names: set[str] = set()
    kinds: set[tuple[str, str, str]] = set()
    out = []
    while len(out) < n:
        syll = int(rng.choice([1, 2], p=[0.6, 0.4]))
        word = (
            "".join(pick(rng, ONSETS) + pick(rng, VOWELS) for _ in range(syll - 1))
            + pick(rng, ONSETS)
            + pick(rng, VOWELS)
            + pick(rng, CODAS)
        )
        kind = (pick(rng, SIZES), pick(rng, list(COLOURS)), pick(rng, SHAPES))
        if len(word) < 4 or word in names or kind in kinds or any(b in word for b in BLOCKED) or word in REAL_WORDS:
            continue
        names.add(word)
        kinds.add(kind)
        out.append(Creature(word, *kind, points=int(rng.integers(1, 10))))
    return tuple(out)


def _an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def definition(c: Creature, rng: np.random.Generator) -> str:
    return pick(
        rng,
        [
            f"{_an(c.name).capitalize()} is {_an(c.size)} {c.colour} {c.shape}.",
            f"{c.plural.capitalize()} are {c.size} {c.colour} {plural(c.shape)}.",
            f"If you see {_an(c.size)} {c.colour} {c.shape}, you are looking at {_an(c.name)}.",
            f"The {c.name} is {c.colour}, {c.size} and shaped like {_an(c.shape)}.",
            f"Every {c.name} has the shape of {_an(c.shape)}. "
            f"{c.plural.capitalize()} are always {c.colour} and {c.size}.",
            f"People call {_an(c.size)} {c.colour} {c.shape} {_an(c.name)}.",
        ],
    )


def points_fact(c: Creature, rng: np.random.Generator) -> str:
    p = c.points
    return pick(
        rng,
        [
            f"{_an(c.name).capitalize()} is worth {p} {'point' if p == 1 else 'points'}.",
            f"{c.plural.capitalize()} are worth {number_word(p)} {'point' if p == 1 else 'points'} each.",
            f"In the game, every {c.name} scores {p}.",
        ],
    )


def sum_fact(cs: list[Creature], counts: list[int]) -> tuple[str, int]:
    total = sum(c.points * k for c, k in zip(cs, counts))
    items = [f"{number_word(k)} {c.name if k == 1 else c.plural}" for c, k in zip(cs, counts)]
    what = " and ".join(items)
    terms = " + ".join(f"{k} x {c.points}" for c, k in zip(cs, counts))
    return f"{what.capitalize()} are worth {terms} = {total} points.", total


def geometry_fact(rng: np.random.Generator) -> str:
    shape = pick(rng, list(CORNERS))
    n = CORNERS[shape]
    if shape == "circle":
        return pick(rng, ["A circle has no corners.", "Circles are round and have no corners."])
    if shape == "star":
        return pick(rng, ["A star has five points and ten corners.", "Stars have five tips."])
    return pick(rng, [f"{_an(shape).capitalize()} has {number_word(n)} corners.", f"Every {shape} has {n} corners."])


def arithmetic_fact(rng: np.random.Generator) -> str:
    a, b = int(rng.integers(0, 21)), int(rng.integers(0, 21))
    if rng.random() < 0.6:
        return pick(
            rng,
            [
                f"{a} plus {b} is {a + b}.",
                f"{number_word(a).capitalize()} plus {number_word(b)} equals {number_word(a + b)}.",
                f"{a} + {b} = {a + b}.",
            ],
        )
    hi, lo = max(a, b), min(a, b)
    return pick(rng, [f"{hi} minus {lo} is {hi - lo}.", f"{hi} - {lo} = {hi - lo}."])


def story(cs: list[Creature], rng: np.random.Generator) -> str:
    c = cs[0]
    who = pick(rng, NAMES)
    a, b = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    return (
        f"{who} had {number_word(a)} {c.name if a == 1 else c.plural}. {who} found {number_word(b)} more. "
        f"Now {who} has {a + b} {c.plural}, worth {(a + b) * c.points} points, because each {c.name} is worth "
        f"{c.points}."
    )


def text_document(lexicon: tuple[Creature, ...], rng: np.random.Generator) -> str:
    """One document: a few definitions plus points, sums, geometry, arithmetic or a short story."""
    k = int(rng.integers(1, 4))
    cs = [lexicon[int(i)] for i in rng.choice(len(lexicon), k, replace=False)]
    sentences = []
    for c in cs:
        sentences.append(definition(c, rng))
        if rng.random() < 0.6:
            sentences.append(points_fact(c, rng))
    extra = rng.random()
    if extra < 0.3 and len(cs) >= 2:
        sentences.append(sum_fact(cs[:2], [int(rng.integers(1, 4)) for _ in range(2)])[0])
    elif extra < 0.5:
        sentences.append(story(cs, rng))
    elif extra < 0.75:
        sentences += [geometry_fact(rng) for _ in range(int(rng.integers(1, 3)))]
    else:
        sentences += [arithmetic_fact(rng) for _ in range(int(rng.integers(1, 4)))]
    order = rng.permutation(len(sentences)) if rng.random() < 0.3 else range(len(sentences))
    return " ".join(sentences[int(i)] for i in order)


def text_question(lexicon: tuple[Creature, ...], rng: np.random.Generator) -> tuple[str, str]:
    """(question, answer) answerable only from the text documents (or by arithmetic)."""
    c = lexicon[int(rng.integers(len(lexicon)))]
    r = rng.random()
    if r < 0.15:
        return pick(rng, [f"What color is {_an(c.name)}?", f"What colour is {_an(c.name)}?"]), c.colour
    if r < 0.3:
        return f"What shape is {_an(c.name)}?", c.shape
    if r < 0.38:
        return f"Is {_an(c.name)} small or large?", c.size
    if r < 0.5:
        return f"How many points is {_an(c.name)} worth?", str(c.points)
    if r < 0.6:
        k = int(rng.integers(2, 4))
        return f"How many points are {number_word(k)} {c.plural} worth?", str(k * c.points)
    if r < 0.75 and len(lexicon) > 1:
        d = lexicon[int(rng.integers(len(lexicon)))]
        if d != c:
            k, m = int(rng.integers(1, 4)), int(rng.integers(1, 4))
            what = (
                f"{number_word(k)} {c.name if k == 1 else c.plural} and "
                f"{number_word(m)} {d.name if m == 1 else d.plural}"
            )
            return f"How many points are {what} worth?", str(k * c.points + m * d.points)
    if r < 0.8:
        shape = pick(rng, ["triangle", "square", "diamond", "hexagon", "circle"])
        return f"How many corners does {_an(shape)} have?", str(CORNERS[shape])
    a, b = int(rng.integers(0, 21)), int(rng.integers(0, 21))
    if rng.random() < 0.6:
        return f"What is {a} plus {b}?", str(a + b)
    return f"What is {max(a, b)} minus {min(a, b)}?", str(max(a, b) - min(a, b))


def lexicon_split(lexicon: tuple[Creature, ...], split: str) -> tuple[Creature, ...]:
    """Eval questions about disjoint halves of the lexicon: train demos never give the test answers."""
    return lexicon[0::2] if split == "train" else lexicon[1::2]
