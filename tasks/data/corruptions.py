"""Common corruptions in the style of ImageNet-C (Hendrycks & Dietterich, ICLR 2019), on torch tensors, seeded.

Every corruption is called as `CORRUPTIONS.get(name)(image, severity, generator)`: `image` a float tensor in [0, 1]
(un-normalised), (3, H, W) or (N, 3, H, W); `severity` 1..5; `generator` a `torch.Generator` (None: torch's global
one). The result has the input's shape and dtype and lies in [0, 1]. A fixed seed gives a fixed result.

Parameters per severity 1..5. Photometric ones are ImageNet-C's at every image size (CIFAR-10-C softened them
for 32-pixel images; this suite does not). Spatial ones (marked "px @224": blur sigma and radius, motion length and
sigma) are ImageNet-C's 224-pixel values times `s = min(H, W) / 224`, so that a blur covers the same fraction of
the image at every size (at 32 pixels the Gaussian sigmas and defocus radii land close to CIFAR-10-C's). Both blurs
end with ImageNet-C's 0.5-pixel anti-alias Gaussian, so that their mildest severities still blur small images
instead of vanishing under a pixel. The motion angle is uniform in [-45, 45] degrees per image. `elastic` has its
own parametrisation (ImageNet-C's mixes a random affine map into the field): a smooth random field whose RMS
displacement is a fraction of the side.

| name | ImageNet-C name | parameter | severity 1 .. 5 |
|---|---|---|---|
| gaussian_noise | gaussian_noise | noise sigma | 0.08, 0.12, 0.18, 0.26, 0.38 |
| shot_noise | shot_noise | photons per unit intensity (Poisson) | 60, 25, 12, 5, 3 |
| impulse_noise | impulse_noise | fraction of values set to 0 or 1 | 0.03, 0.06, 0.09, 0.17, 0.27 |
| speckle_noise | speckle_noise | multiplicative noise sigma | 0.15, 0.2, 0.35, 0.45, 0.6 |
| gaussian_blur | gaussian_blur | sigma, px @224 | 1, 2, 3, 4, 6 |
| defocus_blur | defocus_blur | disk radius, px @224 | 3, 4, 6, 8, 10 |
| motion_blur | motion_blur | (length, sigma) px @224, random angle | (10, 3), (15, 5), (15, 8), (15, 12), (20, 15) |
| brightness | brightness | added to HSV value | 0.1, 0.2, 0.3, 0.4, 0.5 |
| contrast | contrast | contrast factor | 0.4, 0.3, 0.2, 0.1, 0.05 |
| elastic | elastic_transform | RMS displacement, fraction of the side | 0.005, 0.01, 0.015, 0.02, 0.025 |
| pixelate | pixelate | side fraction kept before upscaling | 0.6, 0.5, 0.4, 0.3, 0.25 |
| jpeg | jpeg_compression | JPEG quality (Pillow) | 25, 18, 15, 10, 7 |

Only `elastic` moves pixels. `corruption.apply(image, target, severity, generator)` corrupts one sample and moves
its target with the same displacement field (masks with nearest neighbours, 255 = ignore where pixels come from
outside the image; boxes to the extent of their warped region); every other corruption passes targets through.
`Corrupted(dataset, ...)` does this for a whole dataset of normalised (image, target) pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from multitask_peft.registry import Registry

from .common import IGNORE_INDEX, validate_options

SEVERITIES = (1, 2, 3, 4, 5)
#: ImageNet-C's spatial parameters are given for 224-pixel images.
REFERENCE_SIDE = 224
#: ImageNet-C's anti-alias blur of the defocus disk (pixels); both blurs end with it.
ALIAS_SIGMA = 0.5
#: Tolerance of the [0, 1] input check (float error of un-normalising).
RANGE_TOLERANCE = 1e-3

Kernel = Callable[[torch.Tensor, Any, "torch.Generator | None"], torch.Tensor]
Displacement = Callable[[Any, tuple[int, int], "torch.Generator | None"], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Corruption:
    """One corruption of the suite, called as `corruption(image, severity, generator)`.

    Args:
        name: Registry name.
        params: The parameter of each severity 1..5 (see the module's table).
        kernel: (images float32 (N, 3, H, W) in [0, 1], parameter, generator) -> (N, 3, H, W); None for a corruption
            that moves pixels (given by `displacement` instead).
        displacement: (parameter, (H, W), generator) -> a `torchvision` displacement field (1, H, W, 2) in
            normalised coordinates, for corruptions that move pixels (applied with `F.elastic`).
        description: One line for listings.
    """

    name: str
    params: tuple[Any, ...]
    kernel: Kernel | None = None
    displacement: Displacement | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.params) != len(SEVERITIES):
            raise ValueError(f"corruption {self.name!r}: one parameter per severity {SEVERITIES}, got {self.params!r}")
        if (self.kernel is None) == (self.displacement is None):
            raise ValueError(f"corruption {self.name!r}: give exactly one of `kernel` and `displacement`")

    @property
    def moves_pixels(self) -> bool:
        """True when the corruption moves image content (then `apply` moves boxes and masks with it)."""
        return self.displacement is not None

    def __call__(self, image: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Corrupt `image` (float in [0, 1], (3, H, W) or (N, 3, H, W)); same shape and dtype, in [0, 1].

        Raises:
            TypeError: `image` is not a floating-point tensor, or `generator` is not a `torch.Generator`.
            ValueError: A bad shape, values outside [0, 1], or `severity` not an int in 1..5.
        """
        x = _check_image(self.name, image)  # (N, 3, H, W) float32
        param = self.params[check_severity(severity) - 1]
        _check_generator(generator)
        if len(x) == 0:  # an empty batch
            return image.clone()
        if self.kernel is not None:
            out = self.kernel(x, param, generator)
        else:
            size = (x.shape[-2], x.shape[-1])
            out = torch.cat([_warp(x[i : i + 1], self.displacement(param, size, generator)) for i in range(len(x))])
        return out.clamp_(0.0, 1.0).reshape(image.shape).to(image.dtype)

    def apply(
        self, image: torch.Tensor, target: Any, severity: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Any]:
        """Corrupt one sample: image (3, H, W) in [0, 1] and its target, moved with the image when the corruption
        moves pixels. With the same generator state the image equals `self(image, severity, generator)`.

        Targets: an int label (unchanged), a mask (H, W) of class ids (nearest neighbours; 255 where pixels come
        from outside the image), or a detection dict whose "boxes" (K, 4) xyxy become the extent of each box's
        warped region (and "masks" (K, H, W), if any, are warped too); other keys are kept.

        Raises:
            TypeError: A target this corruption cannot move (it moves pixels and the target is none of the above).
        """
        if image.ndim != 3:
            raise ValueError(f"corruption {self.name!r}: apply takes one image (3, H, W), got {tuple(image.shape)}")
        if not self.moves_pixels:
            return self(image, severity, generator), target
        x = _check_image(self.name, image)  # (1, 3, H, W) float32
        param = self.params[check_severity(severity) - 1]
        _check_generator(generator)
        size = (x.shape[-2], x.shape[-1])
        field = self.displacement(param, size, generator)  # (1, H, W, 2)
        out = _warp(x, field).clamp_(0.0, 1.0).reshape(image.shape).to(image.dtype)
        return out, warp_target(target, field, size, self.name)


CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def corruption(
    name: str, params: Sequence[Any], description: str, *, moves_pixels: bool = False
) -> Callable[[Callable], Corruption]:
    """Register the decorated function as corruption `name` and return the `Corruption` (the callable users get).

    The function is a kernel (images, parameter, generator) -> images, or with `moves_pixels` a displacement
    function (parameter, (H, W), generator) -> (1, H, W, 2).
    """

    def decorator(fn: Callable) -> Corruption:
        role = "displacement" if moves_pixels else "kernel"
        entry = Corruption(name, tuple(params), description=description, **{role: fn})
        return CORRUPTIONS.register(name)(entry)

    return decorator


# --- validation -------------------------------------------------------------------------------------------------------
def check_severity(severity: object) -> int:
    """Return `severity` if it is an int in 1..5, else raise a ValueError quoting it."""
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an int in 1..5 but the value passed is {severity!r}")
    return severity


def check_severities(severities: Sequence[int]) -> list[int]:
    """Validate severities (ints in 1..5, distinct, at least one); returns them sorted."""
    values = list(severities)
    if not values:
        raise ValueError(f"name at least one severity in {SEVERITIES}")
    for value in values:
        check_severity(value)
    if len(set(values)) != len(values):
        raise ValueError(f"severities must be distinct, got {values!r}")
    return sorted(values)


def check_corruption_names(names: Sequence[str]) -> list[str]:
    """Validate corruption names (each registered, no repeats, at least one); returns them as a list."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"name at least one corruption; available: {', '.join(CORRUPTIONS.names())}")
    for name in names:
        CORRUPTIONS.get(name)  # ValueError listing the valid names
    if len(set(names)) != len(names):
        raise ValueError(f"corruptions must be distinct, got {names!r}")
    return names


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _check_image(name: str, image: object) -> torch.Tensor:
    """The image as float32 (N, 3, H, W), checked: floating point, 3 channels, values in [0, 1]."""
    what = f"corruption {name!r}: image must be a float tensor (3, H, W) or (N, 3, H, W) with values in [0, 1]"
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{what}, got {type(image).__name__}")
    if not image.is_floating_point():
        raise TypeError(f"{what}, got dtype {image.dtype} (for uint8 images: image.float() / 255)")
    if image.ndim not in (3, 4) or image.shape[-3] != 3 or image.shape[-1] == 0 or image.shape[-2] == 0:
        raise ValueError(f"{what}, got shape {tuple(image.shape)}")
    x = image.detach().reshape(-1, *image.shape[-3:]).float()  # (N, 3, H, W)
    if x.numel():
        low, high = float(x.min()), float(x.max())
        if not (low >= -RANGE_TOLERANCE and high <= 1 + RANGE_TOLERANCE):
            raise ValueError(
                f"{what}, got values in [{low:.3g}, {high:.3g}]; un-normalise first (image * std + mean), or wrap "
                "the dataset in Corrupted(dataset, ..., mean, std)"
            )
    return x.clamp(0.0, 1.0)


# --- helpers ----------------------------------------------------------------------------------------------------------
def _scale(x: torch.Tensor) -> float:
    """s = min(H, W) / 224: ImageNet-C's spatial parameters (pixels at 224) times s."""
    return min(x.shape[-2:]) / REFERENCE_SIDE


def _random(shape: Sequence[int], generator: torch.Generator | None, like: torch.Tensor, kind: str = "normal"):
    """Standard normal or uniform [0, 1) numbers drawn on the generator's device, moved to `like`'s."""
    device = generator.device if generator is not None else torch.device("cpu")
    draw = torch.randn if kind == "normal" else torch.rand
    return draw(tuple(shape), generator=generator, device=device).to(like.device)


def _odd_kernel_size(sigma: float, side: int) -> int:
    """An odd kernel size covering +-3 sigma, at most 2 * side - 1 (so that reflect padding stays inside)."""
    size = 2 * math.ceil(3 * sigma) + 1
    return max(1, min(size, 2 * side - 1))


def _filter(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-image 2-D filtering of every channel, borders reflected (replicated where the kernel outgrows the image).

    Args:
        x: (N, C, H, W).
        kernels: (N or 1, kh, kw), odd sizes; each image's kernel applies to all its channels.
    """
    n, c, h, w = x.shape
    kh, kw = kernels.shape[-2:]
    kernels = kernels.to(x).expand(n, kh, kw)
    weight = kernels.repeat_interleave(c, dim=0)[:, None]  # (N * C, 1, kh, kw)
    pad = (kw // 2, kw // 2, kh // 2, kh // 2)
    mode = "reflect" if kh // 2 < h and kw // 2 < w else "replicate"
    padded = nnf.pad(x.reshape(1, n * c, h, w), pad, mode=mode)  # (1, N * C, H + kh - 1, W + kw - 1)
    return nnf.conv2d(padded, weight, groups=n * c).reshape(n, c, h, w)


def _alias_blur(x: torch.Tensor) -> torch.Tensor:
    return F.gaussian_blur(x, [3, 3], [ALIAS_SIGMA, ALIAS_SIGMA]) if min(x.shape[-2:]) > 1 else x


def _warp(x: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) sampled at identity + `field` (1, H, W, 2), bilinear; black where pixels come from outside."""
    return F.elastic(x, field.to(x), interpolation=F.InterpolationMode.BILINEAR, fill=None)


# --- noise ------------------------------------------------------------------------------------------------------------
@corruption("gaussian_noise", (0.08, 0.12, 0.18, 0.26, 0.38), "additive Gaussian noise")
def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    return x + sigma * _random(x.shape, generator, x)


@corruption("shot_noise", (60, 25, 12, 5, 3), "Poisson (photon) noise")
def shot_noise(x: torch.Tensor, photons: float, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.poisson(x.to(device) * photons, generator=generator).to(x.device) / photons


@corruption("impulse_noise", (0.03, 0.06, 0.09, 0.17, 0.27), "salt-and-pepper noise")
def impulse_noise(x: torch.Tensor, amount: float, generator: torch.Generator | None) -> torch.Tensor:
    u = _random(x.shape, generator, x, "uniform")  # per value, as scikit-image's random_noise(mode="s&p")
    out = x.clone()
    out[u < amount / 2] = 0.0
    out[(u >= amount / 2) & (u < amount)] = 1.0
    return out


@corruption("speckle_noise", (0.15, 0.2, 0.35, 0.45, 0.6), "multiplicative Gaussian noise")
def speckle_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    return x + x * sigma * _random(x.shape, generator, x)


# --- blur -------------------------------------------------------------------------------------------------------------
@corruption("gaussian_blur", (1, 2, 3, 4, 6), "Gaussian blur (torchvision gaussian_blur)")
def gaussian_blur(x: torch.Tensor, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    # sigma scaled to the image, composed with the 0.5 px anti-alias blur (Gaussians add in quadrature)
    sigma = math.hypot(sigma * _scale(x), ALIAS_SIGMA)
    size = _odd_kernel_size(sigma, min(x.shape[-2:]))
    return F.gaussian_blur(x, [size, size], [sigma, sigma])


def disk_kernel(radius: float, supersample: int = 8) -> torch.Tensor:
    """A normalised disk of `radius` pixels, each pixel weighted by the fraction of its area inside the disk
    (sampled `supersample`^2 times), so that fractional radii blur smoothly. Shape (2R + 1, 2R + 1)."""
    half = math.ceil(radius + 0.5)
    offsets = (torch.arange(supersample, dtype=torch.float64) + 0.5) / supersample - 0.5
    coords = (torch.arange(-half, half + 1, dtype=torch.float64)[:, None] + offsets).reshape(-1)  # (K * S,)
    inside = (coords[:, None] ** 2 + coords[None, :] ** 2) <= radius**2  # (K * S, K * S)
    k = 2 * half + 1
    weights = inside.double().reshape(k, supersample, k, supersample).mean(dim=(1, 3))  # (K, K)
    if float(weights.sum()) == 0.0:  # a disk between the samples of the centre pixel: no blur
        weights[half, half] = 1.0
    return (weights / weights.sum()).float()


@corruption("defocus_blur", (3, 4, 6, 8, 10), "defocus: disk kernel + 0.5 px anti-alias blur")
def defocus_blur(x: torch.Tensor, radius: float, generator: torch.Generator | None) -> torch.Tensor:
    return _alias_blur(_filter(x, disk_kernel(radius * _scale(x))[None]))


def motion_kernel(length: float, sigma: float, angle_deg: float, steps_per_pixel: int = 4) -> torch.Tensor:
    """A one-sided motion-blur kernel (as ImageMagick's `-motion-blur`, which ImageNet-C uses): weights
    exp(-t^2 / (2 sigma^2)) at distances t in [0, length] from the centre along `angle_deg` (0 = +x, counter-
    clockwise), splatted bilinearly onto the pixel grid and normalised. Shape (2R + 1, 2R + 1), R = ceil(length) + 1.
    """
    half = math.ceil(length) + 1
    size = 2 * half + 1
    t = torch.linspace(0.0, length, max(2, math.ceil(length * steps_per_pixel) + 1), dtype=torch.float64)
    weights = torch.exp(-(t**2) / (2 * max(sigma, 1e-6) ** 2))
    angle = math.radians(angle_deg)
    px, py = half + t * math.cos(angle), half - t * math.sin(angle)  # image rows grow downwards
    kernel = torch.zeros(size * size, dtype=torch.float64)
    x0, y0 = px.floor(), py.floor()
    for dx in (0, 1):
        for dy in (0, 1):
            share = (1 - (px - x0 - dx).abs()) * (1 - (py - y0 - dy).abs())
            index = ((y0 + dy) * size + (x0 + dx)).long()
            kernel.index_add_(0, index, weights * share)
    kernel = kernel.reshape(size, size)
    return (kernel / kernel.sum()).float()


@corruption("motion_blur", ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)), "one-sided motion blur at a random angle")
def motion_blur(x: torch.Tensor, param: tuple[float, float], generator: torch.Generator | None) -> torch.Tensor:
    s = _scale(x)
    angles = _random((len(x),), generator, x, "uniform").cpu() * 90 - 45  # (N,) degrees
    kernels = torch.stack([motion_kernel(param[0] * s, param[1] * s, float(a)) for a in angles])  # (N, k, k)
    return _filter(x, kernels)


# --- digital / weather ------------------------------------------------------------------------------------------------
@corruption("brightness", (0.1, 0.2, 0.3, 0.4, 0.5), "brighter: HSV value + c")
def brightness(x: torch.Tensor, shift: float, generator: torch.Generator | None) -> torch.Tensor:
    # ImageNet-C adds c to the HSV value (the channel maximum) with hue and saturation kept, i.e. it scales each
    # pixel's RGB by V' / V; torchvision's adjust_brightness scales every pixel by one factor, which leaves black
    # pixels black, so it is not used here. Black pixels (V = 0, no hue) become grey c.
    value = x.amax(dim=1, keepdim=True)  # (N, 1, H, W)
    brighter = (value + shift).clamp(max=1.0)
    return torch.where(value > 0, x * brighter / value.clamp(min=1e-12), brighter.expand_as(x))


@corruption("contrast", (0.4, 0.3, 0.2, 0.1, 0.05), "lower contrast (torchvision adjust_contrast)")
def contrast(x: torch.Tensor, factor: float, generator: torch.Generator | None) -> torch.Tensor:
    return F.adjust_contrast(x, factor)


@corruption("pixelate", (0.6, 0.5, 0.4, 0.3, 0.25), "downscale (area), upscale (nearest)")
def pixelate(x: torch.Tensor, fraction: float, generator: torch.Generator | None) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = [max(1, int(h * fraction)), max(1, int(w * fraction))]
    x = F.resize(x, small, interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return F.resize(x, [h, w], interpolation=F.InterpolationMode.NEAREST)


@corruption("jpeg", (25, 18, 15, 10, 7), "JPEG compression (Pillow encode / decode)")
def jpeg(x: torch.Tensor, quality: int, generator: torch.Generator | None) -> torch.Tensor:
    # Pillow, as ImageNet-C: torchvision.io's encode_jpeg / decode_jpeg warn on every call since torchvision 0.29
    # (deprecated, to be removed), and Pillow is a core dependency already.
    decoded = []
    for pixels in x.mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():  # N x (H, W, 3)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        with Image.open(buffer) as image:
            decoded.append(torch.from_numpy(np.array(image.convert("RGB"))))  # (H, W, 3) uint8
    return torch.stack(decoded).permute(0, 3, 1, 2).to(x.device, torch.float32) / 255  # (N, 3, H, W)


# --- geometry ---------------------------------------------------------------------------------------------------------
@corruption(
    "elastic", (0.005, 0.01, 0.015, 0.02, 0.025), "smooth random displacement (torchvision elastic)", moves_pixels=True
)
def elastic(rms: float, size: tuple[int, int], generator: torch.Generator | None) -> torch.Tensor:
    """A smooth random displacement field: uniform noise in [-1, 1] blurred with sigma = 5 % of the side (at least
    1 pixel), scaled so that the root-mean-square displacement is `rms` times the side. Returns (1, H, W, 2) in
    the normalised coordinates of `torchvision.transforms.v2.functional.elastic` (x then y)."""
    h, w = size
    side = min(h, w)
    sigma = max(1.0, 0.05 * side)
    device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(1, 2, h, w, generator=generator, device=device).cpu() * 2 - 1  # (1, 2, H, W)
    k = _odd_kernel_size(sigma, side)
    field = F.gaussian_blur(noise, [k, k], [sigma, sigma])  # (1, 2, H, W) smooth, small
    field = field / field.square().sum(dim=1).mean().sqrt().clamp(min=1e-12) * (rms * side)  # pixels
    field = field * torch.tensor([2.0 / w, 2.0 / h]).view(1, 2, 1, 1)  # pixels -> normalised coordinates
    return field.permute(0, 2, 3, 1).contiguous()  # (1, H, W, 2)


def warp_target(target: Any, field: torch.Tensor, size: tuple[int, int], name: str = "elastic") -> Any:
    """Move a target with a displacement field (1, H, W, 2) as `F.elastic` moves its image (see `Corruption.apply`)."""
    if (
        target is None
        or isinstance(target, (int, np.integer, str))
        or (isinstance(target, (torch.Tensor, np.ndarray)) and target.ndim == 0)
    ):
        return target  # a label: nothing moves
    if isinstance(target, torch.Tensor) and target.ndim == 2 and tuple(target.shape) == size:
        return _warp_masks(target, field, IGNORE_INDEX)  # (H, W)
    if isinstance(target, dict) and "boxes" in target:
        out = dict(target)
        out["boxes"] = warp_boxes(torch.as_tensor(target["boxes"]), field, size)
        masks = target.get("masks")
        if isinstance(masks, torch.Tensor) and masks.ndim == 3 and tuple(masks.shape[-2:]) == size:
            out["masks"] = _warp_masks(masks, field, 0)  # (K, H, W)
        return out
    raise TypeError(
        f"corruption {name!r} moves pixels and cannot move a target of type {type(target).__name__}"
        f"{f' with shape {tuple(target.shape)}' if isinstance(target, torch.Tensor) else ''}; it moves int labels, "
        f"(H, W) = {size} masks and detection dicts with 'boxes' (K, 4) xyxy"
    )


def _warp_masks(masks: torch.Tensor, field: torch.Tensor, fill: int) -> torch.Tensor:
    warped = F.elastic(tv_tensors.Mask(masks), field, interpolation=F.InterpolationMode.NEAREST, fill=fill)
    return warped.as_subclass(torch.Tensor).to(masks.dtype)


def warp_boxes(boxes: torch.Tensor, field: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boxes (K, 4) xyxy moved by a displacement field: each becomes the extent of its region (the pixels whose
    centres it covers) warped as a mask, so boxes stay aligned with the warped pixels; a box covering no pixel
    centre takes torchvision's estimate from its corners."""
    if boxes.numel() == 0:
        return boxes
    h, w = size
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    b = boxes.float()
    rows = (ys[None] >= b[:, 1:2]) & (ys[None] <= b[:, 3:4])  # (K, H)
    cols = (xs[None] >= b[:, 0:1]) & (xs[None] <= b[:, 2:3])  # (K, W)
    regions = (rows[:, :, None] & cols[:, None, :]).to(torch.uint8)  # (K, H, W)
    warped = _warp_masks(regions, field, 0).bool()  # (K, H, W)
    corners = F.elastic(tv_tensors.BoundingBoxes(b, format="XYXY", canvas_size=size), field).as_subclass(
        torch.Tensor
    )  # (K, 4) torchvision's estimate
    out = corners.clone()
    for k in range(len(b)):
        r = warped[k].any(dim=1).nonzero()[:, 0]
        c = warped[k].any(dim=0).nonzero()[:, 0]
        if len(r) and len(c):
            out[k] = torch.stack([c[0], r[0], c[-1] + 1, r[-1] + 1]).float()
    return out.to(boxes.dtype if boxes.is_floating_point() else torch.float32)


# --- datasets ---------------------------------------------------------------------------------------------------------
def item_seed(*parts: object) -> int:
    """A 63-bit seed from `parts`, stable across processes and Python versions (the construction of
    `multitask_peft.training.sampling.stable_seed`, which `tasks/` may not import)."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class Corrupted(Dataset):
    """A dataset of normalised (image, target) pairs seen through a corruption: each item is un-normalised,
    corrupted under its own seed, and normalised again; targets move with the pixels when the corruption moves
    them (see `Corruption.apply`).

    Item `i` is corrupted under seed `item_seed(seed, corruption, i)`: the same at every call, in every worker
    process, and the same random draw at every severity (so that severities differ in strength, not in luck).
    `collate`, `class_names` and the other attributes of `dataset` are available on the wrapper.

    Args:
        dataset: Items (image float (3, H, W) normalised with `mean` / `std`, target); any of this package's
            datasets, a `Subset`, or a list.
        corruption: A name in `CORRUPTIONS`.
        severity: 1..5.
        mean: The normalisation mean (one number or one per channel; `model.data_config.mean`).
        std: The normalisation std.
        seed: Base seed of the per-item seeds.
    """

    def __init__(
        self,
        dataset: Any,
        corruption: str,
        severity: int,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        seed: int = 0,
    ) -> None:
        self.corruption = CORRUPTIONS.get(corruption)  # ValueError listing the valid names
        self.severity = check_severity(severity)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Corrupted: `seed` should be an int but the value passed is {seed!r}")
        self.mean, self.std = validate_options("skip", "none", mean, std)  # (3, 1, 1) each
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        # `collate`, `class_names`, `issues`, ... of the wrapped dataset (only called for names not found here).
        # Never a dunder: a wrapped torch Subset's `__getitems__` would let a DataLoader fetch its batches
        # uncorrupted, past `__getitem__`.
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, target = self.dataset[index]
        image = torch.as_tensor(image)
        x = image.float() * self.std + self.mean  # (3, H, W) back in [0, 1]
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.corruption.name, index))
        x, target = self.corruption.apply(x.clamp(0.0, 1.0), target, self.severity, generator)  # (3, H, W)
        return ((x - self.mean) / self.std).to(image.dtype), target

    def __repr__(self) -> str:
        return f"Corrupted({self.dataset!r}, {self.corruption.name!r}, severity={self.severity}, seed={self.seed})"
