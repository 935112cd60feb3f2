"""The corruption suite (tasks/data/corruptions.py), the `Corrupted` dataset wrapper, and `mtpeft eval --shift
corruptions` on a tiny trained run (multitask_peft/robustness.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from multitask_peft.tasks.data import (
    CORRUPTIONS,
    CocoDetection,
    Corrupted,
    SegmentationFolder,
    check_corruption_names,
    check_severities,
    eval_transforms,
)
from multitask_peft.tasks.data.corruptions import disk_kernel, motion_kernel

NAMES = CORRUPTIONS.names()
#: Corruptions that draw random numbers (the others ignore the generator).
RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "motion_blur", "elastic"}
#: What the issue asks for at least (defocus and Gaussian blur both).
REQUIRED = {"gaussian_noise", "shot_noise", "defocus_blur", "gaussian_blur", "motion_blur", "contrast", "brightness"}
REQUIRED |= {"jpeg", "pixelate"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scene(side: int = 64, width: int | None = None) -> torch.Tensor:
    """A smooth colour gradient with a fine texture and a red block: float32 (3, H, W) in [0, 1]."""
    width = width or side
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, width), indexing="ij")
    x = torch.stack([0.2 + 0.5 * xx, 0.3 + 0.4 * yy, 0.6 - 0.3 * xx * yy])
    x += 0.08 * torch.sin(xx * 40) * torch.cos(yy * 30)
    x[:, side // 4 : side // 2, width // 4 : 3 * width // 4] = torch.tensor([0.9, 0.2, 0.1])[:, None, None]
    return x.clamp(0, 1)


# --- the corruptions --------------------------------------------------------------------------------------------------
def test_the_suite_has_what_the_issue_asks_for() -> None:
    assert set(NAMES) >= REQUIRED
    assert {c for c in NAMES if CORRUPTIONS.get(c).moves_pixels} == {"elastic"}
    for name in NAMES:
        assert len(CORRUPTIONS.get(name).params) == 5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((3, 64, 64), torch.float32), ((2, 3, 40, 56), torch.float64), ((3, 33, 17), torch.float16), ((1, 3, 2, 3), None)],
)
def test_shape_dtype_and_range_are_kept(name: str, shape: tuple[int, ...], dtype: torch.dtype | None) -> None:
    dtype = dtype or torch.float32
    x = scene(shape[-2], shape[-1]).expand(shape).to(dtype)
    for severity in (1, 3, 5):
        y = CORRUPTIONS.get(name)(x, severity, _gen())
        assert y.shape == x.shape and y.dtype == x.dtype
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0 and bool(torch.isfinite(y).all())
    empty = torch.zeros(0, 3, 8, 8)
    assert CORRUPTIONS.get(name)(empty, 5, _gen()).shape == empty.shape


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("side", [32, 64, 100])
def test_severity_five_changes_the_image_more_than_severity_one(name: str, side: int) -> None:
    x = scene(side)
    change = [float((CORRUPTIONS.get(name)(x, s, _gen()) - x).abs().mean()) for s in (1, 5)]
    assert 0.002 < change[0] < change[1], change


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_per_seed(name: str) -> None:
    x = scene(48).expand(2, 3, 48, 48)
    corruption = CORRUPTIONS.get(name)
    first, again, other = (corruption(x, 3, _gen(seed)) for seed in (1, 1, 2))
    assert torch.equal(first, again)
    if name in RANDOM:
        assert not torch.equal(first, other)
        assert not torch.equal(first[0], first[1])  # each image of a batch draws its own numbers
    else:
        assert torch.equal(first, other) and torch.equal(first[0], first[1])
    # one sample through `apply` is the same image as the call with the same generator state
    image, target = corruption.apply(x[0], 7, 3, _gen(5))
    assert torch.equal(image, corruption(x[0], 3, _gen(5))) and target == 7


def test_kernels() -> None:
    """The blur kernels sum to 1 and have the geometry they claim."""
    disk = disk_kernel(2.0)
    assert disk.shape == (7, 7) and float(disk.sum()) == pytest.approx(1.0)
    assert float(disk[3, 3]) == pytest.approx(float(disk[3, 4])) and float(disk[0, 0]) == 0.0  # flat inside, 0 outside
    assert torch.allclose(disk, disk.T) and torch.allclose(disk, disk.flip(0))
    assert torch.equal(disk_kernel(0.3), torch.nn.functional.pad(torch.ones(1, 1), (1, 1, 1, 1)))  # sub-pixel: identity
    line = motion_kernel(4.0, 100.0, 0.0)  # along +x, nearly flat weights
    assert float(line.sum()) == pytest.approx(1.0)
    centre = line.shape[0] // 2
    assert float(line[centre, centre:].sum()) == pytest.approx(1.0)  # one-sided: the centre row, to the right
    up = motion_kernel(4.0, 100.0, 90.0)
    assert float(up[: centre + 1, centre].sum()) == pytest.approx(1.0)  # 90 degrees: upwards (rows decrease)


def test_brightness_and_contrast_do_what_imagenet_c_does() -> None:
    x = scene(32)
    brighter = CORRUPTIONS.get("brightness")(x, 2, _gen())  # HSV value + 0.2, hue and saturation kept
    value, new_value = x.amax(0), brighter.amax(0)
    assert torch.allclose(new_value, (value + 0.2).clamp(max=1), atol=1e-6)
    ratio = brighter / x
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), atol=1e-5)  # every channel scaled alike: same hue
    black = CORRUPTIONS.get("brightness")(torch.zeros(3, 4, 4), 5, _gen())
    assert torch.allclose(black, torch.full((3, 4, 4), 0.5))
    flat = CORRUPTIONS.get("contrast")(x, 5, _gen())
    assert float(flat.std()) < 0.1 * float(x.std())


def test_bad_inputs_give_clear_errors() -> None:
    noise = CORRUPTIONS.get("gaussian_noise")
    x = scene(16)
    for severity in (0, 6, 2.0, True, "3"):
        with pytest.raises(ValueError, match=rf"severity must be an int in 1..5 but the value passed is {severity!r}"):
            noise(x, severity, _gen())
    with pytest.raises(TypeError, match=r"float tensor .* got dtype torch.uint8 \(for uint8 images: image.float"):
        noise((x * 255).to(torch.uint8), 1, _gen())
    with pytest.raises(ValueError, match=r"got shape \(1, 16, 16\)"):
        noise(x[:1], 1, _gen())
    with pytest.raises(ValueError, match=r"got values in \[-2, 2\]; un-normalise first"):
        noise((x - 0.5) / 0.2, 1, _gen())
    with pytest.raises(TypeError, match=r"got list"):
        noise(x.tolist(), 1, _gen())
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got int"):
        noise(x, 1, 3)
    with pytest.raises(ValueError, match=r"Unknown corruption 'fog'; available: .*gaussian_noise.*pixelate"):
        CORRUPTIONS.get("fog")
    with pytest.raises(ValueError, match=r"Unknown corruption 'fog'; available"):
        check_corruption_names(["jpeg", "fog"])
    with pytest.raises(ValueError, match=r"distinct, got \['jpeg', 'jpeg'\]"):
        check_corruption_names(["jpeg", "jpeg"])
    with pytest.raises(ValueError, match=r"at least one corruption; available: "):
        check_corruption_names([])
    with pytest.raises(ValueError, match=r"severity must be an int in 1..5 but the value passed is 9"):
        check_severities([1, 9])
    with pytest.raises(ValueError, match=r"apply takes one image \(3, H, W\), got \(2, 3, 16, 16\)"):
        noise.apply(x.expand(2, 3, 16, 16), 0, 1, _gen())
    with pytest.raises(TypeError, match=r"'elastic' moves pixels and cannot move a target of type list"):
        CORRUPTIONS.get("elastic").apply(x, [1, 2], 3, _gen())
    with pytest.raises(TypeError, match=r"with shape \(8, 8\); it moves int labels, \(H, W\) = \(16, 16\) masks"):
        CORRUPTIONS.get("elastic").apply(x, torch.zeros(8, 8, dtype=torch.int64), 3, _gen())


# --- Corrupted: datasets, with boxes and masks kept aligned ----------------------------------------------------------
SIDE = 128
SQUARE = (30, 20, 70, 76)  # x1, y1, x2, y2 of the bright square (pixels)
DARK, BRIGHT = 0.15, 0.85


@pytest.fixture(scope="module")
def square_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Two images with a bright square on a dark textured background, as COCO detection and as segmentation."""
    root = tmp_path_factory.mktemp("squares")
    (root / "seg" / "images").mkdir(parents=True)
    (root / "seg" / "masks").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(2):
        pixels = DARK + 0.05 * rng.random((SIDE, SIDE, 3))
        mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
        x1, y1, x2, y2 = (v + 6 * i for v in SQUARE)
        pixels[y1:y2, x1:x2] = BRIGHT
        mask[y1:y2, x1:x2] = 1
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(root / "seg" / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "seg" / "masks" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": SIDE, "height": SIDE})
        annotations.append(
            {"id": i, "image_id": i, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": 1.0, "iscrowd": 0}
        )
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "square"}]}
    (root / "coco.json").write_text(json.dumps(coco))
    transform = eval_transforms(SIDE)
    return {
        "detection": CocoDetection(root / "seg" / "images", root / "coco.json", transform, mean=MEAN, std=STD),
        "segmentation": SegmentationFolder(root / "seg", ["background", "square"], transform, mean=MEAN, std=STD),
    }


def _pixels(image: torch.Tensor) -> torch.Tensor:
    """A normalised item image back in [0, 1]: (3, H, W)."""
    return image * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


def _extent(bright: torch.Tensor) -> torch.Tensor:
    """xyxy of the pixels set in a (H, W) bool map."""
    rows, cols = bright.any(1).nonzero()[:, 0], bright.any(0).nonzero()[:, 0]
    return torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)


def test_wrapper_keeps_collate_class_names_and_is_deterministic(square_data: dict) -> None:
    detection = square_data["detection"]
    shifted = Corrupted(detection, "shot_noise", 4, MEAN, STD, seed=3)
    assert len(shifted) == len(detection) and shifted.class_names == ("square",)
    assert shifted.collate is detection.collate and shifted.issues == []
    first, again = shifted[0], shifted[0]
    assert torch.equal(first[0], again[0]) and first[0].dtype == torch.float32
    assert not torch.equal(first[0], Corrupted(detection, "shot_noise", 4, MEAN, STD, seed=4)[0][0])
    assert not torch.equal(first[0], detection[0][0])
    pixels = _pixels(first[0])
    assert float(pixels.min()) > -1e-5 and float(pixels.max()) < 1 + 1e-5  # re-normalised from [0, 1]
    images, targets = next(iter(DataLoader(shifted, batch_size=2, collate_fn=shifted.collate)))
    assert images.shape == (2, 3, SIDE, SIDE) and len(targets) == 2 and torch.equal(images[0], first[0])
    masks = square_data["segmentation"]
    images, targets = next(
        iter(DataLoader(Corrupted(masks, "jpeg", 5, MEAN, STD), batch_size=2, collate_fn=masks.collate))
    )
    assert images.shape == (2, 3, SIDE, SIDE) and targets.shape == (2, SIDE, SIDE) and targets.dtype == torch.int64


@pytest.mark.parametrize("name", NAMES)
def test_boxes_and_masks_stay_aligned(square_data: dict, name: str) -> None:
    """Through the wrapper, the square's box and mask stay on the square: untouched for corruptions that keep the
    pixels where they are; moved with the pixels by `elastic` (the box is the extent of the bright pixels after the
    warp, the mask the bright pixels themselves), which does move them."""
    detection, segmentation = square_data["detection"], square_data["segmentation"]
    for index in range(len(detection)):
        (_, box_target), (_, mask_target) = detection[index], segmentation[index]
        (image, boxes), (image_too, mask) = (Corrupted(d, name, 5, MEAN, STD)[index] for d in (detection, segmentation))
        assert torch.equal(image, image_too)  # the same corruption of the same picture, whatever the target
        assert boxes["labels"].tolist() == [0] and boxes["image_id"] == index
        pixels = _pixels(image).mean(0)  # (H, W) grey
        x1, y1, x2, y2 = (round(float(v)) for v in boxes["boxes"][0])
        inside = torch.zeros(SIDE, SIDE, dtype=torch.bool)
        inside[y1:y2, x1:x2] = True
        assert float(pixels[inside].mean()) > float(pixels[~inside].mean()) + 0.02  # the box is on the bright square
        assert float(pixels[mask == 1].mean()) > float(pixels[mask == 0].mean()) + 0.02
        if not CORRUPTIONS.get(name).moves_pixels:
            assert torch.equal(boxes["boxes"], box_target["boxes"]) and torch.equal(mask, mask_target)
            continue
        bright = pixels > (DARK + BRIGHT) / 2  # (H, W): where the square went
        assert (boxes["boxes"][0] - _extent(bright)).abs().max() <= 1.0
        assert (box_target["boxes"][0] - _extent(bright)).abs().max() > 1.5  # the warp did move the square
        known = mask != 255
        agree = float(((mask == 1) == bright)[known].float().mean())
        assert agree > 0.99 and not torch.equal(mask, mask_target)
        assert agree > float(((mask_target == 1) == bright)[known].float().mean())


def test_wrapper_errors(square_data: dict) -> None:
    data = square_data["segmentation"]
    with pytest.raises(ValueError, match=r"Unknown corruption 'snow'; available: .*elastic"):
        Corrupted(data, "snow", 1, MEAN, STD)
    with pytest.raises(ValueError, match=r"severity must be an int in 1..5 but the value passed is 7"):
        Corrupted(data, "jpeg", 7, MEAN, STD)
    with pytest.raises(ValueError, match=r"std must be a number or 3 numbers \(std > 0\), got \(0.2, 0.2\)"):
        Corrupted(data, "jpeg", 1, MEAN, (0.2, 0.2))
    with pytest.raises(ValueError, match=r"`seed` should be an int but the value passed is 1.5"):
        Corrupted(data, "jpeg", 1, MEAN, STD, seed=1.5)
