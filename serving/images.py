"""Request images in (bytes -> normalised tensor) and results out (tensors -> JSON in the request's pixels)."""

from __future__ import annotations

import base64
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from multitask_peft.outputs import MASK_FORMATS, OUTPUT_KINDS, JsonContext, ResultOptions
from multitask_peft.tasks.data.common import image_tensor, normalize, upright_rgb
from multitask_peft.tasks.data.transforms import eval_transforms
from multitask_peft.tasks.segmentation_output import decode_mask_png, encode_mask_png

from .errors import BadRequest

__all__ = [
    "FORMATS",
    "MAX_LIST_MASK_PIXELS",
    "MAX_PIXELS",
    "PredictOptions",
    "Preprocess",
    "decode_base64",
    "decode_mask_png",
    "encode_mask_png",
    "parse_tasks",
    "format_result",
    "to_json",
]

#: Largest decoded image accepted, in pixels (a decompression-bomb guard: 40 MP, e.g. 8000 x 5000).
MAX_PIXELS = 40_000_000
#: Largest image whose mask may be asked for as nested JSON lists (`mask_format="list"`).
MAX_LIST_MASK_PIXELS = 4_000_000
#: Image formats accepted (PIL names); others (EPS, which would run Ghostscript, ...) are refused.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


@dataclass(frozen=True)
class Preprocess:
    """How the served model wants its input: RGB resized to `size` (H, W), scaled to [0, 1], normalised."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_pixels: int = MAX_PIXELS

    def check(self, data: bytes) -> None:
        """Cheap checks from the header alone (a known format, within `max_pixels`); `decode` does the rest."""
        if not data:
            raise BadRequest("the image is empty")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                width, height = Image.open(io.BytesIO(data), formats=FORMATS).size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadRequest(f"image rejected as a decompression bomb ({e})") from e
        except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, ValueError, ...)
            raise BadRequest(f"cannot decode the image ({'/'.join(FORMATS)} accepted): {type(e).__name__}: {e}") from e
        if width * height > self.max_pixels:
            raise BadRequest(f"image of {width}x{height} pixels is over the limit of {self.max_pixels} pixels")

    def check_pixels(self, pixels: np.ndarray) -> None:
        """Checks of an image sent as pixels (an OIP UINT8 tensor): (H, W, 3) uint8, 1 to `max_pixels` pixels."""
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise BadRequest(f"an image tensor must be UINT8 [H, W, 3] (RGB), got {pixels.dtype} {list(pixels.shape)}")
        height, width = pixels.shape[:2]
        if height * width == 0:
            raise BadRequest("the image has no pixels")
        if height * width > self.max_pixels:
            raise BadRequest(f"image of {width}x{height} pixels is over the limit of {self.max_pixels} pixels")

    def decode(self, data: bytes | np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image file bytes (or RGB pixels (H, W, 3) uint8, checked by `check_pixels`) -> ((3, H, W) normalised
        float tensor at `size`, original (height, width)).

        Raises `BadRequest` for anything that is not a whole, decodable image within `max_pixels`.
        """
        image = Image.fromarray(np.ascontiguousarray(data), "RGB") if isinstance(data, np.ndarray) else self.open(data)
        return self.tensor(image), (image.height, image.width)

    def open(self, data: bytes) -> Image.Image:
        """Image file bytes -> the RGB image as it is shown (EXIF orientation applied), at its own size: what
        `decode` resizes and normalises, and what `mtpeft predict` draws its results on (one decoder for both).

        Raises `BadRequest` for anything that is not a whole, decodable image within `max_pixels`.
        """
        if not data:
            raise BadRequest("the image is empty")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
                width, height = image.size
                if width * height > self.max_pixels:
                    raise BadRequest(f"image of {width}x{height} pixels is over the limit of {self.max_pixels} pixels")
                image.load()
                image = upright_rgb(image)  # phone photos: upright, as they are shown (as training data)
                width, height = image.size
        except BadRequest:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadRequest(f"image rejected as a decompression bomb ({e})") from e
        except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, ValueError, ...)
            raise BadRequest(f"cannot decode the image ({'/'.join(FORMATS)} accepted): {type(e).__name__}: {e}") from e
        if width == 0 or height == 0:
            raise BadRequest("the image has no pixels")
        return image

    def tensor(self, image: Image.Image) -> torch.Tensor:
        """A decoded RGB image -> (3, H, W) normalised float tensor at `size`: the evaluation transform and the
        normalisation of the training datasets, so a photo gives the model the same tensor in both."""
        x = eval_transforms(self.size)(image_tensor(image))
        return normalize(x, torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1))


def decode_base64(text: object) -> bytes:
    if not isinstance(text, str) or not text:
        raise BadRequest("'image' must be a non-empty base64 string")
    if text.startswith("data:"):  # a data URL: data:image/png;base64,....
        text = text.partition(",")[2]
    text = "".join(text.split())  # line-wrapped base64 (as `base64` writes it)
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as e:
        raise BadRequest(f"'image' is not valid base64 ({e})") from e


@dataclass(frozen=True)
class PredictOptions(ResultOptions):
    """Per-request options: how results are formatted (`ResultOptions`: score_threshold, max_detections,
    mask_format, logits) plus how long the request may take.

    Attributes:
        timeout_s: Seconds the request may wait in all (queue + forward); None: the server's default.
        alpha: WiSE coefficient in [0, 1] for the request's tasks (`MultiTaskModel.predict(..., alpha=)`); None:
            the tasks as trained.
        wise_reference: The served linear-probe task that alpha = 0 becomes (None: a zero head).
    """

    timeout_s: float | None = None
    alpha: float | None = None
    wise_reference: str | None = None

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> PredictOptions:
        """From request fields (JSON values or form strings); raises `BadRequest` naming the bad field."""
        values: dict[str, Any] = {}
        for key, kind in (("score_threshold", float), ("max_detections", int), ("timeout_s", float), ("alpha", float)):
            value = raw.get(key)
            if value is None or value == "":
                continue
            if isinstance(value, bool):
                raise BadRequest(f"{key!r} must be a number, got {value!r}")
            try:
                number = kind(value)
            except (TypeError, ValueError, OverflowError) as e:
                raise BadRequest(f"{key!r} must be a number, got {value!r}") from e
            if kind is float and not np.isfinite(number):
                raise BadRequest(f"{key!r} must be finite, got {value!r}")
            values[key] = number
        if not 0.0 <= values.get("score_threshold", 0.0) <= 1.0:
            raise BadRequest(f"'score_threshold' must be in [0, 1], got {values['score_threshold']}")
        if values.get("max_detections", 0) < 0 or values.get("max_detections", 0) > 10_000:
            raise BadRequest(f"'max_detections' must be in [0, 10000], got {values['max_detections']}")
        if "timeout_s" in values and not 0 < values["timeout_s"] <= 3600:
            raise BadRequest(f"'timeout_s' must be in (0, 3600], got {values['timeout_s']}")
        if "alpha" in values and not 0.0 <= values["alpha"] <= 1.0:
            raise BadRequest(f"'alpha' must be in [0, 1], got {values['alpha']}")
        reference = raw.get("wise_reference")
        if reference not in (None, ""):
            if not isinstance(reference, str):
                raise BadRequest(f"'wise_reference' must be a task name, got {reference!r}")
            if "alpha" not in values:
                raise BadRequest("'wise_reference' needs 'alpha' (the WiSE coefficient in [0, 1])")
            values["wise_reference"] = reference
        mask_format = raw.get("mask_format") or "png"
        if mask_format not in MASK_FORMATS:
            raise BadRequest(f"'mask_format' must be 'png' or 'list', got {mask_format!r}")
        logits = raw.get("logits")
        if logits is None:
            logits = False
        if isinstance(logits, str):
            if logits.lower() not in ("true", "false", "1", "0", ""):
                raise BadRequest(f"'logits' must be true or false, got {logits!r}")
            logits = logits.lower() in ("true", "1")
        if not isinstance(logits, bool):
            raise BadRequest(f"'logits' must be true or false, got {logits!r}")
        return cls(mask_format=mask_format, logits=logits, **values)


def parse_tasks(raw: object) -> list[str]:
    """`tasks` from JSON (a list or a comma-separated string) or a form (repeated fields or comma-separated)."""
    if isinstance(raw, str):
        names = [t.strip() for t in raw.split(",")]
    elif isinstance(raw, Sequence) and all(isinstance(t, str) for t in raw):
        names = [t.strip() for part in raw for t in part.split(",")]
    else:
        raise BadRequest(f"'tasks' must be a list of task names or a comma-separated string, got {raw!r}")
    names = list(dict.fromkeys(t for t in names if t))
    if not names:
        raise BadRequest("'tasks' must name at least one task")
    return names


def to_json(
    kind: str,
    result: dict[str, Any],
    input_size: tuple[int, int],
    original: tuple[int, int],
    options: ResultOptions,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One task's result for one image as JSON, in the pixels of the image the client sent: the JSON form of the
    task's output kind (`kind`, a name in `OUTPUT_KINDS`)."""
    return format_result("json", kind, result, JsonContext(input_size, original, options, class_names))


def format_result(form: str, kind: str, result: dict[str, Any], context: JsonContext) -> Any:
    """One task's result for one image, in the pixels of the image the client sent, as `form`: "json" (the output
    kind's JSON form, `/v1/predict`) or "tensors" (its Open Inference Protocol tensors as numpy arrays, a batch of
    one: every array has a leading dimension of 1)."""
    output = OUTPUT_KINDS.get(kind)
    if form == "json":
        return output.to_json(result, context)
    try:
        fields = output.to_oip([result], [context])
    except NotImplementedError as e:
        raise BadRequest(str(e)) from e
    return {name: tensor.numpy() for name, tensor in fields.items()}
