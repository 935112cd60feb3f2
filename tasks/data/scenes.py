"""Rendering for MultiFashion: Fashion-MNIST garments pasted onto crops of real photos (pure numpy + PIL).

Everything here is a function of its inputs and a `numpy.random.Generator`, so an item is reproducible from
its own seed whichever worker renders it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# Real photos bundled with scikit-image (no download): name of the `skimage.data` function.
BACKGROUNDS = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
    "rocket",
)
BACKGROUND_ZOOMS = (1.0, 1.5, 2.25, 3.5)  # short side of each stored copy, in output sizes
GARMENT_THRESHOLD = 10  # Fashion-MNIST intensity above which a pixel belongs to the garment


def load_backgrounds() -> list[np.ndarray]:
    """The bundled photos as RGB uint8 (H, W, 3); an ImportError says what to install."""
    try:
        from skimage import data
    except ImportError as e:
        raise ImportError(
            "MultiFashion needs scikit-image for its background photos: pip install 'multitask-peft[data]' "
            "(or the demo extra)"
        ) from e
    photos = []
    for name in BACKGROUNDS:
        image = np.asarray(getattr(data, name)())
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)  # grey -> (H, W, 3)
        photos.append(np.ascontiguousarray(image[:, :, :3].astype(np.uint8)))
    return photos


def background_pyramid(photos: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Each photo resized so its short side is `zoom * size` for every zoom: random crops are then plain slices."""
    out = []
    for photo in photos:
        h, w = photo.shape[:2]
        for zoom in BACKGROUND_ZOOMS:
            scale = zoom * size / min(h, w)
            new = (max(size, round(w * scale)), max(size, round(h * scale)))  # PIL: (width, height)
            out.append(np.asarray(Image.fromarray(photo).resize(new, Image.BILINEAR)))
    return out


def random_background(pyramid: list[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """A random size x size crop of a random photo at a random zoom, maybe flipped: uint8 (size, size, 3)."""
    photo = pyramid[rng.integers(len(pyramid))]
    y = rng.integers(photo.shape[0] - size + 1)
    x = rng.integers(photo.shape[1] - size + 1)
    crop = photo[y : y + size, x : x + size]
    return np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop)


@dataclass
class Garment:
    """A garment resized to `side` pixels: colour uint8 (side, side, 3), mask bool (side, side), tight box."""

    rgb: np.ndarray
    mask: np.ndarray
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) of the mask inside the square


def render_garment(image: np.ndarray, side: int, rng: np.random.Generator) -> Garment | None:
    """Resize a 28x28 Fashion-MNIST image, mask it by intensity and tint it with a random colour."""
    grey = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))  # (side, side)
    if rng.random() < 0.5:
        grey = grey[:, ::-1]
    mask = grey > GARMENT_THRESHOLD
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    tint = rng.uniform(0.35, 1.0, size=3)
    rgb = (grey[:, :, None] * tint).astype(np.uint8)  # (side, side, 3)
    return Garment(rgb, mask, (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box's area."""
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


@dataclass
class Scene:
    """A rendered scene: image uint8 (S, S, 3), semantic mask uint8 (S, S) (0 = background, k + 1 = class k),
    and per visible garment its class, tight box [x, y, w, h] and visible mask bool (S, S)."""

    image: np.ndarray
    semantic: np.ndarray
    labels: list[int]
    boxes: list[list[int]]
    masks: list[np.ndarray]


def render_scene(
    background: np.ndarray,
    garments: list[tuple[np.ndarray, int]],
    scale: tuple[float, float],
    max_overlap: float,
    rng: np.random.Generator,
    tries: int = 20,
) -> Scene:
    """Paste `garments` ((28, 28) image, class) at random sizes and positions; later ones occlude earlier ones.

    A garment whose tight box overlaps an earlier one by more than `max_overlap` (of the smaller box) is moved,
    or left out after `tries` attempts. Boxes are tight around each garment's visible pixels.
    """
    size = background.shape[0]
    image = background.copy()
    instance = np.zeros((size, size), dtype=np.uint8)  # 0 = background, j + 1 = j-th placed garment
    placed: list[tuple[int, tuple[int, int, int, int]]] = []
    for picture, label in garments:
        side = int(rng.integers(max(8, round(scale[0] * size)), max(9, round(scale[1] * size)) + 1))
        garment = render_garment(picture, min(side, size), rng)
        if garment is None:
            continue
        side = garment.mask.shape[0]
        for _ in range(tries):
            x, y = int(rng.integers(size - side + 1)), int(rng.integers(size - side + 1))
            box = (x + garment.box[0], y + garment.box[1], x + garment.box[2], y + garment.box[3])
            if all(_overlap(box, other) <= max_overlap for _, other in placed):
                break
        else:
            continue
        region = (slice(y, y + side), slice(x, x + side))
        image[region][garment.mask] = garment.rgb[garment.mask]
        instance[region][garment.mask] = len(placed) + 1
        placed.append((label, box))
    scene = Scene(image, np.zeros((size, size), dtype=np.uint8), [], [], [])
    for j, (label, _) in enumerate(placed):
        visible = instance == j + 1
        rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
        if rows.size == 0:
            continue  # fully covered by later garments
        scene.semantic[visible] = label + 1
        scene.labels.append(label)
        scene.boxes.append([int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)])
        scene.masks.append(visible)
    return scene


def render_crop(
    background: np.ndarray, picture: np.ndarray, scale: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """One garment near the centre of a background crop (classification): uint8 (S, S, 3)."""
    size = background.shape[0]
    side = int(rng.integers(round(scale[0] * size), round(scale[1] * size) + 1))
    garment = render_garment(picture, side, rng)
    image = background.copy()
    if garment is not None:
        x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        image[y : y + side, x : x + side][garment.mask] = garment.rgb[garment.mask]
    return image


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a bool (H, W) mask: run lengths over column-major pixels, starting with zeros."""
    flat = mask.T.ravel()  # column-major, as COCO expects
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]]))
    if flat[0]:
        counts = np.concatenate([[0], counts])
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts.tolist()}
