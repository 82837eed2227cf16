"""Procedural (prompt, image) pairs for the miniature text-to-image model.

Each image holds one or two flat-coloured shapes at cells of a fixed 3x3 grid, drawn over a random,
low-saturation texture or gradient background that the prompt never mentions. Prompts put the position
before the object ("top left: red circle") because CLIP's text encoder is causal. A fixed list of
(colour, shape, position) triples is held out: the training sampler never draws them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
GRID = 3
CELL_CENTERS = (12, 32, 52)  # pixel centres of the grid cells along each axis
OBJECT_HALF = 9  # objects fit a fixed 18 px box

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (225, 45, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
POSITIONS: tuple[str, ...] = tuple(f"{r} {c}" for r in ROWS for c in COLS)
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
N_POS = len(POSITIONS)
N_CLASSES = len(COLOURS) * len(SHAPES)  # (colour, shape) classes; +1 for "empty" in the classifier

#: Every word a prompt can contain (each must be a single tokenizer token).
WORDS: tuple[str, ...] = (*ROWS, *COLS, *COLOUR_NAMES, *SHAPES, "and", ":")


@dataclass(frozen=True)
class Obj:
    """One foreground object: indices into COLOUR_NAMES, SHAPES and POSITIONS."""

    colour: int
    shape: int
    pos: int

    @property
    def text(self) -> str:
        return f"{POSITIONS[self.pos]}: {COLOUR_NAMES[self.colour]} {SHAPES[self.shape]}"

    @property
    def cls(self) -> int:
        """(colour, shape) class index in [0, N_CLASSES)."""
        return self.colour * len(SHAPES) + self.shape


def held_out_triples() -> list[tuple[int, int, int]]:
    """(colour, shape, pos) triples the training sampler never produces (18 of 180, spread evenly)."""
    return [
        (c, s, p)
        for c in range(len(COLOURS))
        for s in range(len(SHAPES))
        for p in range(N_POS)
        if (c + 2 * s + 3 * p) % 10 == 0
    ]


_HELD_OUT = frozenset(held_out_triples())


def is_held_out(obj: Obj) -> bool:
    return (obj.colour, obj.shape, obj.pos) in _HELD_OUT


def prompt_for(objs: list[Obj] | tuple[Obj, ...]) -> str:
    """Prompt text; objects are listed in grid reading order."""
    return " and ".join(o.text for o in sorted(objs, key=lambda o: o.pos))


def parse_prompt(prompt: str) -> list[Obj]:
    """Inverse of :func:`prompt_for`, read as the model's tokenizer reads it: in any case and spacing."""
    objs = []
    for part in " ".join(prompt.lower().split()).split(" and "):
        pos, what = part.split(":")
        colour, shape = what.split()
        objs.append(Obj(COLOUR_NAMES.index(colour), SHAPES.index(shape), POSITIONS.index(pos.strip())))
    return objs


def grammar() -> str:
    """The prompt language of the bundled model, in words, with an example."""
    example = prompt_for([Obj(0, 0, 0), Obj(1, 1, N_POS - 1)])
    return (
        f"prompts like {example!r}: '<row> <column>: <colour> <shape>', objects joined by ' and ', with rows "
        f"{', '.join(ROWS)}; columns {', '.join(COLS)}; colours {', '.join(COLOUR_NAMES)}; shapes "
        f"{', '.join(SHAPES)}"
    )


def parse_prompts(prompts: list[str]) -> list[list[Obj] | None]:
    """`parse_prompt` of each prompt, None for a prompt outside the grammar (the bundled model draws textures
    for it, and the classifier cannot score its images)."""
    objects: list[list[Obj] | None] = []
    for prompt in prompts:
        try:
            objects.append(parse_prompt(prompt))
        except ValueError:
            objects.append(None)
    return objects


def outside_grammar(prompts: list[str]) -> list[str]:
    """The prompts that `parse_prompt` cannot read."""
    return [prompt for prompt, objs in zip(prompts, parse_prompts(prompts), strict=True) if objs is None]


def quote_some(prompts: list[str], shown: int) -> str:
    """The first `shown` prompts quoted, and how many more there are: "'a', 'b' and 3 more"."""
    quoted = ", ".join(repr(prompt) for prompt in prompts[:shown])
    return quoted + (f" and {len(prompts) - shown} more" if len(prompts) > shown else "")


def outside_grammar_warning(prompts: list[str]) -> str | None:
    """The CLI's warning for prompts given to the bundled model outside its language; None when all are in."""
    outside = outside_grammar(prompts)
    if not outside:
        return None
    shown = quote_some(outside, 3)
    return (
        f"imptome: warning: {len(outside)} of {len(prompts)} prompt(s) are outside the bundled model's "
        f"language and will come out as textures without objects: {shown}. It reads {grammar()}."
    )


def _shape_masks(supersample: int = 4) -> np.ndarray:
    """Anti-aliased float masks [n_shapes, n_pos, H, W] in [0, 1]."""
    ss = supersample
    size = IMAGE_SIZE * ss
    out = np.zeros((len(SHAPES), N_POS, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for si, shape in enumerate(SHAPES):
        for p in range(N_POS):
            cy, cx = CELL_CENTERS[p // GRID] * ss, CELL_CENTERS[p % GRID] * ss
            h = OBJECT_HALF * ss
            im = Image.new("L", (size, size), 0)
            d = ImageDraw.Draw(im)
            if shape == "circle":
                d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=255)
            elif shape == "square":
                q = int(h * 0.85)
                d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=255)
            elif shape == "triangle":
                d.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=255)
            else:  # cross
                w = int(h * 0.38)
                d.rectangle([cx - h, cy - w, cx + h, cy + w], fill=255)
                d.rectangle([cx - w, cy - h, cx + w, cy + h], fill=255)
            small = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
            out[si, p] = np.asarray(small, np.float32) / 255.0
    return out


MASKS = _shape_masks()


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Value noise in [0, 1] of shape [H, W]: bilinear upsampling of a random cells x cells grid."""
    g = rng.random((cells, cells)).astype(np.float32)
    im = Image.fromarray((g * 255).astype(np.uint8))
    im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(im, np.float32) / 255.0


def _background(rng: np.random.Generator) -> np.ndarray:
    """Random low-saturation background [H, W, 3] in [0, 1]: gradient, noise, stripes or checks."""
    base = rng.uniform(0.25, 0.75)
    tint = rng.normal(0, 0.06, size=3).astype(np.float32)  # weak colour cast keeps saturation low
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / (IMAGE_SIZE - 1)
    if kind == 0:  # linear gradient in a random direction
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * xx + np.sin(a) * yy
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
        lum = base + rng.uniform(0.15, 0.4) * (t - 0.5)
    elif kind == 1:  # smooth value noise
        lum = base + rng.uniform(0.2, 0.45) * (_smooth_noise(rng, int(rng.integers(3, 9))) - 0.5)
    elif kind == 2:  # stripes
        a = rng.uniform(0, np.pi)
        f = rng.uniform(3, 8)
        lum = base + rng.uniform(0.1, 0.25) * np.sin(2 * np.pi * f * (np.cos(a) * xx + np.sin(a) * yy))
    else:  # checks
        n = int(rng.integers(3, 9))
        lum = base + rng.uniform(0.08, 0.2) * (((yy * n).astype(int) + (xx * n).astype(int)) % 2 - 0.5)
    lum = lum + rng.normal(0, 0.02, size=lum.shape).astype(np.float32)
    img = lum[..., None] + tint[None, None, :]
    return np.clip(img, 0, 1).astype(np.float32)


def render(objs: list[Obj] | tuple[Obj, ...], rng: np.random.Generator) -> np.ndarray:
    """Image [H, W, 3] float32 in [0, 1] with the objects drawn over a random background."""
    img = _background(rng)
    for o in objs:
        col = np.asarray(COLOURS[COLOUR_NAMES[o.colour]], np.float32) / 255.0
        col = np.clip(col + rng.normal(0, 0.03, size=3).astype(np.float32), 0, 1)
        m = MASKS[o.shape, o.pos][..., None]
        img = img * (1 - m) + col[None, None, :] * m
    return img


def object_mask(objs: list[Obj] | tuple[Obj, ...]) -> np.ndarray:
    """Union of the objects' masks [H, W] in [0, 1]."""
    m = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for o in objs:
        m = np.maximum(m, MASKS[o.shape, o.pos])
    return m


def sample_objects(rng: np.random.Generator, p_two: float = 0.5, allow_held_out: bool = False) -> list[Obj]:
    """One or two objects at distinct grid cells; held-out triples are rejected unless allowed."""
    n = 2 if rng.random() < p_two else 1
    pos = rng.choice(N_POS, size=n, replace=False)
    objs = []
    for p in pos:
        while True:
            o = Obj(int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES))), int(p))
            if allow_held_out or not is_held_out(o):
                break
        objs.append(o)
    return sorted(objs, key=lambda o: o.pos)


def training_pairs(
    n: int, seed: int = 0, p_two: float = 0.5
) -> tuple[list[str], np.ndarray, list[list[Obj]]]:
    """n deterministic training pairs: prompts, images [n, H, W, 3] uint8, and the object lists."""
    rng = np.random.default_rng(seed)
    prompts, objs_all = [], []
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i in range(n):
        objs = sample_objects(rng, p_two)
        images[i] = np.round(render(objs, rng) * 255).astype(np.uint8)
        prompts.append(prompt_for(objs))
        objs_all.append(objs)
    return prompts, images, objs_all


def held_out_prompts(seed: int = 1234) -> list[list[Obj]]:
    """Evaluation object lists: each held-out triple alone, and paired with a random second object."""
    rng = np.random.default_rng(seed)
    out: list[list[Obj]] = []
    for c, s, p in held_out_triples():
        out.append([Obj(c, s, p)])
    for c, s, p in held_out_triples():
        q = int(rng.choice([x for x in range(N_POS) if x != p]))
        other = Obj(int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES))), q)
        out.append(sorted([Obj(c, s, p), other], key=lambda o: o.pos))
    return out
