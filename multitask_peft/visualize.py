"""Results drawn on their images: boxes, translucent masks with a legend, classification captions.

Built on torchvision's drawing utilities (`draw_bounding_boxes`, `draw_segmentation_masks`); text strips (a mask's
legend, a classification caption) are drawn with PIL under the image, so that they never hide what was predicted.
Every function takes and returns a uint8 (3, H, W) tensor and result dicts in that image's pixels (what
`MultiTaskModel.predict` returns for the image it saw; `mtpeft predict` scales them to each image's own pixels
first), so report galleries can draw model inputs and `mtpeft predict` the original photos with the same code:

    picture = draw_results(image, [("boxes", "detection", result, class_names), ("garment", "classification", r, None)])

A class keeps one colour (`class_color`) in boxes, masks and legends. A segmentation class named "background" is
left unpainted, so the photo stays visible where nothing was found.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

#: Class colours (Tableau 20 reordered so that neighbouring class ids differ strongly), cycled past 20 classes.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
)
#: Segmentation classes of these names (lower case) are not painted over the image.
UNPAINTED = ("background", "_background_", "bg")

Entry = tuple[str, "tuple[int, int, int] | None"]  # a strip entry: text, and the colour of its swatch (None: none)


def class_color(label: int) -> tuple[int, int, int]:
    """The colour of class `label` in every drawing."""
    return PALETTE[int(label) % len(PALETTE)]


def class_text(label: int, class_names: Sequence[str] | None) -> str:
    """A class as people read it: its name when the task has names, else its id."""
    label = int(label)
    if class_names and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def _check_image(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a uint8 (3, H, W) tensor (RGB), got {got}")
    return image.cpu()


def _line_width(image: torch.Tensor) -> int:
    return max(1, round(max(image.shape[-2:]) / 250))


@cache
def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size)  # Pillow >= 10.1: a scalable font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def font_size(width: int) -> int:
    """Text size in the strips under an image `width` pixels wide."""
    return int(min(28, max(11, width / 45)))


# draw_bounding_boxes fills label backgrounds since torchvision 0.20 (readable labels on any photo)
_FILL_LABELS = {"fill_labels": True} if "fill_labels" in inspect.signature(draw_bounding_boxes).parameters else {}


def draw_detections(
    image: torch.Tensor,
    boxes: Any,
    scores: Any,
    labels: Any,
    class_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Boxes (K, 4) xyxy in `image`'s pixels, labelled "name score" in their class colour (`scores` None: names
    only, e.g. ground truth)."""
    image = _check_image(image)
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).cpu()
    labels = [int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()]
    if not len(boxes):
        return image
    texts = [class_text(label, class_names) for label in labels]
    if scores is not None:
        scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1).tolist()
        texts = [f"{text} {score:.2f}" for text, score in zip(texts, scores, strict=True)]
    colors = [class_color(label) for label in labels]
    return draw_bounding_boxes(image, boxes, texts, colors, width=_line_width(image), **_FILL_LABELS)


def present_classes(mask: Any) -> list[int]:
    """The class ids in a class-id mask, ascending (a bincount: far cheaper than `unique`'s sort on a whole mask)."""
    ids = torch.as_tensor(np.asarray(mask)).flatten().long().clamp(min=0)
    return torch.bincount(ids).nonzero().flatten().tolist() if ids.numel() else []


def painted_classes(mask: Any, class_names: Sequence[str] | None = None, skip: Sequence[int] = ()) -> list[int]:
    """The class ids present in `mask` that are painted (all but a class named "background" and the ids in `skip`,
    such as an ignore index), ascending."""
    return [c for c in present_classes(mask) if c not in skip and class_text(c, class_names).lower() not in UNPAINTED]


def draw_mask(
    image: torch.Tensor,
    mask: Any,
    class_names: Sequence[str] | None = None,
    alpha: float = 0.45,
    skip: Sequence[int] = (),
) -> torch.Tensor:
    """A class-id mask (H, W) at `image`'s size, painted translucent in its class colours (background and the ids in
    `skip` left out)."""
    image = _check_image(image)
    mask = torch.as_tensor(np.asarray(mask)).cpu()
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} for an image of {tuple(image.shape[-2:])}: resize the mask to the "
            f"image first (nearest), as `mtpeft predict` does"
        )
    classes = painted_classes(mask, class_names, skip)
    if not classes:
        return image
    masks = torch.stack([mask == c for c in classes])  # (K, H, W) bool
    return draw_segmentation_masks(image, masks, alpha=alpha, colors=[class_color(c) for c in classes])


def result_entries(
    task: str | None, kind: str, result: Mapping[str, Any], class_names: Sequence[str] | None = None
) -> list[Entry]:
    """What a result says in the strip under the picture (one line, wrapped if long): a mask's legend (classes
    present, with swatches), a classification's caption ("task: name 0.93"); nothing for boxes (they carry their
    labels)."""
    prefix = f"{task}: " if task else ""
    if kind == "classification":
        return [(f"{prefix}{class_text(result['label'], class_names)} {float(result['score']):.2f}", None)]
    if kind == "segmentation":
        classes = painted_classes(result["mask"], class_names)
        if not classes:
            return [(f"{prefix}background only", None)]
        return [(prefix.rstrip() or "classes:", None)] + [(class_text(c, class_names), class_color(c)) for c in classes]
    return []


def text_strip(width: int, lines: Sequence[Sequence[Entry]], size: int | None = None) -> torch.Tensor:
    """A white uint8 (3, h, `width`) strip: each of `lines` a row of entries (text with an optional colour swatch)
    left to right, wrapped when wider than the strip."""
    size = size or font_size(width)
    font, pad = _font(size), max(2, size // 4)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed, y = [], pad - (size + pad)
    for line in lines:
        x, y = pad, y + size + pad
        for text, color in line:
            w = int(np.ceil(scratch.textlength(text, font=font))) + (size + pad if color is not None else 0)
            if x > pad and x + w > width - pad:
                x, y = pad, y + size + pad
            placed.append((x, y, text, color))
            x += w + 2 * pad
    strip = Image.new("RGB", (width, y + size + 2 * pad), "white")
    draw = ImageDraw.Draw(strip)
    for x, y, text, color in placed:
        if color is not None:
            draw.rectangle((x, y + 1, x + size - 2, y + size - 1), fill=color, outline="black")
            x += size + pad
        draw.text((x, y), text, fill="black", font=font)
    return torch.from_numpy(np.asarray(strip).transpose(2, 0, 1).copy())


def draw_results(
    image: torch.Tensor, items: Sequence[tuple[str | None, str, Mapping[str, Any], Sequence[str] | None]]
) -> torch.Tensor:
    """Every result of one image drawn on it: `items` are (task name, output kind, result in `image`'s pixels,
    class names). Masks go first, boxes over them, then one text strip under the image with the masks' legends
    and the classification captions, a line per task. Kinds with nothing to draw (embeddings) are left out.

    Returns:
        uint8 (3, H + strip, W); H x W on top is the image with the overlays.
    """
    picture = _check_image(image)
    lines: list[list[Entry]] = []
    for _, kind, result, names in items:
        if kind == "segmentation":
            picture = draw_mask(picture, result["mask"], names)
    for _, kind, result, names in items:
        if kind == "detection":
            picture = draw_detections(picture, result["boxes"], result["scores"], result["labels"], names)
    for task, kind, result, names in items:
        lines += [entries] if (entries := result_entries(task, kind, result, names)) else []
    if not lines:
        return picture
    return torch.cat([picture, text_strip(picture.shape[-1], lines)], dim=1)


def draw_result(
    image: torch.Tensor,
    kind: str,
    result: Mapping[str, Any],
    class_names: Sequence[str] | None = None,
    task: str | None = None,
) -> torch.Tensor:
    """One result drawn on its image (see `draw_results`): uint8 (3, H [+ strip], W)."""
    return draw_results(image, [(task, kind, result, class_names)])
