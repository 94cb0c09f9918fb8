"""Scenes of the synthetic world: sampling them from a seeded RNG and rendering them with Pillow.

A scene is a few coloured shapes in the cells of a 3x3 grid on a textured background; some carry a
short printed label. Everything a caption or question says about an image is read off the `Scene`
record, so text and pixels never disagree. The label is drawn with Pillow's built-in bitmap font
(6 px wide glyphs) *after* the shapes are downsampled, so it is crisp at the native size (128 px
for tiny) and mostly unreadable once an encoder resizes the image to half that: reading it needs
resolution, which is the TextVQA/TextCaps role in the MM1 ablations.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 40),
    "orange": (245, 135, 20),
    "purple": (135, 45, 175),
    "pink": (245, 125, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "brown": (125, 75, 35),
}
SIZES = ("small", "large")
# 3x3 grid cells, row-major; the name is what captions and position answers say
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = ("plain", "gradient", "noise", "stripes")
# muted tones that every object colour stands out against
TONES: dict[str, tuple[int, int, int]] = {
    "grey": (150, 150, 150),
    "light grey": (195, 195, 195),
    "beige": (205, 190, 155),
    "slate": (95, 110, 125),
    "sand": (180, 165, 120),
    "teal": (90, 140, 140),
}
LABEL_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ2345679"  # no O/0, I/1: the label should be readable, not a trick
# shape radius as a fraction of the image side ("huge": the single world). Generator 5 raised small /
# large from 0.075 / 0.14: at the encoder's 64 px a small shape was ~10 px across and a hexagon and a
# circle differed by a pixel or two (docs/grounding.md section 14); a large one about fills its cell
SCALE = {
    "small": 0.11,
    "large": 0.17,
    "huge": 0.25,
}
SUPERSAMPLE = 2  # shapes are drawn at 2x and box-downsampled: cheap anti-aliasing


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    cell: int  # index into POSITIONS
    label: str = ""  # printed on the object ("" = none)
    dx: float = 0.0  # jitter inside the cell, fraction of the cell side
    dy: float = 0.0
    angle: float = 0.0  # degrees, for shapes that look different rotated

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def kind(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass
class Scene:
    objects: list[Obj]
    background: str
    tone: str
    tone2: str = ""  # second tone of gradients and stripes
    pattern: int = 0  # direction / frequency variant of the background
    texture_seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return next((o.label for o in self.objects if o.label), "")

    @property
    def labelled(self) -> Obj | None:
        return next((o for o in self.objects if o.label), None)

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum((shape is None or o.shape == shape) and (colour is None or o.colour == colour) for o in self.objects)

    def kinds(self) -> list[tuple[str, str, int]]:
        """(colour, shape, count) groups in order of first appearance."""
        seen: dict[tuple[str, str], int] = {}
        for o in self.objects:
            seen[o.kind] = seen.get(o.kind, 0) + 1
        return [(c, s, n) for (c, s), n in seen.items()]

    def to_dict(self) -> dict:
        """JSON-ready metadata (what the caption json and eval files store about the scene)."""
        objects = [
            {
                "shape": o.shape,
                "colour": o.colour,
                "size": o.size,
                "position": o.position,
                "cell": o.cell,
                "label": o.label,
                "dx": round(o.dx, 4),
                "dy": round(o.dy, 4),
                "angle": round(o.angle, 4),
            }
            for o in self.objects
        ]
        return {
            "objects": objects,
            "background": self.background,
            "tone": self.tone,
            "tone2": self.tone2,
            "pattern": self.pattern,
            "texture_seed": self.texture_seed,
        }


def random_label(rng: np.random.Generator) -> str:
    n = int(rng.integers(2, 4))
    return "".join(LABEL_CHARS[i] for i in rng.integers(0, len(LABEL_CHARS), n))


def sample_scene(
    rng: np.random.Generator,
    n_objects: int | None = None,
    kinds: list[tuple[str, str]] | None = None,
    label_prob: float = 0.35,
) -> Scene:
    """1-5 objects of 1-3 (colour, shape) kinds in distinct cells; `kinds` forces the kinds used."""
    colours = list(COLOURS)
    n = int(n_objects or _weighted(rng, [0.2, 0.25, 0.25, 0.15, 0.15]) + 1)
    if kinds is None:
        n_kinds = min(n, _weighted(rng, [0.35, 0.4, 0.25]) + 1)
        kinds = []
        while len(kinds) < n_kinds:
            c, sh = rng.integers(0, [len(colours), len(SHAPES)])
            if (colours[c], SHAPES[sh]) not in kinds:
                kinds.append((colours[c], SHAPES[sh]))
    assign = list(range(len(kinds))) + rng.integers(0, len(kinds), max(0, n - len(kinds))).tolist()
    cells = rng.permutation(len(POSITIONS))[:n].tolist()
    u = rng.random((n, 4)).tolist()  # size, dx, dy, angle per object
    objs = [
        Obj(
            shape=kinds[k][1],
            colour=kinds[k][0],
            size=SIZES[int(v[0] * 2)],
            cell=c,
            dx=(v[1] - 0.5) * 0.24,
            dy=(v[2] - 0.5) * 0.24,
            angle=(v[3] - 0.5) * 24,
        )
        for k, c, v in zip(assign[:n], cells, u)
    ]
    objs.sort(key=lambda o: o.cell)  # reading order: captions and lists enumerate objects this way
    if rng.random() < label_prob:
        target = objs[int(rng.integers(len(objs)))]
        target.size = "large"  # the label plate needs room
        target.label = random_label(rng)
    tones = list(TONES)
    t1, t2, bg, pattern, texture = rng.integers(0, [len(tones), len(tones) - 1, len(BACKGROUNDS), 4, 2**31]).tolist()
    tone2 = [t for t in tones if t != tones[t1]][t2]
    return Scene(objs, background=BACKGROUNDS[bg], tone=tones[t1], tone2=tone2, pattern=pattern, texture_seed=texture)


def _weighted(rng: np.random.Generator, p: list[float]) -> int:
    """Index drawn with probabilities p (cheaper than Generator.choice for tiny lists)."""
    u, acc = rng.random() * sum(p), 0.0
    for i, w in enumerate(p):
        acc += w
        if u < acc:
            return i
    return len(p) - 1


# ----------------------------------------------------------------------------- rendering


@lru_cache(maxsize=64)
def _mask(kind: str, pattern: int, side: int) -> Image.Image:
    """Greyscale blend mask of a gradient or stripe pattern; shared by every scene that uses it."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / max(side - 1, 1)
    if kind == "gradient":
        t = [yy, xx, (yy + xx) / 2, (yy + 1 - xx) / 2][pattern]
    else:  # stripes of a fixed period relative to the image, four orientations
        period = [8, 12, 16, 10][pattern] / 128
        t = np.floor([yy, xx, yy + xx, yy - xx + 1][pattern] / period) % 2 * 0.45  # soft stripe: objects stay visible
    return Image.fromarray((t * 255).round().astype(np.uint8), "L")


def _background(scene: Scene, side: int) -> Image.Image:
    a = TONES[scene.tone]
    if scene.background == "plain":
        return Image.new("RGB", (side, side), a)
    if scene.background in ("gradient", "stripes"):
        b = Image.new("RGB", (side, side), TONES[scene.tone2])
        return Image.composite(b, Image.new("RGB", (side, side), a), _mask(scene.background, scene.pattern, side))
    # noise: smooth blotches, a coarse random field upsampled bicubically
    r = np.random.default_rng(scene.texture_seed)
    n = 6 + scene.pattern
    field_ = r.normal(0.0, 18.0, (n, n, 1)) * np.array([1.0, 0.95, 0.9]) + np.array(a)
    coarse = Image.fromarray(np.clip(field_, 0, 255).astype(np.uint8), "RGB")
    return coarse.resize((side, side), Image.BICUBIC)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: list[float], start: float) -> list[tuple[float, float]]:
        pts = []
        for i in range(n):
            t = np.deg2rad(start + angle + 360.0 * i / n)
            rr = radii[i % len(radii)]
            pts.append((cx + rr * np.cos(t), cy + rr * np.sin(t)))
        return pts

    if shape == "square":
        return ring(4, [r * 1.25], 45)
    if shape == "diamond":
        return ring(4, [r * 1.15, r * 0.8], -90)
    if shape == "triangle":
        return ring(3, [r * 1.2], -90)
    if shape == "star":
        return ring(10, [r * 1.2, r * 0.5], -90)
    if shape == "hexagon":
        return ring(6, [r * 1.05], 0)
    if shape == "cross":
        w = r * 0.38
        base = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]
    raise ValueError(f"no polygon for shape {shape!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, o: Obj, cx: float, cy: float, r: float, rgb: tuple[int, int, int]) -> None:
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif o.shape == "heart":
        lobe = r * 0.55
        draw.ellipse([cx - 2 * lobe + 0.1 * r, cy - r * 0.75, cx + 0.1 * r, cy - r * 0.75 + 2 * lobe], fill=rgb)
        draw.ellipse([cx - 0.1 * r, cy - r * 0.75, cx + 2 * lobe - 0.1 * r, cy - r * 0.75 + 2 * lobe], fill=rgb)
        draw.polygon([(cx - r * 0.98, cy - r * 0.05), (cx + r * 0.98, cy - r * 0.05), (cx, cy + r * 1.05)], fill=rgb)
    else:
        draw.polygon(_polygon(o.shape, cx, cy, r, o.angle), fill=rgb)


_FONT: ImageFont.ImageFont | None = None


def _font() -> ImageFont.ImageFont:
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default_imagefont()  # bitmap: identical pixels on every machine
    return _FONT


def _centre(o: Obj, px: float) -> tuple[float, float]:
    cell = px / 3
    row, col = divmod(o.cell, 3)
    return (col + 0.5 + o.dx) * cell, (row + 0.5 + o.dy) * cell


def render(scene: Scene, px: int = 128) -> Image.Image:
    """The scene as an RGB image of px x px pixels (shapes anti-aliased, label crisp)."""
    s = SUPERSAMPLE
    big = _background(scene, px * s)
    draw = ImageDraw.Draw(big)
    jitter = np.random.default_rng(scene.texture_seed + 1).integers(-10, 11, (len(scene.objects), 3)).tolist()
    for o, jit in zip(scene.objects, jitter):
        cx, cy = _centre(o, px * s)
        rgb = tuple(min(255, max(0, v + j)) for v, j in zip(COLOURS[o.colour], jit))
        _draw_shape(draw, o, cx, cy, SCALE[o.size] * px * s, rgb)  # type: ignore[arg-type]
    img = big.reduce(s)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        if o.label:
            cx, cy = _centre(o, px)
            left, top, right, bottom = _font().getbbox(o.label)
            w, h = right - left, bottom - top
            x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
            draw.rectangle([x0 - 2, y0 - 1, x0 + w + 1, y0 + h], fill=(250, 250, 245), outline=(30, 30, 30))
            draw.text((x0 - left, y0 - top), o.label, fill=(0, 0, 0), font=_font())
    return img


def png_bytes(img: Image.Image) -> bytes:
    """PNG without metadata chunks: the same pixels always give the same bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=2)  # 2x faster than the default 6, ~20 % more bytes
    return buf.getvalue()
