"""The shapes world: a small, deterministic, seeded world of flat shapes with captions, questions and edits.

One scene holds one or two flat shapes (circle, square, triangle) in a named colour and size on a
plain background.  Everything is drawn with Pillow's ``ImageDraw`` without antialiasing, so every
pixel is either the background or exactly one palette colour (the detector relies on that).

Layout, with ``m = min(width, height)``:

* a shape's box is square, ``2*h + 1`` pixels wide with ``h = round(SIZE_FRAC[size] * m)``,
  centred on the integer pixel ``(cx, cy)``; a triangle points up and fills the lower half of it;
* one shape sits at one of five anchors (``ANCHORS``: left/right/top/bottom/center, fractions of
  width and height) plus a small jitter, so its position word is the nearest anchor;
* two shapes sit at left+right anchors or top+bottom anchors; their position words are relative
  ("left"/"right" or "top"/"bottom") and the caption says "X left of Y", "X right of Y",
  "X above Y" or "X below Y".  The two shapes of a scene have different kinds and different
  colours, so "the circle" or "red" always names one shape.

Any width and height that are multiples of 32 work (64x64 by default; 128x96 etc.).

Splits: ``train`` and ``val`` never contain a shape whose (colour, kind, position word) combination
is in ``HELDOUT_TRIPLES`` (not in scenes nor in edit targets); every ``heldout`` scene contains at
least one such shape.  Every colour, kind and position, and every (colour, kind) pair, is seen in
training; what is held out is the combination of the three (the issue's "colour/shape/position
combinations never seen in training").

Everything is a pure function of its inputs and a ``numpy.random.Generator``; ``dataset(split, n,
seed)`` derives example ``i`` from ``(seed, split, i)`` alone, so a prefix of a larger dataset is
the smaller dataset.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 230, 40),
    "purple": (140, 50, 190),
    "orange": (250, 130, 20),
    "cyan": (40, 210, 220),
    "white": (240, 240, 240),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (128, 128, 128)}
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
# Half-extent of a shape's box as a fraction of min(width, height).
SIZE_FRAC: dict[str, float] = {"small": 0.10, "large": 0.18}
SIZES: tuple[str, ...] = tuple(SIZE_FRAC)
# Anchor positions as fractions of (width, height).
ANCHORS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
}
POSITIONS: tuple[str, ...] = tuple(ANCHORS)
JITTER_FRAC = 0.04  # max jitter of a shape's centre, fraction of min(width, height)
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
# Relation of the first-named shape to the second, keyed by the first shape's position word.
RELATIONS: dict[str, str] = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}
# Phrases of a single shape's position in detailed captions.
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}

# (colour, kind, position word) combinations never seen in train/val; each heldout scene holds at
# least one.  One position per (colour, kind) pair, spread so that every colour, kind and position
# is held out about equally often (24 of the 120 combinations); the pair itself is seen at the
# other four positions.
HELDOUT_TRIPLES: frozenset[tuple[str, str, str]] = frozenset(
    (c, k, POSITIONS[(2 * ci + ki) % len(POSITIONS)]) for ci, c in enumerate(COLOURS) for ki, k in enumerate(KINDS)
)
SPLITS: tuple[str, ...] = ("train", "val", "heldout")

QUESTION_TEMPLATES: dict[str, str] = {
    "count": "how many shapes are there?",
    "colour": "what colour is the {kind}?",
    "shape": "what shape is {colour}?",
    "position": "where is the {kind}?",
    "size": "what size is the {kind}?",
    "presence": "is there a {colour} {kind}?",
}
EDIT_TEMPLATES: dict[str, str] = {
    "recolour": "make the {kind} {colour}",
    "remove": "remove the {kind}",
    "move": "move the {kind} to the {position}",
    "resize": "make the {kind} {size}",
    "add": "add a {colour} {kind} {relation} the {ref_kind}",
}



def vocabulary() -> list[str]:
    """Every word the world's captions, questions, answers and instructions use (sorted)."""
    texts = [*COLOURS, *KINDS, *SIZES, *POSITIONS, *NUMBERS, "yes", "no", "and", "a", "nothing"]
    texts += [*RELATIONS.values(), *POSITION_PHRASES.values(), *QUESTION_TEMPLATES.values(), *EDIT_TEMPLATES.values()]
    words = set()
    for t in texts:
        for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", t)):
            words.add(w)
    return sorted(words)

# ----------------------------------------------------------------------------------------------
# Data types
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    cx: int  # centre of the shape's box, pixels
    cy: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}")
        if self.colour not in PALETTE:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.size not in SIZE_FRAC:
            raise ValueError(f"unknown size {self.size!r}")


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    width: int = 64
    height: int = 64
    background: str = "black"  # one of BACKGROUNDS

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple(self.shapes))
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")


@dataclass(frozen=True)
class QA:
    question: str
    answer: str  # a single word
    qtype: str  # a key of QUESTION_TEMPLATES


@dataclass(frozen=True)
class EditPair:
    instruction: str
    target_scene: Scene
    op: str  # a key of EDIT_TEMPLATES


@dataclass(frozen=True)
class Example:
    split: str
    index: int
    scene: Scene
    image: np.ndarray = field(repr=False, compare=False)  # uint8 (H, W, 3)
    caption: str  # short: "a red circle left of a blue square"
    caption_detailed: str  # with sizes and position: "a small red circle on the left"
    qas: tuple[QA, ...]
    edits: tuple[EditPair, ...]


# ----------------------------------------------------------------------------------------------
# Geometry and rendering
# ----------------------------------------------------------------------------------------------


def check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0 or width % 32 or height % 32:
        raise ValueError(f"width and height must be positive multiples of 32, got {width}x{height}")


def half_extent(size: str, width: int, height: int) -> int:
    return max(2, int(round(SIZE_FRAC[size] * min(width, height))))


def shape_box(shape: Shape, width: int, height: int) -> tuple[int, int, int, int]:
    """Inclusive pixel box (x0, y0, x1, y1) of a shape."""
    h = half_extent(shape.size, width, height)
    return shape.cx - h, shape.cy - h, shape.cx + h, shape.cy + h


def _boxes_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 1) -> bool:
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


def validate(scene: Scene) -> None:
    """Raise ValueError unless every shape lies inside the image and no two shapes' boxes touch."""
    check_size(scene.width, scene.height)
    boxes = [shape_box(s, scene.width, scene.height) for s in scene.shapes]
    for s, (x0, y0, x1, y1) in zip(scene.shapes, boxes):
        if x0 < 0 or y0 < 0 or x1 >= scene.width or y1 >= scene.height:
            raise ValueError(f"{s} lies outside the {scene.width}x{scene.height} image")
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            if _boxes_overlap(boxes[i], boxes[j]):
                raise ValueError(f"{scene.shapes[i]} and {scene.shapes[j]} overlap")


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, width: int, height: int) -> None:
    x0, y0, x1, y1 = shape_box(shape, width, height)
    fill = PALETTE[shape.colour]
    if shape.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    else:  # upward triangle
        draw.polygon([(x0, y1), (x1, y1), (shape.cx, y0)], fill=fill)


def render(scene: Scene) -> np.ndarray:
    """The scene as a uint8 (height, width, 3) array; flat colours, no antialiasing."""
    check_size(scene.width, scene.height)
    img = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        draw_shape(draw, s, scene.width, scene.height)
    return np.asarray(img, dtype=np.uint8).copy()


def position_words(centres: Sequence[tuple[float, float]], width: int, height: int) -> list[str]:
    """Position word of each centre; shared by the generator and the detector.

    One centre: the nearest anchor (left/right/top/bottom/center).  Two: relative to each other,
    "left"/"right" if they are further apart horizontally than vertically (as fractions of width
    and height), else "top"/"bottom".  Three or more: the nearest anchor of each.
    """
    pts = [(x / width, y / height) for x, y in centres]
    if len(pts) == 2:
        (x0, y0), (x1, y1) = pts
        if abs(x1 - x0) >= abs(y1 - y0):
            return ["left", "right"] if x0 <= x1 else ["right", "left"]
        return ["top", "bottom"] if y0 <= y1 else ["bottom", "top"]
    out = []
    for x, y in pts:
        out.append(min(ANCHORS, key=lambda a: (ANCHORS[a][0] - x) ** 2 + (ANCHORS[a][1] - y) ** 2))
    return out


def scene_positions(scene: Scene) -> list[str]:
    return position_words([(s.cx, s.cy) for s in scene.shapes], scene.width, scene.height)


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------


def _np(s: Shape, detailed: bool) -> str:
    return f"a {s.size} {s.colour} {s.kind}" if detailed else f"a {s.colour} {s.kind}"


def caption(scene: Scene, detailed: bool = False) -> str:
    """"a red circle", "a red circle left of a blue square"; detailed adds sizes and, for one
    shape, its position: "a small red circle on the left", "a large red circle above a small blue square"."""
    shapes = scene.shapes
    if not shapes:
        return "nothing"
    pos = scene_positions(scene)
    if len(shapes) == 1:
        text = _np(shapes[0], detailed)
        return f"{text} {POSITION_PHRASES[pos[0]]}" if detailed else text
    if len(shapes) == 2:
        return f"{_np(shapes[0], detailed)} {RELATIONS[pos[0]]} {_np(shapes[1], detailed)}"
    return " and ".join(_np(s, detailed) for s in shapes)


@dataclass(frozen=True)
class ShapeSpec:
    """What a caption says about one shape; None where it says nothing."""

    kind: str
    colour: str
    size: str | None = None
    position: str | None = None


_NP = rf"a (?:({'|'.join(SIZES)}) )?({'|'.join(COLOURS)}) ({'|'.join(KINDS)})"
_CAPTION_RE = re.compile(
    rf"^{_NP}(?: ({'|'.join(POSITION_PHRASES.values())}))?"
    rf"(?: ({'|'.join(RELATIONS.values())}) {_NP})?$"
)


def parse_caption(text: str) -> list[ShapeSpec]:
    """Inverse of ``caption`` (either style) for one or two shapes."""
    m = _CAPTION_RE.match(text.strip().lower().rstrip("."))
    if m is None:
        raise ValueError(f"not a shapes-world caption: {text!r}")
    size0, colour0, kind0, phrase, relation, size1, colour1, kind1 = m.groups()
    if relation is None:
        pos = None
        if phrase is not None:
            pos = {v: k for k, v in POSITION_PHRASES.items()}[phrase]
        return [ShapeSpec(kind0, colour0, size0, pos)]
    if phrase is not None:
        raise ValueError(f"a two-shape caption has no position phrase: {text!r}")
    p0 = {v: k for k, v in RELATIONS.items()}[relation]
    return [ShapeSpec(kind0, colour0, size0, p0), ShapeSpec(kind1, colour1, size1, OPPOSITE[p0])]


def scene_spec(scene: Scene) -> list[ShapeSpec]:
    return [
        ShapeSpec(s.kind, s.colour, s.size, p) for s, p in zip(scene.shapes, scene_positions(scene))
    ]


# ----------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------


def _stable_rng(scene: Scene) -> np.random.Generator:
    key = f"{caption(scene, True)}|{scene.width}x{scene.height}|{scene.shapes}"
    return np.random.default_rng(zlib.crc32(key.encode()))


def allowed(colour: str, kind: str, position: str, split: str) -> bool:
    """May a ``split`` scene hold this shape at this position word?"""
    return split == "heldout" or (colour, kind, position) not in HELDOUT_TRIPLES


def held_out(scene: Scene) -> bool:
    """Does the scene hold a held-out (colour, kind, position) combination?"""
    return bool(iter_triples([scene]) & HELDOUT_TRIPLES)


def questions(
    scene: Scene, rng: np.random.Generator | None = None, split: str = "train"
) -> list[QA]:
    """Questions with single-word answers: count, then per shape colour/shape/position/size, then
    presence (one "yes", one "no").  The "no" pair is a near miss (shares the colour or the kind of
    a shape in the scene when it can).  Without ``rng`` the choice of presence pairs is derived from the scene itself."""
    rng = _stable_rng(scene) if rng is None else rng
    shapes = scene.shapes
    qas = [QA(QUESTION_TEMPLATES["count"], NUMBERS[len(shapes)], "count")]
    kinds = [s.kind for s in shapes]
    colours = [s.colour for s in shapes]
    for s, pos in zip(shapes, scene_positions(scene)):
        kind_unique = kinds.count(s.kind) == 1
        if kind_unique:
            qas.append(QA(QUESTION_TEMPLATES["colour"].format(kind=s.kind), s.colour, "colour"))
        if colours.count(s.colour) == 1:
            qas.append(QA(QUESTION_TEMPLATES["shape"].format(colour=s.colour), s.kind, "shape"))
        if kind_unique:
            qas.append(QA(QUESTION_TEMPLATES["position"].format(kind=s.kind), pos, "position"))
            qas.append(QA(QUESTION_TEMPLATES["size"].format(kind=s.kind), s.size, "size"))
    if shapes:
        s = shapes[int(rng.integers(len(shapes)))]
        qas.append(QA(QUESTION_TEMPLATES["presence"].format(colour=s.colour, kind=s.kind), "yes", "presence"))
    present = {(s.colour, s.kind) for s in shapes}
    absent = [
        (c, k) for c in COLOURS for k in KINDS if (c, k) not in present
    ]
    near = [(c, k) for c, k in absent if c in colours or k in kinds]
    pool = near if near and rng.random() < 0.75 else absent
    c, k = pool[int(rng.integers(len(pool)))]
    qas.append(QA(QUESTION_TEMPLATES["presence"].format(colour=c, kind=k), "no", "presence"))
    return qas


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def _jitter(rng: np.random.Generator, width: int, height: int) -> tuple[int, int]:
    j = int(JITTER_FRAC * min(width, height))
    return int(rng.integers(-j, j + 1)), int(rng.integers(-j, j + 1))


def anchor_centre(
    position: str, width: int, height: int, rng: np.random.Generator | None = None
) -> tuple[int, int]:
    fx, fy = ANCHORS[position]
    dx, dy = _jitter(rng, width, height) if rng is not None else (0, 0)
    return int(round(fx * width)) + dx, int(round(fy * height)) + dy


def _sample_pairs(rng: np.random.Generator, n_shapes: int) -> list[tuple[str, str]]:
    """(colour, kind) of each shape: distinct colours, distinct kinds."""
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n_shapes:
        c = COLOURS[int(rng.integers(len(COLOURS)))]
        k = KINDS[int(rng.integers(len(KINDS)))]
        if not any(c == pc or k == pk for pc, pk in pairs):
            pairs.append((c, k))
    return pairs


def sample_scene(
    rng: np.random.Generator,
    split: str = "train",
    width: int = 64,
    height: int = 64,
    background: str = "black",
    n_shapes: int | None = None,
) -> Scene:
    """A random scene of one or two shapes (each with probability 1/2 unless ``n_shapes``), drawn
    again until it obeys the split (heldout: at least one held-out combination; else none)."""
    check_size(width, height)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    n = int(rng.integers(1, 3)) if n_shapes is None else n_shapes
    if n not in (1, 2):
        raise ValueError("a scene holds one or two shapes")
    while True:
        pairs = _sample_pairs(rng, n)
        sizes = [SIZES[int(rng.integers(len(SIZES)))] for _ in range(n)]
        if n == 1:
            positions = [POSITIONS[int(rng.integers(len(POSITIONS)))]]
        else:
            positions = ["left", "right"] if rng.random() < 0.5 else ["top", "bottom"]
            if rng.random() < 0.5:
                positions = positions[::-1]  # which shape is named first
        shapes = []
        for (c, k), size, pos in zip(pairs, sizes, positions):
            cx, cy = anchor_centre(pos, width, height, rng)
            shapes.append(Shape(k, c, size, cx, cy))
        scene = Scene(tuple(shapes), width, height, background)
        validate(scene)
        if held_out(scene) == (split == "heldout"):
            return scene


# ----------------------------------------------------------------------------------------------
# Edits
# ----------------------------------------------------------------------------------------------


def _replace_shape(scene: Scene, i: int, new: Shape | None) -> Scene:
    shapes = list(scene.shapes)
    if new is None:
        del shapes[i]
    else:
        shapes[i] = new
    return replace(scene, shapes=tuple(shapes))


def edits(scene: Scene, rng: np.random.Generator, split: str = "train") -> list[EditPair]:
    """One edit of each applicable kind, in the order recolour, resize, remove (two shapes),
    move (one shape), add (one shape off-centre).  Shapes the instruction does not name keep their
    exact geometry, so they stay pixel-identical in the rendered target.  Outside the heldout split
    no target holds a held-out (colour, kind, position) combination."""
    out: list[EditPair] = []
    shapes = scene.shapes
    if not shapes:
        return out
    W, H = scene.width, scene.height
    kinds = [s.kind for s in shapes]
    colours = [s.colour for s in shapes]
    where = scene_positions(scene)

    # recolour
    i = int(rng.integers(len(shapes)))
    s = shapes[i]
    choices = [c for c in COLOURS if c not in colours and allowed(c, s.kind, where[i], split)]
    if choices and kinds.count(s.kind) == 1:
        c = choices[int(rng.integers(len(choices)))]
        target = _replace_shape(scene, i, replace(s, colour=c))
        out.append(EditPair(EDIT_TEMPLATES["recolour"].format(kind=s.kind, colour=c), target, "recolour"))

    # resize
    i = int(rng.integers(len(shapes)))
    s = shapes[i]
    new_size = SIZES[1 - SIZES.index(s.size)] if len(SIZES) == 2 else s.size
    target = _replace_shape(scene, i, replace(s, size=new_size))
    if kinds.count(s.kind) == 1 and new_size != s.size:
        validate(target)
        out.append(EditPair(EDIT_TEMPLATES["resize"].format(kind=s.kind, size=new_size), target, "resize"))

    if len(shapes) == 2:
        i = int(rng.integers(2))
        s = shapes[i]
        target = _replace_shape(scene, i, None)
        out.append(EditPair(EDIT_TEMPLATES["remove"].format(kind=s.kind), target, "remove"))

    if len(shapes) == 1:
        s = shapes[0]
        pos = scene_positions(scene)[0]
        others = [p for p in POSITIONS if p != pos and allowed(s.colour, s.kind, p, split)]
        new_pos = others[int(rng.integers(len(others)))]
        cx, cy = anchor_centre(new_pos, W, H, rng)
        target = _replace_shape(scene, 0, replace(s, cx=cx, cy=cy))
        validate(target)
        out.append(EditPair(EDIT_TEMPLATES["move"].format(kind=s.kind, position=new_pos), target, "move"))

        if pos != "center":
            new_pos = OPPOSITE[pos]
            pair = _sample_pairs_excluding(rng, split, s, new_pos)
            if pair is not None:
                c, k = pair
                size = SIZES[int(rng.integers(len(SIZES)))]
                cx, cy = anchor_centre(new_pos, W, H, rng)
                new = Shape(k, c, size, cx, cy)
                target = replace(scene, shapes=(s, new))
                validate(target)
                relation = RELATIONS[new_pos]
                text = EDIT_TEMPLATES["add"].format(colour=c, kind=k, relation=relation, ref_kind=s.kind)
                out.append(EditPair(text, target, "add"))
    return out


def _sample_pairs_excluding(
    rng: np.random.Generator, split: str, existing: Shape, position: str
) -> tuple[str, str] | None:
    cand = [
        (c, k)
        for c in COLOURS
        for k in KINDS
        if c != existing.colour and k != existing.kind and allowed(c, k, position, split)
    ]
    if not cand:
        return None
    return cand[int(rng.integers(len(cand)))]


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS.index(split), int(index)])


def make_example(
    split: str, index: int, seed: int, width: int = 64, height: int = 64, background: str = "black"
) -> Example:
    rng = example_rng(seed, split, index)
    scene_rng, qa_rng, edit_rng = rng.spawn(3)
    scene = sample_scene(scene_rng, split, width, height, background)
    return Example(
        split=split,
        index=index,
        scene=scene,
        image=render(scene),
        caption=caption(scene),
        caption_detailed=caption(scene, detailed=True),
        qas=tuple(questions(scene, qa_rng, split)),
        edits=tuple(edits(scene, edit_rng, split)),
    )


def dataset(
    split: str,
    n: int,
    seed: int = 0,
    width: int = 64,
    height: int = 64,
    background: str = "black",
) -> list[Example]:
    """``n`` examples of a split; example ``i`` depends only on (seed, split, i, size, background)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return [make_example(split, i, seed, width, height, background) for i in range(n)]


def iter_pairs(scenes: Iterable[Scene]) -> set[tuple[str, str]]:
    """All (colour, kind) pairs in some scenes."""
    return {(s.colour, s.kind) for sc in scenes for s in sc.shapes}


def iter_triples(scenes: Iterable[Scene]) -> set[tuple[str, str, str]]:
    """All (colour, kind, position word) combinations in some scenes."""
    return {(s.colour, s.kind, p) for sc in scenes for s, p in zip(sc.shapes, scene_positions(sc))}
