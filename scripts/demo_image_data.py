"""The pictures scripts/train_demo_image_model.py trains on: one coloured shape on a coloured
background, drawn here, with its caption; and which attribute combinations are held out.

    "a small red circle on a blue background, top left"
       size  colour shape      background     position

Every picture is SIZE x SIZE pixels, drawn with PIL at 4x and downsampled (antialiased edges).
A shape is given by its centre and half-extent h (its bounding box is 2h x 2h), so the checker
(demo_image_report.py) can redraw a template over what it found:

    circle      disc of radius h
    square      the 2h x 2h box
    triangle    apex (cx, cy - h), base corners (cx -/+ h, cy + h)
    cross       plus sign: two 2h x 0.8h bars

Held out: `num_holdout` (shape, colour, background) triples, drawn with the seed among those
whose removal leaves every pair of the three attributes in training. No picture of a held-out
triple is ever drawn for training (VAE or denoiser), at any position or size.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np

SIZE = 64  # pixels per side
SUPERSAMPLE = 4
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 40),
    "green": (40, 160, 70), "blue": (40, 80, 220), "purple": (140, 60, 180),
    "white": (240, 240, 240), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "cross")
# centre, as fractions of the side; the names are the caption's words
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75), "in the center": (0.5, 0.5),
}
SIZES: dict[str, float] = {"small": 0.14, "large": 0.22}  # half-extent, as a fraction of the side
JITTER_CENTRE = 2.0  # pixels, uniform +-, per axis
JITTER_HALF = 1.0  # pixels, uniform +-
JITTER_COLOUR = 12  # per channel, uniform +-, on shape and background independently


@dataclass(frozen=True)
class Caption:
    shape: str
    colour: str
    background: str
    position: str
    size: str

    @property
    def text(self) -> str:
        return (f"a {self.size} {self.colour} {self.shape} on a {self.background} background, "
                f"{self.position}")

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.background)


def all_triples() -> list[tuple[str, str, str]]:
    return [(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if c != b]


def _pairs(triple: tuple[str, str, str]) -> list[tuple[int, str, str]]:
    s, c, b = triple
    return [(0, s, c), (1, s, b), (2, c, b)]


def split_triples(seed: int, num_holdout: int) -> tuple[list, list]:
    """(training triples, held-out triples): a seeded draw of `num_holdout` triples such that
    every (shape, colour), (shape, background) and (colour, background) pair keeps at least
    one training triple, and no colour is held out as a shape colour more than twice."""
    triples = all_triples()
    order = list(triples)
    random.Random(seed).shuffle(order)
    left = {p: 0 for t in triples for p in _pairs(t)}
    for t in triples:
        for p in _pairs(t):
            left[p] += 1
    held, per_colour = [], dict.fromkeys(COLOURS, 0)
    for t in order:
        if len(held) == num_holdout:
            break
        if per_colour[t[1]] >= 2 or any(left[p] <= 1 for p in _pairs(t)):
            continue
        held.append(t)
        per_colour[t[1]] += 1
        for p in _pairs(t):
            left[p] -= 1
    held_set = set(held)
    return [t for t in triples if t not in held_set], sorted(held)


def captions_of(triples) -> list[Caption]:
    """Every caption of the triples: all positions and sizes."""
    return [Caption(s, c, b, pos, size) for (s, c, b), pos, size
            in itertools.product(triples, POSITIONS, SIZES)]


def shape_polygons(shape: str, cx: float, cy: float, h: float) -> list[list[tuple]]:
    """The shape as polygons (a circle as a 64-gon), in pixels."""
    if shape == "circle":
        a = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return [list(zip(cx + h * np.cos(a), cy + h * np.sin(a)))]
    if shape == "square":
        return [[(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "triangle":
        return [[(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "cross":
        w = 0.4 * h
        return [[(cx - h, cy - w), (cx + h, cy - w), (cx + h, cy + w), (cx - h, cy + w)],
                [(cx - w, cy - h), (cx + w, cy - h), (cx + w, cy + h), (cx - w, cy + h)]]
    raise ValueError(f"unknown shape {shape!r}")


def coverage(shape: str, cx: float, cy: float, h: float, size: int = SIZE) -> np.ndarray:
    """float32 [size, size] in [0, 1]: how much of each pixel the shape covers."""
    from PIL import Image, ImageDraw

    k = SUPERSAMPLE
    img = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(img)
    for poly in shape_polygons(shape, cx, cy, h):
        draw.polygon([(x * k, y * k) for x, y in poly], fill=255)
    img = img.resize((size, size), Image.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def draw(caption: Caption, rng: np.random.Generator) -> np.ndarray:
    """uint8 [SIZE, SIZE, 3]: the caption's picture, jittered by `rng`."""
    fx, fy = POSITIONS[caption.position]
    cx, cy = fx * SIZE + rng.uniform(-JITTER_CENTRE, JITTER_CENTRE), \
        fy * SIZE + rng.uniform(-JITTER_CENTRE, JITTER_CENTRE)
    h = SIZES[caption.size] * SIZE + rng.uniform(-JITTER_HALF, JITTER_HALF)
    cover = coverage(caption.shape, cx, cy, h)[..., None]

    def colour(name: str) -> np.ndarray:
        jitter = rng.integers(-JITTER_COLOUR, JITTER_COLOUR + 1, size=3)
        return np.clip(np.array(COLOURS[name]) + jitter, 0, 255).astype(np.float32)

    fg, bg = colour(caption.colour), colour(caption.background)
    return np.round(cover * fg + (1 - cover) * bg).astype(np.uint8)


def draw_dataset(captions: list[Caption], count: int, seed: int) -> tuple[np.ndarray, list]:
    """`count` pictures ([count, SIZE, SIZE, 3] uint8) cycling through the captions in seeded
    order (each caption count / len(captions) times, +-1), and their captions."""
    rng = np.random.default_rng(seed)
    order: list[Caption] = []
    while len(order) < count:
        order += [captions[i] for i in rng.permutation(len(captions))]
    order = order[:count]
    return np.stack([draw(c, rng) for c in order]), order
