"""Synthetic few-shot segmentation benchmark ("demo") in PASCAL layout.

Twenty object classes, each a shape family combined with a texture pattern and a colour
palette, drawn on cluttered backgrounds. Every class has a texture of its own; classes c and
c + 10 share a shape. The background holds unlabelled objects too: class shapes with patterns
no class has, so that an object is a class only by its texture (and colour), as a photo's
background is full of things that are no class. Appearance varies strongly within a class
(scale, aspect, rotation, colour jitter, texture frequency and contrast, occlusion), so support
and query images can differ a lot.

The 20 textures stay distinct under rotation (objects are rotated at random), because the base
learner, trained on the base classes only, takes a novel object for any base class whose
texture it shares. The unlabelled objects teach it that an object on the background need not
be a class.

Every image is drawn from its own generator seeded by (seed, split, index): the files do not
depend on generation order and the same seed gives byte-identical files.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import os
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from dataset.lists import build_fss_lists, fss_list_files, write_fss_lists
from dataset.splits import NUM_FOLDS, base_classes, novel_classes
from model.contract import IGNORE
from util.errors import UsageError, user_errors

NUM_CLASSES = 20
NUM_TRAIN = 4000
NUM_VAL = 800
DEFAULT_SIZE = 200
# PFENet/BAM count a class only if it covers 2,048 px, about 1.1 % of a typical 500x375 VOC
# image. At ~200x200 that rule would need 5 % of the image and would drop a quarter of the
# clearly visible objects; 1,024 px (a 32x32 patch, ~2.5 % of the image) is still stricter
# than PASCAL in relative terms and drops only the smallest or most occluded objects.
DEMO_MIN_PIXELS = 1024
MANIFEST = "demo_manifest.json"
FORMAT_VERSION = 2  # in the manifest: a benchmark of another version is generated again
SPLIT_IDS = {"train": 0, "val": 1}
# Train images hold few objects so that many survive BAM's rule of dropping every train image
# with a novel class; val images hold more so that every novel class has many queries.
OBJECT_COUNT_PROBS = {"train": (0.6, 0.4), "val": (0.3, 0.4, 0.3)}
CLUTTER_MEAN = 2.0  # unlabelled background objects per image (Poisson mean)

_SHAPES = ("ellipse", "square", "triangle", "star", "cross",
           "ring", "crescent", "heart", "hexagon", "arrow")
_TEXTURES = ("stripes", "checkers", "dots", "waves", "gradient",
             "rings", "plain", "blotches", "grid", "spokes",
             "zigzag", "speckle", "triangles", "plaid", "halo",
             "dashes", "scales", "halves", "crosses", "spiral")
# Unlabelled objects of the background: class shapes with pattern families no class has.
_CLUTTER_TEXTURES = ("streaks", "tiles")


def class_shape_texture(class_id: int) -> tuple[str, str]:
    """Shape family and texture pattern of a class id in 1..20."""
    if not 1 <= class_id <= NUM_CLASSES:
        raise ValueError(f"class_id must be in 1..{NUM_CLASSES}, got {class_id}")
    c = class_id - 1
    return _SHAPES[c % 10], _TEXTURES[c]


def _circle(n: int = 48, r: float = 1.0, cx: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), r * np.sin(t)], 1)


def _star(points: int, inner: float) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 2 * points, endpoint=False) - np.pi / 2
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], 1) / 16.5


# Each shape is a list of (polygon in a [-1, 1] frame, fill value); 0 cuts a hole.
_SHAPE_POLYS = {
    "ellipse": [(_circle(), 1)],
    "square": [(np.array([[-.85, -.85], [.85, -.85], [.85, .85], [-.85, .85]]), 1)],
    "triangle": [(_circle(3) * 1.1, 1)],
    "star": [(_star(5, 0.45), 1)],
    "cross": [(np.array([[-.3, -1], [.3, -1], [.3, -.3], [1, -.3], [1, .3], [.3, .3], [.3, 1],
                         [-.3, 1], [-.3, .3], [-1, .3], [-1, -.3], [-.3, -.3]]), 1)],
    "ring": [(_circle(), 1), (_circle(r=0.55), 0)],
    "crescent": [(_circle(), 1), (_circle(r=0.8, cx=0.45), 0)],
    "heart": [(_heart(), 1)],
    "hexagon": [(_circle(6), 1)],
    "arrow": [(np.array([[-1, -.25], [.2, -.25], [.2, -.7], [1, 0], [.2, .7], [.2, .25],
                         [-1, .25]]), 1)],
}


def _fill(polys, h: int, w: int, to_image) -> np.ndarray:
    """Boolean mask of a shape's polygons mapped to image coordinates by to_image."""
    mask = np.zeros((h, w), np.uint8)
    for poly, value in polys:
        pts = np.round(to_image(poly) * 16).astype(np.int32)  # 4 fractional bits
        cv2.fillPoly(mask, [pts], value, cv2.LINE_8, shift=4)
    return mask.astype(bool)


# Shapes are rescaled to a common area, so thin shapes (star, crescent) are not smaller objects.
_SHAPE_AREA = {name: _fill(polys, 400, 400, lambda p: p * 100 + 200).sum() / 1e4
               for name, polys in _SHAPE_POLYS.items()}
_REFERENCE_AREA = 2.2


def _lattice(u: np.ndarray, v: np.ndarray, freq: float, ph: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lattice cell coordinates in [-0.5, 0.5): (u, v, u with every other row shifted by half
    a cell), the frame of the patterns laid out on a lattice."""
    cell_v = (freq * v) % 1 - 0.5
    cell_u = (freq * u + ph) % 1 - 0.5
    staggered_u = (freq * u + 0.5 * (np.floor(freq * v) % 2) + ph) % 1 - 0.5
    return cell_u, cell_v, staggered_u


# A texture: value in [0, 1] at object-frame coordinates (u, v), for a frequency, a random phase
# and the image's generator (the random families draw from it).
Texture = Callable[[np.ndarray, np.ndarray, float, float, np.random.Generator], np.ndarray]


def _stripes(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    return np.sin(2 * np.pi * freq * u + ph) > 0


def _checkers(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    return np.sin(np.pi * freq * u + ph) * np.sin(np.pi * freq * v) > 0


def _dots(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    cell_u, cell_v, _ = _lattice(u, v, freq, ph)
    return cell_u ** 2 + cell_v ** 2 < 0.09


def _waves(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    return np.sin(2 * np.pi * freq * v + 1.5 * np.sin(np.pi * freq * u + ph)) > 0


def _gradient(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip((u + 1) / 2, 0, 1)


def _rings(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.hypot(u, v) + ph) > 0


def _plain(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    return np.zeros_like(u)


def _blotches(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    grid = rng.random((int(2 * freq) + 2,) * 2).astype(np.float32)
    return cv2.resize(grid, u.shape[::-1], interpolation=cv2.INTER_CUBIC) > 0.5


def _grid(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    return (np.abs(np.sin(np.pi * freq * u + ph)) < 0.3) | (np.abs(np.sin(np.pi * freq * v)) < 0.3)


def _spokes(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    return np.sin(round(freq + 3) * np.arctan2(v, u) + ph) > 0


def _zigzag(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    cell_u, _, _ = _lattice(u, v, freq, ph)
    return np.sin(2 * np.pi * freq * v + 10 * np.abs(cell_u)) > 0


def _speckle(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    grid = (rng.random((int(6 * freq) + 2,) * 2) > 0.5).astype(np.float32)
    return cv2.resize(grid, u.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0.5


def _triangles(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    return (freq * u + ph) % 1 > (freq * v) % 1


def _plaid(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    return 0.5 * (np.sin(2 * np.pi * freq * u + ph) > 0) + 0.5 * (np.sin(4 * np.pi * freq * v) > 0)


def _halo(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.hypot(u, v), 0, 1)


def _dashes(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    _, cell_v, staggered_u = _lattice(u, v, freq, ph)
    return (np.abs(cell_v) < 0.12) & (np.abs(staggered_u) < 0.3)


def _scales(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    _, cell_v, staggered_u = _lattice(u, v, freq, ph)
    r2 = staggered_u ** 2 + (cell_v + 0.5) ** 2
    return (r2 < 0.3) & (r2 > 0.15)


def _halves(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    return (u * np.cos(ph) + v * np.sin(ph)) > 0


def _crosses(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    cell_u, cell_v, _ = _lattice(u, v, freq, ph)
    return ((np.abs(cell_u) < 0.08) & (np.abs(cell_v) < 0.3)) | ((np.abs(cell_v) < 0.08) & (np.abs(cell_u) < 0.3))


def _spiral(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.hypot(u, v) + 3 * np.arctan2(v, u) + ph) > 0


# The clutter objects' patterns are random families, so that the base learner cannot learn them
# by heart and must learn what the classes look like instead.
def _streaks(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise stretched along a random direction."""
    grid = rng.random((int(8 * freq) + 2, 3)).astype(np.float32)
    streaks = cv2.resize(grid, (96, 96), interpolation=cv2.INTER_CUBIC)
    a = rng.uniform(0, np.pi)
    along, across = u * np.cos(a) + v * np.sin(a), v * np.cos(a) - u * np.sin(a)
    rows = np.clip((across + 1.5) / 3 * 95, 0, 95).astype(int)
    cols = np.clip((along + 1.5) / 3 * 95, 0, 95).astype(int)
    return streaks[rows, cols] > rng.uniform(0.35, 0.65)


def _tiles(u: np.ndarray, v: np.ndarray, freq: float, ph: float, rng: np.random.Generator) -> np.ndarray:
    """A mosaic of tiles in random grey levels."""
    levels = rng.random((64, 64)).astype(np.float32)
    return levels[np.floor(freq * u + 32).astype(int) % 64, np.floor(freq * v + 32).astype(int) % 64]


_PATTERNS: dict[str, Texture] = {
    "stripes": _stripes, "checkers": _checkers, "dots": _dots, "waves": _waves, "gradient": _gradient,
    "rings": _rings, "plain": _plain, "blotches": _blotches, "grid": _grid, "spokes": _spokes,
    "zigzag": _zigzag, "speckle": _speckle, "triangles": _triangles, "plaid": _plaid, "halo": _halo,
    "dashes": _dashes, "scales": _scales, "halves": _halves, "crosses": _crosses, "spiral": _spiral,
    "streaks": _streaks, "tiles": _tiles,
}


def _pattern(name: str, u: np.ndarray, v: np.ndarray, freq: float,
             rng: np.random.Generator) -> np.ndarray:
    """Texture value in [0, 1] at object-frame coordinates (u, v), at a random phase."""
    if name not in _PATTERNS:
        raise ValueError(f"unknown texture {name!r}")
    return _PATTERNS[name](u, v, freq, rng.uniform(0, 2 * np.pi), rng)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return 255 * np.array(colorsys.hsv_to_rgb(h % 1, np.clip(s, 0, 1), np.clip(v, 0, 1)))


def _palette(class_id: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB colours: the class's own palette (golden-ratio hues) with jitter."""
    hue = (class_id * 0.618034) % 1 + rng.normal(0, 0.05)
    if rng.random() < 0.25:  # sometimes an arbitrary hue, so colour alone never decides
        hue = rng.random()
    offset = (0.0, 0.08, 0.5, -0.12)[class_id % 4]
    a = _hsv(hue, rng.uniform(0.45, 1.0), rng.uniform(0.7, 1.0))
    b = _hsv(hue + offset, rng.uniform(0.3, 0.9), rng.uniform(0.15, 0.5))
    return (b, a) if rng.random() < 0.25 else (a, b)


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Low-contrast clutter: a gradient, soft blobs and thin lines."""
    colour = _hsv(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.3, 0.85))
    tilt = rng.normal(0, 40, 3)  # colour change across the image
    horizontal = rng.random() < 0.5
    ramp = np.linspace(0, 1, w if horizontal else h, dtype=np.float32)
    ramp = ramp[None, :, None] if horizontal else ramp[:, None, None]
    img = np.empty((h, w, 3), np.float32)
    img[:] = colour + ramp * tilt
    base = colour + 0.5 * tilt  # mean colour
    for _ in range(rng.integers(6, 16)):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(5, w // 4)), int(rng.integers(5, h // 4)))
        colour = (base + rng.normal(0, 25, 3)).tolist()
        cv2.ellipse(img, centre, axes, rng.uniform(0, 180), 0, 360, colour, -1, cv2.LINE_AA)
    for _ in range(rng.integers(2, 8)):
        p, q = rng.integers(0, [w, h], 2), rng.integers(0, [w, h], 2)
        cv2.line(img, p.tolist(), q.tolist(), (base + rng.normal(0, 30, 3)).tolist(),
                 int(rng.integers(1, 4)), cv2.LINE_AA)
    return cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 2.0))


def _object_mask(shape: str, h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple]:
    """Filled mask of a randomly placed shape, and the map from image to object frame."""
    side = min(h, w)
    radius = side * rng.uniform(0.14, 0.3) * np.sqrt(_REFERENCE_AREA / _SHAPE_AREA[shape])
    aspect = np.exp(rng.uniform(-0.35, 0.35))
    scale = np.array([radius * aspect, radius / aspect])
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = rng.uniform(0.2, 0.8, 2) * [w, h]
    mask = _fill(_SHAPE_POLYS[shape], h, w, lambda p: (p * scale) @ rot.T + centre)
    return mask, (centre, rot, scale)


def _texture(pattern: str, colours: tuple[np.ndarray, np.ndarray], frame, box,
             rng: np.random.Generator) -> np.ndarray:
    """RGB texture of a pattern in two colours over the image box (y0, y1, x0, x1), in the
    object's frame."""
    centre, rot, scale = frame
    y0, y1, x0, x1 = box
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    u = ((xs - centre[0]) * rot[0, 0] + (ys - centre[1]) * rot[1, 0]) / scale[0]
    v = ((xs - centre[0]) * rot[0, 1] + (ys - centre[1]) * rot[1, 1]) / scale[1]
    t = _pattern(pattern, u, v, rng.uniform(1.5, 3.5), rng)
    a, b = colours
    b = a + rng.uniform(0.5, 1.0) * (b - a)  # texture contrast
    shade = 1 + rng.uniform(-0.15, 0.15) * u  # a little directional lighting
    rgb = a + np.asarray(t, np.float32)[..., None] * (b - a)
    return rgb * shade[..., None]


def _paint(img: np.ndarray, mask: np.ndarray, frame, pattern: str,
           colours: tuple[np.ndarray, np.ndarray], rng: np.random.Generator) -> None:
    """Draw a textured object into img where mask is set, with a soft edge."""
    x, y, bw, bh = cv2.boundingRect(mask.view(np.uint8))
    box = (y, y + bh, x, x + bw)
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (3, 3), 0)[y:y + bh, x:x + bw]
    region = img[y:y + bh, x:x + bw]
    region += alpha[..., None] * (_texture(pattern, colours, frame, box, rng) - region)


def _clutter_objects(img: np.ndarray, rng: np.random.Generator) -> None:
    """Unlabelled objects of the background: a class's shape with a pattern and colours no class
    has. Without them every object in a train image is a class, and the base learner learns to
    call any object a base class, novel ones too (real photos are full of unlabelled things)."""
    h, w = img.shape[:2]
    for _ in range(rng.poisson(CLUTTER_MEAN)):
        mask, frame = _object_mask(_SHAPES[rng.integers(len(_SHAPES))], h, w, rng)
        colours = (_hsv(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.5, 1.0)),
                   _hsv(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.15, 0.6)))
        _paint(img, mask, frame, _CLUTTER_TEXTURES[rng.integers(len(_CLUTTER_TEXTURES))],
               colours, rng)


def render_sample(split: str, idx: int, seed: int,
                  size: int = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One (BGR uint8 image, uint8 label) pair; the label marks the front-most object."""
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLIT_IDS[split], idx])
    h, w = rng.integers(round(0.8 * size), round(1.2 * size) + 1, 2).tolist()
    img = _background(h, w, rng)
    _clutter_objects(img, rng)
    owner = np.zeros((h, w), np.uint8)  # 0 = background, k = k-th placed object
    probs = OBJECT_COUNT_PROBS[split]
    count = rng.choice(len(probs), p=probs) + 1
    placed: list[int] = []
    for class_id in rng.choice(np.arange(1, NUM_CLASSES + 1), count, replace=False):
        areas = np.bincount(owner.ravel(), minlength=len(placed) + 1)
        for _ in range(10):  # retry placements that would hide over 40 % of an earlier object
            mask, frame = _object_mask(class_shape_texture(class_id)[0], h, w, rng)
            trial = np.where(mask, len(placed) + 1, owner)
            kept = np.bincount(trial.ravel(), minlength=len(placed) + 1)[:len(placed) + 1]
            if np.all(kept[1:] >= 0.6 * areas[1:]):
                break
        else:
            continue
        _paint(img, mask, frame, class_shape_texture(class_id)[1], _palette(class_id, rng), rng)
        owner, placed = trial, placed + [int(class_id)]
    for _ in range(rng.poisson(0.7)):  # clutter in front of everything occludes objects
        p, q = rng.integers(0, [w, h], 2), rng.integers(0, [w, h], 2)
        width = int(rng.integers(2, 6))
        cv2.line(img, p.tolist(), q.tolist(), rng.uniform(40, 220, 3).tolist(), width)
        cv2.line(owner, p.tolist(), q.tolist(), 0, width)
    img += rng.uniform(2, 7) * rng.standard_normal((h, w, 1), np.float32)  # luminance noise
    label = np.array([0] + placed, np.uint8)[owner]
    kernel = np.ones((3, 3), np.uint8)  # VOC-like void band, ~2 px wide, on every border
    label[cv2.dilate(label, kernel) != cv2.erode(label, kernel)] = IGNORE
    return cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR), label


def _write(path: Path, array: np.ndarray, params: list[int]) -> None:
    if not cv2.imwrite(str(path), array, params):
        raise OSError(f"could not write {path}")


def generate_demo(root: str | Path, seed: int = 0, num_train: int = NUM_TRAIN,
                  num_val: int = NUM_VAL, size: int = DEFAULT_SIZE) -> Path:
    """Write the benchmark under root (PASCAL layout, plain and BAM lists); returns root.

    The manifest is removed first and written last, so an interrupted run is detectable.
    """
    if num_train < 1 or num_val < 1:
        raise UsageError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    if size < 64:
        raise UsageError(f"size must be >= 64 pixels, got {size}")
    root = Path(root).resolve()  # list paths are written relative to it
    (root / MANIFEST).unlink(missing_ok=True)
    list_dir = root / "lists" / "demo"
    for folder in ("JPEGImages", "SegmentationClassAug", list_dir):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("val", num_val)):
        pairs, labels = [], {}
        for idx in range(count):
            img, label = render_sample(split, idx, seed, size)
            name = f"{split}_{idx:05d}"
            pair = (f"JPEGImages/{name}.jpg", f"SegmentationClassAug/{name}.png")
            _write(root / pair[0], img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            _write(root / pair[1], label, [])
            pairs.append(pair)
            labels[str(root / pair[1])] = label
        (list_dir / f"{split}.txt").write_text("".join(f"{a} {b}\n" for a, b in pairs))
        full = [(str(root / a), str(root / b)) for a, b in pairs]
        for fold in range(NUM_FOLDS):
            classes = (base_classes if split == "train" else novel_classes)("demo", fold)
            # Labels are still in memory: reading 8 x N PNGs back would double the run time.
            data, sub = build_fss_lists(full, classes, split, DEMO_MIN_PIXELS, labels.__getitem__)
            write_fss_lists(fss_list_files(root / "lists", "demo", split, fold), data, sub, str(root))
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(_manifest(seed, num_train, num_val, size), indent=1) + "\n")
    os.replace(tmp, root / MANIFEST)
    return root


def _manifest(seed: int, num_train: int, num_val: int, size: int) -> dict:
    return {"format_version": FORMAT_VERSION, "seed": seed, "num_train": num_train,
            "num_val": num_val, "size": size, "min_pixels": DEMO_MIN_PIXELS}


def ensure_demo(root: str | Path, seed: int = 0, num_train: int = NUM_TRAIN,
                num_val: int = NUM_VAL, size: int = DEFAULT_SIZE) -> None:
    """Generate the benchmark under root unless a complete one with these settings is there."""
    root = Path(root)
    try:
        found = json.loads((root / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        found = None
    if found == _manifest(seed, num_train, num_val, size) and all(
            (root / "lists" / "demo" / f"{s}.txt").is_file() for s in SPLIT_IDS):
        return
    generate_demo(root, seed, num_train, num_val, size)


def ensure_demo_present(root: str | Path) -> None:
    """What meta_test.py and train.py call: keep a complete benchmark of any settings under root
    (one generated on purpose with other counts, sizes or seed is the user's, not to be
    replaced), else generate the default one."""
    root = Path(root)
    try:
        found = json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        found = None
    if isinstance(found, dict) and found.get("format_version") == FORMAT_VERSION and all(
            (root / "lists" / "demo" / f"{s}.txt").is_file() for s in SPLIT_IDS):
        return
    ensure_demo(root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic demo FSS benchmark.")
    parser.add_argument("--root", default="data/demo", help="output folder (PASCAL layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=NUM_TRAIN)
    parser.add_argument("--num-val", type=int, default=NUM_VAL)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="mean image side")
    parser.add_argument("--force", action="store_true", help="regenerate even if complete")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    args = parser.parse_args(argv)
    make = generate_demo if args.force else ensure_demo
    with user_errors("dataset/demo.py", args.debug):
        make(args.root, args.seed, args.num_train, args.num_val, args.size)


if __name__ == "__main__":
    main()
