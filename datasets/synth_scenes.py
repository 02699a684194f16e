"""Scene drawing for the synthetic data sets: the shared category universe, textures, shapes,
still images and moving-shape videos, as in-memory arrays.

`omgseg.datasets.synth` turns these scenes into the public on-disk formats; this module knows
nothing about files. Every random choice comes from the `numpy.random.Generator` passed in, so
a scene is a pure function of the generator's state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_utils

# Appearance of each thing shape: its base colour. Each shape has its own hue, far from every
# stuff texture's colour, so colour alone already separates the categories for a small CNN.
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "circle": (220, 40, 40),  # red
    "square": (45, 45, 235),  # blue
    "triangle": (240, 220, 30),  # yellow
    "star": (220, 40, 200),  # magenta
    "ring": (30, 225, 225),  # cyan
    "cross": (250, 140, 20),  # orange
    "hexagon": (125, 35, 190),  # purple
    "diamond": (250, 175, 205),  # pink
    # Added for the large planted set's second family (omgseg.datasets.planted).
    "pentagon": (150, 230, 50),  # lime
    "arrow": (25, 25, 25),  # black
    "heart": (250, 120, 110),  # salmon
}
# The first eight looks, the only ones COCO to DAVIS and the first planted set draw: they take
# them from this tuple, so a look added above changes none of their pictures.
EIGHT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross", "hexagon", "diamond")

# Stuff textures and their typical colour (also written as the category's `color`).
TEXTURE_COLOURS: dict[str, tuple[int, int, int]] = {
    "sky": (160, 205, 240),
    "grass": (70, 140, 50),
    "water": (40, 95, 170),
    "sand": (214, 190, 140),
    "road": (105, 105, 110),
    "wall": (165, 75, 55),
    "floor": (130, 98, 68),
}

SUPERCATEGORIES: dict[str, str] = {
    "sky": "sky",
    "grass": "plant",
    "water": "water",
    "sand": "ground",
    "road": "ground",
    "wall": "wall",
    "floor": "floor",
}

INSTANCE_COLOUR_JITTER = 25  # per-instance shift of the base colour, per channel
PIXEL_NOISE = 10.0  # per-pixel Gaussian noise on things (std, in 0..255 units)
RING_INNER = 0.55  # inner radius of a ring as a fraction of its outer radius


@dataclass(frozen=True)
class Label:
    """One category of one data set: its own id and name, and how it is drawn.

    `look` is a key of SHAPE_COLOURS (drawn as shapes) or of TEXTURE_COLOURS (a background
    region). A stuff label may be drawn as shapes (ADE's "ring"): all its shapes in an image
    then form one segment.
    """

    id: int
    name: str
    isthing: bool
    look: str

    @property
    def is_shape(self) -> bool:
        return self.look in SHAPE_COLOURS

    @property
    def colour(self) -> tuple[int, int, int]:
        return SHAPE_COLOURS[self.look] if self.is_shape else TEXTURE_COLOURS[self.look]

    @property
    def supercategory(self) -> str:
        return "shape" if self.is_shape else SUPERCATEGORIES[self.look]


def thing_label(id: int, name: str, look: str | None = None) -> Label:
    """A thing category, drawn with the look of its name unless `look` says otherwise."""
    return Label(id, name, True, look or name)


def stuff_label(id: int, name: str, look: str | None = None) -> Label:
    """A stuff category, drawn with the look of its name unless `look` says otherwise."""
    return Label(id, name, False, look or name)


# Each data set's vocabulary in its own ids (see the module docstring of omgseg.datasets.synth
# for the designed relations between them).
COCO_LABELS: tuple[Label, ...] = (
    # Gaps in the thing ids and stuff ids from 92 on, as in real COCO.
    thing_label(1, "circle"),
    thing_label(2, "square"),
    thing_label(3, "triangle"),
    thing_label(5, "star"),
    thing_label(7, "ring"),
    thing_label(9, "cross"),
    stuff_label(92, "sky"),
    stuff_label(93, "grass"),
    stuff_label(95, "water"),
    stuff_label(97, "sand"),
)
ADE_LABELS: tuple[Label, ...] = (
    stuff_label(1, "wall"),
    stuff_label(2, "floor"),
    stuff_label(3, "sky"),
    stuff_label(4, "grass"),
    stuff_label(5, "ring", "ring"),  # conflict: a thing everywhere else, stuff here
    thing_label(6, "circle"),
    thing_label(7, "square"),
    thing_label(8, "triangle"),
    thing_label(9, "hexagon"),  # ADE only: open-vocabulary target
    thing_label(10, "diamond"),  # ADE only: open-vocabulary target
)
VIPSEG_LABELS: tuple[Label, ...] = (
    # ids 0..N-1; id 1 is stuff so that the buggy value 200 = (1 + 1) * 100 is never a thing.
    stuff_label(0, "sky"),
    stuff_label(1, "water"),
    stuff_label(2, "road"),
    stuff_label(3, "grass"),
    thing_label(4, "circle"),
    thing_label(5, "square", "triangle"),  # conflict: the triangle shape is called "square" here
    thing_label(6, "star"),
    thing_label(7, "cross"),
)
YTVIS_LABELS: tuple[Label, ...] = (
    # YouTube-VIS numbers its categories alphabetically, so its ids differ from COCO's.
    thing_label(1, "circle"),
    thing_label(2, "cross"),
    thing_label(3, "ring"),
    thing_label(4, "square"),
    thing_label(5, "star"),
    thing_label(6, "triangle"),
)
YTVIS_BACKGROUNDS: tuple[str, ...] = ("sky", "grass", "water", "sand")  # drawn, not annotated

DAVIS_SHAPES: tuple[str, ...] = EIGHT_SHAPES  # class-agnostic: every shape of the first eight
DAVIS_BACKGROUNDS: tuple[str, ...] = tuple(TEXTURE_COLOURS)


# ---------------------------------------------------------------------------------------------
# Textures


def texture(name: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A full-frame (H, W, 3) float32 texture of one stuff kind, values about 0..255."""
    base = np.array(TEXTURE_COLOURS[name], dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = rng.normal(0.0, 1.0, (height, width, 1)).astype(np.float32)
    if name == "sky":
        # Lighter towards the horizon, almost no grain.
        fade = (yy / max(height - 1, 1))[..., None]
        out = base + fade * np.array([45, 25, 12], np.float32) + 3 * noise
    elif name == "grass":
        # Coarse grain plus vertical blades (a random offset per column).
        blades = rng.normal(0.0, 12.0, (1, width, 1)).astype(np.float32)
        out = base + 18 * noise + blades
    elif name == "water":
        phase = rng.uniform(0, 2 * math.pi)
        waves = np.sin(2 * math.pi * yy / 6 + 0.8 * np.sin(2 * math.pi * xx / 23 + phase))
        out = base + waves[..., None] * np.array([10, 18, 25], np.float32) + 5 * noise
    elif name == "sand":
        grains = (rng.random((height, width, 1)) < 0.04).astype(np.float32)
        out = base + 9 * noise - 60 * grains
    elif name == "road":
        out = base + 12 * noise
    elif name == "wall":
        # Bricks 16x8 with every other row shifted by half a brick, light mortar between.
        row = (yy // 8).astype(int)
        shifted = xx + 8 * (row % 2)
        mortar = ((yy % 8) < 1) | ((shifted % 16) < 1)
        brick_id = row * 1000 + (shifted // 16).astype(int)
        jitter = rng.normal(0.0, 12.0, int(brick_id.max()) + 1).astype(np.float32)[brick_id]
        out = base + jitter[..., None] + 6 * noise
        out[mortar] = np.array([205, 200, 190], np.float32)
    elif name == "floor":
        tile = ((yy // 12).astype(int) + (xx // 12).astype(int)) % 2
        out = base + np.where(tile[..., None] == 1, 20.0, -20.0) + 5 * noise
    else:
        raise ValueError(f"unknown texture {name!r}; known: {', '.join(TEXTURE_COLOURS)}")
    return out.astype(np.float32)


def unlabelled_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Grey static for the 'unlabelled' patches (void in the annotations)."""
    return (128 + 30 * rng.normal(0.0, 1.0, (height, width, 1))).repeat(3, axis=2).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Shapes


def shape_outline(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray | None:
    """The (N, 2) xy polygon of a shape of outer radius r, or None for a ring (it has a hole)."""
    if shape == "ring":
        return None
    if shape == "circle":
        n, radii, start = 24, [1.0], 0.0
    elif shape == "square":
        n, radii, start = 4, [1.0], math.pi / 4
    elif shape == "triangle":
        n, radii, start = 3, [1.0], -math.pi / 2
    elif shape == "hexagon":
        n, radii, start = 6, [1.0], 0.0
    elif shape == "star":
        n, radii, start = 10, [1.0, 0.45], -math.pi / 2
    elif shape == "diamond":
        # A rhombus, tall and narrow so it never looks like a square turned by 45 degrees.
        pts = np.array([[0, -1.0], [0.55, 0], [0, 1.0], [-0.55, 0]])
        return _place(pts * r, cx, cy, angle)
    elif shape == "cross":
        a = 0.33  # half the arm width, as a fraction of the radius
        pts = np.array(
            [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a],
             [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]]
        )
        return _place(pts * r, cx, cy, angle)
    elif shape == "pentagon":
        n, radii, start = 5, [1.0], -math.pi / 2
    elif shape == "arrow":
        # Pointing right: a shaft of half-width 0.28 and a head from x = 0.15 to the tip.
        pts = np.array([[-0.95, -0.28], [0.15, -0.28], [0.15, -0.75], [1, 0],
                        [0.15, 0.75], [0.15, 0.28], [-0.95, 0.28]])
        return _place(pts * r, cx, cy, angle)
    elif shape == "heart":
        # The classic parametric heart (x = 16 sin^3 t, y from four cosines), point down, scaled
        # and centred into the unit disc.
        t = 2 * math.pi * np.arange(28) / 28
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y - (y.max() + y.min()) / 2], axis=1) / 18.25
        return _place(pts * r, cx, cy, angle)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPE_COLOURS)}")
    t = start + 2 * math.pi * np.arange(n) / n
    rad = np.array([radii[i % len(radii)] for i in range(n)]) * r
    pts = np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1)
    return _place(pts, cx, cy, angle)


def _place(pts: np.ndarray, cx: float, cy: float, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    rot = pts @ np.array([[c, s], [-s, c]])
    return rot + np.array([cx, cy])


def polygon_mask(flat: list[float], height: int, width: int) -> np.ndarray:
    """Rasterise one COCO polygon [x0, y0, x1, y1, ...] with pycocotools, as (H, W) bool.

    Using pycocotools here (and not PIL) is what makes the stored polygon decode to exactly the
    pixels painted into the panoptic PNG.
    """
    rles = mask_utils.frPyObjects([flat], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def ring_mask(cx: float, cy: float, r: float, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    d2 = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2
    return (d2 <= r * r) & (d2 >= (RING_INNER * r) ** 2)


def shape_mask(
    shape: str, cx: float, cy: float, r: float, angle: float, height: int, width: int
) -> tuple[np.ndarray, list[float] | None]:
    """(mask (H, W) bool, COCO polygon or None) of one shape; the polygon rasterises to the mask."""
    outline = shape_outline(shape, cx, cy, r, angle)
    if outline is None:
        return ring_mask(cx, cy, r, height, width), None
    # Rounded once, and the rounded numbers are what is rasterised and stored.
    flat = [round(float(v), 2) for v in outline.reshape(-1)]
    return polygon_mask(flat, height, width), flat


def instance_colour(rng: np.random.Generator, look: str) -> np.ndarray:
    base = np.array(SHAPE_COLOURS[look], dtype=np.float32)
    return base + rng.uniform(-INSTANCE_COLOUR_JITTER, INSTANCE_COLOUR_JITTER, 3).astype(np.float32)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """One-pixel 4-neighbour dilation, to keep a gap between things."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


# ---------------------------------------------------------------------------------------------
# Backgrounds


@dataclass
class Background:
    """Stuff regions of a frame. region: (H, W) int, index into `kinds`, -1 where void."""

    kinds: list[str]
    region: np.ndarray
    rgb: np.ndarray  # (H, W, 3) float32


def background(
    rng: np.random.Generator, kinds: list[str], height: int, width: int, void_patch: bool
) -> Background:
    """2-3 horizontal bands with wavy borders, a 1-pixel void line on each border, and
    optionally an 'unlabelled' grey patch (void)."""
    k = int(rng.integers(2, min(3, len(kinds)) + 1))
    chosen = [str(c) for c in rng.choice(kinds, size=k, replace=False)]
    if "sky" in chosen:  # the sky goes on top
        chosen.remove("sky")
        chosen.insert(0, "sky")
    xx = np.arange(width, dtype=np.float32)
    yy = np.arange(height, dtype=np.float32)[:, None]
    region = np.zeros((height, width), dtype=np.int64)
    for b in range(1, k):
        level = height * b / k + rng.uniform(-0.08, 0.08) * height
        amplitude = rng.uniform(1.5, 5.0)
        period = rng.uniform(30.0, 80.0)
        phase = rng.uniform(0, 2 * math.pi)
        border = level + amplitude * np.sin(2 * math.pi * xx / period + phase)
        region += (yy >= border[None, :]).astype(np.int64)
    rgb = np.zeros((height, width, 3), dtype=np.float32)
    for i, kind in enumerate(chosen):
        sel = region == i
        rgb[sel] = texture(kind, rng, height, width)[sel]
    void = np.zeros((height, width), dtype=bool)
    void[:-1] |= region[:-1] != region[1:]  # the thin border line between two regions
    if void_patch:
        ph = int(rng.integers(height // 8, height // 4 + 1))
        pw = int(rng.integers(width // 8, width // 4 + 1))
        y0 = int(rng.integers(0, height - ph + 1))
        x0 = int(rng.integers(0, width - pw + 1))
        void[y0 : y0 + ph, x0 : x0 + pw] = True
        rgb[y0 : y0 + ph, x0 : x0 + pw] = unlabelled_texture(rng, ph, pw)
    region = np.where(void, -1, region)
    return Background(kinds=chosen, region=region, rgb=rgb)


def _paint(rgb: np.ndarray, mask: np.ndarray, colour: np.ndarray, rng: np.random.Generator) -> None:
    n = int(mask.sum())
    if n:
        rgb[mask] = colour + rng.normal(0.0, PIXEL_NOISE, (n, 3)).astype(np.float32)


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Still images


@dataclass
class SceneSegment:
    """One segment of an image; masks of one image are disjoint.

    polygon: COCO polygon that rasterises (pycocotools) to exactly `mask`, when the segment is
    one polygon-shaped thing; None for stuff, rings and crowds.
    as_rle: store this thing as compressed RLE in COCO instances rather than as its polygon.
    """

    label: Label
    mask: np.ndarray
    iscrowd: bool
    polygon: list[float] | None
    as_rle: bool


@dataclass
class ImageScene:
    rgb: np.ndarray  # (H, W, 3) uint8
    segments: list[SceneSegment]


def _place_shape(
    rng: np.random.Generator,
    shape: str,
    r_range: tuple[float, float],
    occupied: np.ndarray,
    tries: int = 25,
) -> tuple[np.ndarray, list[float] | None] | None:
    """A shape fully inside the frame and clear of `occupied` (by one pixel), or None."""
    height, width = occupied.shape
    blocked = _dilate(occupied)
    for _ in range(tries):
        r = rng.uniform(*r_range)
        cx = rng.uniform(r + 1, width - r - 1)
        cy = rng.uniform(r + 1, height - r - 1)
        angle = rng.uniform(-0.3, 0.3)
        mask, polygon = shape_mask(shape, cx, cy, r, angle, height, width)
        if mask.sum() >= 12 and not (mask & blocked).any():
            return mask, polygon
    return None


def _place_crowd(
    rng: np.random.Generator, shape: str, scale: float, occupied: np.ndarray, tries: int = 25
) -> np.ndarray | None:
    """A tight cluster of 5-9 small shapes of one kind (their union is one crowd region)."""
    height, width = occupied.shape
    blocked = _dilate(occupied)
    bw, bh = 30 * scale, 22 * scale
    for _ in range(tries):
        x0 = rng.uniform(1, width - bw - 1)
        y0 = rng.uniform(1, height - bh - 1)
        union = np.zeros_like(occupied)
        for _ in range(int(rng.integers(5, 10))):
            r = rng.uniform(3.0, 5.0) * scale
            cx = rng.uniform(x0 + r, x0 + bw - r)
            cy = rng.uniform(y0 + r, y0 + bh - r)
            union |= shape_mask(shape, cx, cy, r, rng.uniform(-0.3, 0.3), height, width)[0]
        if not (union & blocked).any():
            return union
    return None


def _crowd_segments(
    rng: np.random.Generator, shape_labels: list[Label], scale: float, rgb: np.ndarray, occupied: np.ndarray
) -> list[SceneSegment]:
    """[the crowd segment] of one thing label other than the ring, painted into `rgb` and
    marked in `occupied`; [] when no crowd fits."""
    candidates = [lab for lab in shape_labels if lab.isthing and lab.look != "ring"]
    label = candidates[int(rng.integers(len(candidates)))]
    union = _place_crowd(rng, label.look, scale, occupied)
    if union is None:
        return []
    _paint(rgb, union, instance_colour(rng, label.look), rng)
    occupied |= union
    return [SceneSegment(label, union, True, None, as_rle=True)]


def _draw_probabilities(shape_labels: list[Label], weights: Mapping[str, float] | None) -> np.ndarray | None:
    """The shape labels' draw probabilities from relative weights by name (a name left out
    weighs 1), or None to draw them alike. A name that is no shape label here is an error: a
    misspelt class would leave the intended skew silently out."""
    if weights is None:
        return None
    unknown = sorted(set(weights) - {lab.name for lab in shape_labels})
    if unknown:
        raise ValueError(f"draw weights name {unknown}, which are not shape labels here: "
                         f"{', '.join(lab.name for lab in shape_labels)}")
    draw = np.array([weights.get(lab.name, 1.0) for lab in shape_labels], dtype=np.float64)
    return draw / draw.sum()


def _draw_label(rng: np.random.Generator, shape_labels: list[Label], p: np.ndarray | None) -> Label:
    # Two draws, not rng.choice with equal p for both: that consumes the generator differently,
    # and every unweighted data set would change its pictures.
    if p is None:
        return shape_labels[int(rng.integers(len(shape_labels)))]
    return shape_labels[int(rng.choice(len(shape_labels), p=p))]


def image_scene(
    rng: np.random.Generator,
    labels: tuple[Label, ...],
    height: int,
    width: int,
    crowd: bool,
    rle_fraction: float,
    weights: Mapping[str, float] | None = None,
) -> ImageScene:
    """A still image: stuff bands, void lines (and maybe a void patch), 2-5 disjoint things.

    Labels drawn as shapes become things (one segment each), except stuff labels drawn as
    shapes, whose shapes merge into one stuff segment. With `crowd`, a cluster of small shapes
    of one thing label is added as one iscrowd segment. `weights` gives shape labels relative
    draw weights by name (a name left out weighs 1); without it they are drawn alike.
    """
    scale = min(height, width) / 96
    texture_labels = {lab.look: lab for lab in labels if not lab.is_shape}
    shape_labels = [lab for lab in labels if lab.is_shape]
    bg = background(rng, list(texture_labels), height, width, void_patch=bool(rng.random() < 0.3))
    occupied = np.zeros((height, width), dtype=bool)
    things = _crowd_segments(rng, shape_labels, scale, bg.rgb, occupied) if crowd else []
    merged: dict[int, SceneSegment] = {}  # stuff labels drawn as shapes, by label id
    p = _draw_probabilities(shape_labels, weights)
    for _ in range(int(rng.integers(2, 6))):
        label = _draw_label(rng, shape_labels, p)
        placed = _place_shape(rng, label.look, (8 * scale, 16 * scale), occupied)
        as_rle = bool(rng.random() < rle_fraction)
        if placed is None:
            continue
        mask, polygon = placed
        _paint(bg.rgb, mask, instance_colour(rng, label.look), rng)
        occupied |= mask
        if label.isthing:
            things.append(SceneSegment(label, mask, False, polygon, as_rle=as_rle or polygon is None))
        elif label.id in merged:
            merged[label.id].mask |= mask
        else:
            merged[label.id] = SceneSegment(label, mask.copy(), False, None, as_rle=True)
    stuff = [SceneSegment(texture_labels[kind], mask, False, None, as_rle=True)
             for i, kind in enumerate(bg.kinds) if (mask := (bg.region == i) & ~occupied).any()]
    return ImageScene(rgb=to_uint8(bg.rgb), segments=[*stuff, *merged.values(), *things])


# ---------------------------------------------------------------------------------------------
# Videos


@dataclass
class Track:
    """One moving object of a video; `number` is 1-based within the video, in drawing order."""

    number: int
    label: Label | None  # None for class-agnostic data (DAVIS)
    shape: str
    visible: np.ndarray  # (T,) bool: drawn in that frame (False = hidden behind the scene)


@dataclass(frozen=True)
class _Motion:
    """A smooth path: constant velocity plus a slow sinusoidal wobble, and a slow spin."""

    cx: float
    cy: float
    r: float
    vx: float
    vy: float
    wobble: float
    omega: float
    phase: float
    angle: float
    spin: float

    def centre(self, t: int) -> tuple[float, float]:
        wob = self.wobble * math.sin(self.omega * t + self.phase)
        speed = math.hypot(self.vx, self.vy) or 1.0
        # The wobble is across the direction of travel, so the path stays smooth.
        return (
            self.cx + self.vx * t - wob * self.vy / speed,
            self.cy + self.vy * t + wob * self.vx / speed,
        )


@dataclass
class VideoScene:
    """frames: (T, H, W, 3) uint8; track_maps: (T, H, W) int, 0 = no object, n = Track.number;
    background: static stuff regions (index into background.kinds, -1 = void)."""

    frames: np.ndarray
    track_maps: np.ndarray
    tracks: list[Track]
    background: Background


def _start_motion(
    rng: np.random.Generator, scale: float, height: int, width: int,
    centres: list[tuple[float, float, float]], enters_late: bool,
) -> _Motion:
    """One track's path. It starts clear of the tracks before it (`centres`, to which its own
    start is added), so no object is hidden in frame 0; one that `enters_late` starts just
    outside the left or right edge instead, heading inwards, faster."""
    r = rng.uniform(8, 14) * scale
    for _ in range(30):
        cx = rng.uniform(r + 2, width - r - 2)
        cy = rng.uniform(r + 2, height - r - 2)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 2) ** 2 for x, y, q in centres):
            break
    centres.append((cx, cy, r))
    heading = rng.uniform(0, 2 * math.pi)
    speed = rng.uniform(0.8, 2.5) * scale
    if enters_late:
        side = -1 if rng.random() < 0.5 else 1
        cx = -1.2 * r if side < 0 else width + 1.2 * r
        heading = rng.uniform(-0.4, 0.4) + (0.0 if side < 0 else math.pi)
        speed = rng.uniform(3.0, 4.5) * scale
    return _Motion(
        cx=cx, cy=cy, r=r, vx=speed * math.cos(heading), vy=speed * math.sin(heading),
        wobble=rng.uniform(0.5, 2.0) * scale, omega=rng.uniform(0.3, 0.8),
        phase=rng.uniform(0, 2 * math.pi), angle=rng.uniform(-0.3, 0.3), spin=rng.uniform(-0.06, 0.06),
    )


def video_scene(
    rng: np.random.Generator,
    shapes: list[tuple[Label | None, str]],
    backgrounds: list[str],
    height: int,
    width: int,
    num_frames: int,
    allow_late_entry: bool,
    night: bool,
) -> VideoScene:
    """Moving shapes over static stuff bands.

    2-4 tracks, each of a (label, shape) from `shapes`, start apart (every track is visible in
    frame 0 unless it enters late) and move smoothly (constant velocity plus a slow wobble,
    slow rotation); later tracks pass in front of earlier ones. One track is hidden for 2-3
    frames mid-video and comes back; with `allow_late_entry`, one track may start outside the
    frame and enter. `night` darkens and blue-tints every frame (a domain shift).
    """
    scale = min(height, width) / 96
    bg = background(rng, backgrounds, height, width, void_patch=False)
    n_tracks = int(rng.integers(2, 5))
    late = int(rng.integers(n_tracks)) if allow_late_entry and rng.random() < 0.5 else -1
    centres: list[tuple[float, float, float]] = []
    motions = [_start_motion(rng, scale, height, width, centres, i == late) for i in range(n_tracks)]
    tracks, colours = [], []
    for i in range(n_tracks):
        label, shape = shapes[int(rng.integers(len(shapes)))]
        colours.append(instance_colour(rng, shape))
        tracks.append(Track(i + 1, label, shape, np.ones(num_frames, dtype=bool)))
    hidden = tracks[int(rng.integers(n_tracks))]
    gap_start = int(rng.integers(1, num_frames - 3))
    hidden.visible[gap_start : gap_start + int(rng.integers(2, 4))] = False

    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    track_maps = np.zeros((num_frames, height, width), dtype=np.int64)
    for t in range(num_frames):
        rgb = bg.rgb + rng.normal(0.0, 3.0, (height, width, 1)).astype(np.float32)  # sensor noise
        for track, m, colour in zip(tracks, motions, colours):
            if track.visible[t]:
                mask, _ = shape_mask(track.shape, *m.centre(t), m.r, m.angle + m.spin * t, height, width)
                _paint(rgb, mask, colour, rng)
                track_maps[t][mask] = track.number
        if night:
            rgb = rgb * 0.5 + np.array([0, 5, 30], np.float32)
        frames[t] = to_uint8(rgb)
    return VideoScene(frames=frames, track_maps=track_maps, tracks=tracks, background=bg)
