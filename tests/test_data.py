"""Datasets (ImageFolder, COCO, segmentation folders), joint transforms, and the MultiFashion generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from multitask_peft.cli import main as cli_main
from multitask_peft.tasks.data import (
    CocoDetection,
    DataError,
    ImageFolder,
    MultiFashionConfig,
    SegmentationFolder,
    eval_transforms,
    generate_multifashion,
    load_multifashion,
    train_transforms,
)
from multitask_peft.tasks.data.fashion_mnist import FASHION_MNIST_DIR

HAVE_FASHION_MNIST = (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()
needs_fashion_mnist = pytest.mark.skipif(not HAVE_FASHION_MNIST, reason="apt-get install dataset-fashion-mnist")

COLOURS = {1: (255, 0, 0), 2: (0, 255, 0)}
RECTS = {1: (5, 10, 30, 40), 2: (45, 20, 75, 55)}  # x0, y0, x1, y1 (exclusive)


def _synthetic(h: int = 60, w: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """Black image with a red and a green rectangle; mask 1 / 2 under them."""
    image, mask = np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.uint8)
    for k, (x0, y0, x1, y1) in RECTS.items():
        image[y0:y1, x0:x1], mask[y0:y1, x0:x1] = COLOURS[k], k
    return image, mask


def _tight(where: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(where, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def _write_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert(mode or ("RGB" if array.ndim == 3 else "L")).save(path)


# ------------------------------------------------------------------------------------------- transforms
TRANSFORMS = {
    "resized_crop": lambda: train_transforms(48),
    "scale_jitter": lambda: train_transforms(48, augment="scale_jitter", scale=(0.3, 2.0)),
    "eval": lambda: eval_transforms((40, 56)),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transforms_keep_image_boxes_and_masks_aligned(name: str) -> None:
    image, mask = _synthetic()
    transform = TRANSFORMS[name]()
    for seed in range(25):
        torch.manual_seed(seed)
        boxes = tv_tensors.BoundingBoxes(torch.tensor([RECTS[1], RECTS[2]]), format="XYXY", canvas_size=(60, 80))
        target = {"boxes": boxes, "labels": torch.tensor([1, 2])}
        img = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        img, target, out_mask = transform(img, target, tv_tensors.Mask(torch.from_numpy(mask)))
        assert img.shape[-2:] == out_mask.shape[-2:] == target["boxes"].canvas_size
        assert set(out_mask.unique().tolist()) <= {0, 1, 2, 255}
        boxes = v2.ClampBoundingBoxes()(target["boxes"])
        for box, k in zip(boxes, target["labels"].tolist()):
            if (out_mask == k).sum() < 4 or (box[2:] - box[:2]).min() < 2:
                continue  # cropped to a sliver: rounding dominates
            channel = k - 1  # red for 1, green for 2
            in_image = (img[channel] > 160) & (img[1 - channel] < 96)
            torch.testing.assert_close(_tight(out_mask == k), box.float(), atol=1.5, rtol=0)
            torch.testing.assert_close(_tight(in_image), box.float(), atol=1.5, rtol=0)
            outside = F.pad((out_mask != k).float()[None], (2, 2, 2, 2), value=1.0)  # (1, H + 4, W + 4)
            interior = F.max_pool2d(outside, 5, stride=1)[0] == 0
            assert in_image[interior].all()  # every pixel 2 px inside the mask has the object's colour


def test_transform_options_are_validated() -> None:
    with pytest.raises(ValueError, match="augment must be one of"):
        train_transforms(32, augment="mosaic")
    with pytest.raises(ValueError, match="image_size must be"):
        eval_transforms(0)
    with pytest.raises(ValueError, match="area fraction"):
        train_transforms(32, scale=(0.5, 2.0))


# ------------------------------------------------------------------------------------------- COCO detection
def _coco_dir(tmp_path: Path, annotations: list[dict], categories: list[dict] | None = None) -> Path:
    image, _ = _synthetic()
    _write_png(tmp_path / "images" / "a.png", image)
    _write_png(tmp_path / "images" / "b.png", image[:, ::-1])
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 80, "height": 60},
            {"id": 2, "file_name": "b.png", "width": 80, "height": 60},
        ],
        "annotations": annotations,
        "categories": categories or [{"id": 7, "name": "green"}, {"id": 3, "name": "red"}, {"id": 12, "name": "x"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path


def _xywh(k: int) -> list[int]:
    x0, y0, x1, y1 = RECTS[k]
    return [x0, y0, x1 - x0, y1 - y0]


def test_coco_maps_categories_and_flips_boxes_with_the_image(tmp_path: Path) -> None:
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": _xywh(1), "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": _xywh(2), "iscrowd": 1},
    ]
    root = _coco_dir(tmp_path, anns)
    plain = CocoDetection(root / "images", root / "ann.json")
    assert plain.class_names == ("red", "green", "x") and plain.category_ids == (3, 7, 12)
    assert len(plain) == 2  # image 2 has no annotations: kept as a negative
    image, target = plain[0]
    assert image.dtype == torch.float32 and image.shape == (3, 60, 80) and image.min() == -1.0 and image.max() == 1.0
    assert target["labels"].tolist() == [0, 1] and target["iscrowd"].tolist() == [False, True]
    assert target["boxes"].dtype == torch.float32 and target["image_id"] == 1
    assert target["boxes"].tolist() == [list(map(float, RECTS[1])), list(map(float, RECTS[2]))]

    flipped = CocoDetection(root / "images", root / "ann.json", v2.RandomHorizontalFlip(1.0), drop_empty=True)
    assert len(flipped) == 1
    image, target = flipped[0]
    for (x0, y0, x1, y1), box in zip([RECTS[1], RECTS[2]], target["boxes"].tolist()):
        assert box == [80.0 - x1, y0, 80.0 - x0, y1]
        assert (image[:, int(box[1]) : int(box[3]), int(box[0]) : int(box[2])].abs().amax(0) == 1.0).all()
    assert image[0, 10:40, 80 - 30 : 80 - 5].eq(1.0).all()  # the red rectangle moved with its box


def test_coco_drops_cropped_away_boxes_with_their_labels(tmp_path: Path) -> None:
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": _xywh(1), "iscrowd": 1},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": _xywh(2), "iscrowd": 0},
    ]
    root = _coco_dir(tmp_path, anns)
    crop_right = v2.Lambda(lambda x: v2.functional.crop(x, 0, 40, 60, 40), tv_tensors.Image, tv_tensors.BoundingBoxes)
    dataset = CocoDetection(root / "images", root / "ann.json", crop_right, drop_empty=True)
    image, target = dataset[0]
    assert image.shape == (3, 60, 40)
    assert target["labels"].tolist() == [1] and target["iscrowd"].tolist() == [False]
    assert target["boxes"].tolist() == [[5.0, 20.0, 35.0, 55.0]]  # the green box, shifted by the crop
    images, targets = CocoDetection.collate([dataset[0], dataset[0]])
    assert images.shape == (2, 3, 60, 40) and isinstance(targets, list) and len(targets) == 2


def test_coco_reports_bad_annotations_and_files(tmp_path: Path) -> None:
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": _xywh(1), "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [-5, 2, 10, 10]},  # negative
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 2, 0, 10]},  # empty
        {"id": 4, "image_id": 1, "category_id": 99, "bbox": _xywh(2)},  # label outside the class list
        {"id": 5, "image_id": 42, "category_id": 3, "bbox": _xywh(2)},  # unknown image
        {"id": 6, "image_id": 1, "category_id": 3, "bbox": [70, 50, 30, 30]},  # outside the image
        {"id": 7, "image_id": 3, "category_id": 3, "bbox": _xywh(2)},  # its image is missing: reported once
    ]
    root = _coco_dir(tmp_path, anns)
    data = json.loads((root / "ann.json").read_text())
    data["images"] += [{"id": 3, "file_name": "missing.png"}, {"id": 4, "file_name": "corrupt.png"}]
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (root / "ann.json").write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        CocoDetection(root / "images", root / "ann.json", on_error="raise")
    message = str(info.value)
    expected = ["id=2", "negative box", "id=3", "empty box", "category_id 99 is not in the class list"]
    expected += ["image_id 42", "outside the 80x60 image", "missing.png: missing file", "corrupt.png: unreadable"]
    assert all(text in message for text in expected), message
    assert len(info.value.issues) == 7
    with pytest.warns(UserWarning, match="skipped 7 problem"):
        dataset = CocoDetection(root / "images", root / "ann.json")
    assert len(dataset) == 2 and len(dataset.issues) == 7
    assert dataset[0][1]["labels"].tolist() == [0]  # only the valid annotation of image 1

    (root / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        CocoDetection(root / "images", root / "bad.json", on_error="skip")
    (root / "nocat.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="non-empty 'categories'"):
        CocoDetection(root / "images", root / "nocat.json")
    with pytest.raises(ValueError, match="on_error must be one of"):
        CocoDetection(root / "images", root / "ann.json", on_error="ignore")


# ------------------------------------------------------------------------------------------- ImageFolder, segmentation
def test_image_folder_labels_collate_and_corrupt_files(tmp_path: Path) -> None:
    image, _ = _synthetic()
    for name in ("cat", "ant"):
        for i in range(3):
            _write_png(tmp_path / name / f"{i}.png", image)
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    dataset = ImageFolder(tmp_path, eval_transforms(32))
    assert dataset.class_names == ("ant", "cat") and dataset.targets == [0, 0, 0, 1, 1, 1]
    images, labels = next(iter(DataLoader(dataset, batch_size=4, collate_fn=dataset.collate)))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    assert ImageFolder(tmp_path, classes=["cat", "ant"]).targets == [0, 0, 0, 1, 1, 1]

    (tmp_path / "ant" / "9.png").write_bytes(Path(tmp_path / "ant" / "0.png").read_bytes()[:100])  # truncated
    with pytest.raises(DataError, match=r"ant/9.png: unreadable image"):
        ImageFolder(tmp_path, on_error="raise")
    with pytest.warns(UserWarning, match="skipped 1 problem"):
        assert len(ImageFolder(tmp_path)) == 6
    with pytest.raises(ValueError, match="missing: \\['dog'\\]"):
        ImageFolder(tmp_path, classes=["cat", "dog"])
    with pytest.raises(ValueError, match="different sizes"):
        ImageFolder.collate([(torch.zeros(3, 4, 4), 0), (torch.zeros(3, 5, 5), 1)])


def test_segmentation_folder_pairs_and_bad_masks(tmp_path: Path) -> None:
    image, mask = _synthetic()
    mask[0, :4] = 255  # ignore
    for i in range(3):
        _write_png(tmp_path / "images" / f"{i}.png", image)
        _write_png(tmp_path / "masks" / f"{i}.png", mask)
    names = ("background", "red", "green")
    dataset = SegmentationFolder(tmp_path, names, v2.RandomHorizontalFlip(1.0), check="full")
    image_t, mask_t = dataset[0]
    assert mask_t.dtype == torch.int64 and mask_t.shape == (60, 80) and image_t.shape == (3, 60, 80)
    assert torch.equal(mask_t, torch.from_numpy(mask[:, ::-1].astype(np.int64)))
    assert (image_t[0][mask_t == 1] > 0.9).all() and (image_t[1][mask_t == 2] > 0.9).all()
    images, masks = dataset.collate([dataset[0], dataset[1]])
    assert images.shape == (2, 3, 60, 80) and masks.shape == (2, 60, 80)

    _write_png(tmp_path / "images" / "nomask.png", image)
    _write_png(tmp_path / "images" / "small.png", image)
    _write_png(tmp_path / "masks" / "small.png", mask[:30])
    _write_png(tmp_path / "images" / "rgb.png", image)
    _write_png(tmp_path / "masks" / "rgb.png", image)
    _write_png(tmp_path / "images" / "label.png", image)
    _write_png(tmp_path / "masks" / "label.png", np.where(mask == 2, 7, mask).astype(np.uint8))
    with pytest.raises(DataError) as info:
        SegmentationFolder(tmp_path, names, on_error="raise", check="full")
    message = str(info.value)
    expected = ["missing mask for image", "nomask.png", "small.png: mask is 80x30, its image 80x60"]
    expected += ["rgb.png: unsupported image mode 'RGB'", "label.png: mask values [7] outside the class list"]
    assert all(text in message for text in expected), message
    with pytest.warns(UserWarning, match="skipped 3 problem"):  # "header" cannot see mask values
        header_only = SegmentationFolder(tmp_path, names)
    bad = [i for i, (_, m) in enumerate(header_only.samples) if m.name == "label.png"][0]
    with pytest.raises(DataError, match="label.png: mask values \\[7\\]"):
        header_only[bad]
    (tmp_path / "train.txt").write_text("0\n2\n")
    assert len(SegmentationFolder(tmp_path, names, ids="train.txt", on_error="raise")) == 2


# ------------------------------------------------------------------------------------------- MultiFashion
@pytest.fixture(scope="module")
def multifashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_FASHION_MNIST:
        pytest.skip("apt-get install dataset-fashion-mnist")
    out = tmp_path_factory.mktemp("mf") / "multifashion"
    argv = ["data", "multifashion", str(out), "--num-scenes", "16", "6", "6", "--num-crops", "20", "5", "5"]
    cli_main([*argv, "--image-size", "64", "--crop-size", "32", "--format", "png", "--workers", "2", "--quiet"])
    return out


def test_render_scene_pixels_masks_and_boxes_agree() -> None:
    from multitask_peft.tasks.data.scenes import mask_to_rle, render_scene

    rng = np.random.default_rng(0)
    garments = [(np.zeros((28, 28), np.uint8), k) for k in (3, 5, 8, 1)]
    for picture, k in garments:
        picture[4 + k : 24, 6 : 20 + k] = 40 + 20 * k  # a garment shape that is not square
    for _ in range(10):
        scene = render_scene(np.zeros((64, 64, 3), np.uint8), garments, (0.3, 0.7), 0.3, rng)
        # garment pixels are never black (intensity > threshold, tint >= 0.35): on black they are the mask
        assert np.array_equal(scene.image.max(axis=2) > 0, scene.semantic > 0)
        assert len(scene.labels) >= 1 and np.logical_or.reduce(scene.masks).sum() == (scene.semantic > 0).sum()
        for label, (x, y, w, h), visible in zip(scene.labels, scene.boxes, scene.masks):
            assert (scene.semantic[visible] == label + 1).all()
            assert visible[y : y + h, x : x + w].sum() == visible.sum()  # the box holds the whole garment
            assert visible[y, x : x + w].any() and visible[y + h - 1, x : x + w].any()  # and is tight
            assert visible[y : y + h, x].any() and visible[y : y + h, x + w - 1].any()
    assert mask_to_rle(np.array([[1, 0, 0], [1, 1, 0]], bool)) == {"size": [2, 3], "counts": [0, 2, 1, 1, 2]}


@needs_fashion_mnist
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools and numpy 2
def test_multifashion_loads_with_own_loaders_and_pycocotools(multifashion: Path) -> None:
    from pycocotools.coco import COCO

    meta = json.loads((multifashion / "multifashion.json").read_text())
    assert meta["splits"]["val"]["scenes"] == 6 and meta["config"]["seed"] == 0 and len(meta["classes"]) == 10
    for split, (crops, scenes) in {"train": (20, 16), "val": (5, 6), "test": (5, 6)}.items():
        cls = load_multifashion(multifashion, "classification", split, on_error="raise", check="full")
        det = load_multifashion(multifashion, "detection", split, on_error="raise", check="full")
        seg = load_multifashion(multifashion, "segmentation", split, on_error="raise", check="full")
        assert (len(cls), len(det), len(seg)) == (crops, scenes, scenes)
        assert cls.num_classes == det.num_classes == 10 and seg.num_classes == 11
        assert cls[0][0].shape == (3, 32, 32)
        coco = COCO(str(multifashion / "detection" / f"{split}.json"))
        assert len(coco.getImgIds()) == scenes
        for index in range(scenes):
            image, target = det[index]
            image_s, semantic = seg[index]
            assert torch.equal(image, image_s)  # the same scene
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[target["image_id"]]))
            assert len(anns) == len(target["labels"]) >= 1
            for ann, box, label in zip(anns, target["boxes"], target["labels"].tolist()):
                instance = torch.from_numpy(coco.annToMask(ann)).bool()
                assert ann["category_id"] == label + 1 and ann["area"] == int(instance.sum())
                assert torch.equal(_tight(instance), box)  # exact box around the garment's pixels
                assert (semantic[instance] == label + 1).all()
            assert ((semantic > 0).sum() == sum(a["area"] for a in anns)) and set(semantic.unique().tolist()) <= set(
                range(11)
            )


@needs_fashion_mnist
def test_multifashion_is_deterministic_and_augments_consistently(multifashion: Path, tmp_path: Path) -> None:
    config = MultiFashionConfig(
        num_scenes=(16, 6, 6), num_crops=(20, 5, 5), image_size=64, crop_size=32, image_format="png", workers=1
    )
    generate_multifashion(tmp_path, config, progress=False)
    files = sorted(p.relative_to(multifashion) for p in multifashion.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert all((multifashion / f).read_bytes() == (tmp_path / f).read_bytes() for f in files)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_multifashion(tmp_path, config, progress=False)

    torch.manual_seed(0)
    det = load_multifashion(multifashion, "detection", "train", train_transforms(48, augment="scale_jitter"))
    seg = load_multifashion(multifashion, "segmentation", "train", train_transforms(48))
    images, targets = next(iter(DataLoader(det, batch_size=8, collate_fn=det.collate)))
    assert images.shape == (8, 3, 48, 48) and all(t["boxes"].shape[0] == t["labels"].shape[0] for t in targets)
    for t in targets:
        assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all() and t["boxes"].min() >= 0 and t["boxes"].max() <= 48
    images, masks = next(iter(DataLoader(seg, batch_size=8, collate_fn=seg.collate)))
    assert masks.shape == (8, 48, 48) and masks.dtype == torch.int64 and set(masks.unique().tolist()) <= set(range(11))


def test_multifashion_missing_files_say_what_to_install(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = MultiFashionConfig(num_scenes=(2, 1, 1), fashion_mnist_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        generate_multifashion(tmp_path / "out", config)
    with pytest.raises(SystemExit) as info:
        cli_main(["data", "multifashion", str(tmp_path / "out"), "--fashion-mnist-dir", str(tmp_path / "nowhere")])
    assert info.value.code == 2 and "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="num_scenes must be three counts"):
        MultiFashionConfig(num_scenes=(1, -2, 3))
    with pytest.raises(ValueError, match="image_format must be one of"):
        MultiFashionConfig(image_format="gif")


@pytest.mark.slow
@needs_fashion_mnist
def test_multifashion_10k_scenes_under_a_minute(tmp_path: Path) -> None:
    import time

    start = time.perf_counter()
    generate_multifashion(
        tmp_path, MultiFashionConfig(num_scenes=(10_000, 0, 0), num_crops=0, workers=2), progress=False
    )
    assert time.perf_counter() - start < 60


def test_exif_rotated_photo_gives_one_tensor_in_training_and_serving(tmp_path: Path) -> None:
    """A phone JPEG stored sideways with an EXIF orientation: training data and the server both see it upright, and
    feed the model the same tensor (one decoder, one resize, one normalisation)."""
    import io

    from PIL import Image

    from multitask_peft.serving import Preprocess
    from multitask_peft.tasks.data import ImageFolder, eval_transforms

    rng = np.random.default_rng(0)
    stored = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))  # 50 wide, 30 high as stored
    exif = stored.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display (displayed 30 wide, 50 high)
    (tmp_path / "train" / "a").mkdir(parents=True)
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    (tmp_path / "train" / "a" / "photo.jpg").write_bytes(buffer.getvalue())
    mean, std = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)
    dataset = ImageFolder(tmp_path / "train", eval_transforms((40, 24)), mean=mean, std=std)
    trained, _ = dataset[0]
    served, (height, width) = Preprocess((40, 24), mean, std).decode(buffer.getvalue())
    assert (height, width) == (50, 30)  # upright, as displayed
    assert trained.shape == served.shape == (3, 40, 24)
    torch.testing.assert_close(served, trained, atol=0, rtol=0)
