"""The corruption suite (tasks/data/corruptions.py), the `Corrupted` dataset wrapper, and `mtpeft eval --shift
corruptions` on a tiny trained run (multitask_peft/robustness.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_run import _config
from torch.utils.data import DataLoader

from multitask_peft import robustness
from multitask_peft.cli import main
from multitask_peft.rundir import RunDirectory
from multitask_peft.tasks.data import (
    CORRUPTIONS,
    CocoDetection,
    Corrupted,
    MultiFashionConfig,
    SegmentationFolder,
    check_corruption_names,
    check_severities,
    eval_transforms,
    generate_multifashion,
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
    for label in (3, np.int64(3), torch.tensor(3)):  # labels pass through the pixel-moving corruption
        assert CORRUPTIONS.get("elastic").apply(x, label, 3, _gen())[1] is label
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


# --- mtpeft eval RUN --shift corruptions ------------------------------------------------------------------------------
fashion = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(not fashion.is_file(), reason="needs Debian's dataset-fashion-mnist")
PNG = b"\x89PNG\r\n\x1a\n"
SHIFT = ["--shift", "corruptions", "--corruptions", "gaussian_noise,elastic", "--severities", "5,1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of one training step: test_run's three tasks, plus a linear probe that shares the garment
    task's data (so that one evaluation pass serves two tasks)."""
    if not fashion.is_file():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    tmp = tmp_path_factory.mktemp("shift")
    root = tmp / "mf"
    generate_multifashion(
        root,
        MultiFashionConfig(num_scenes=(4, 4, 2), num_crops=(10, 12, 2), image_size=64, crop_size=32, workers=1),
        progress=False,
    )
    config = _config(root, tmp / "run")
    garment = config["tasks"]["garment"]
    config["tasks"]["probe"] = {"head": dict(garment["head"]), "data": dict(garment["data"])}
    config["train"] = {"steps": 1, "batch_size": 2, "tensorboard": False, "progress": False}
    del config["export"]
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["train", str(path)])
    return tmp / "run"


@needs_fashion
def test_eval_shift_writes_json_markdown_and_figure(run: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    main(["eval", str(run), *SHIFT])
    out = capsys.readouterr().out
    assert "| task | head | metric | images | clean | mean corrupted | relative robustness |" in out
    assert f"wrote {run / 'robustness.json'}, {run / 'robustness.md'}, {run / 'figures' / 'robustness.png'}" in out
    data = json.loads((run / "robustness.json").read_text())
    plain = json.loads((run / "report.json").read_text())["tasks"]  # `evaluate_run`'s numbers, after training
    assert data["corruptions"] == ["gaussian_noise", "elastic"] and data["severities"] == [1, 5]
    assert list(data["tasks"]) == list(RunDirectory(run).config.tasks) and data["max_images"] is None
    assert set(data["tasks"]) == {"garment", "boxes", "masks", "probe"}
    changed = 0
    for name, row in data["tasks"].items():
        assert row["metric"] == plain[name]["metric"] and row["head"] == plain[name]["head"]
        assert row["clean"] == plain[name]["value"]  # the clean pass is plain evaluation
        assert row["num_images"] == plain[name]["metrics"]["num_images"]
        assert set(row["corrupted"]) == set(data["corruptions"])
        grid = [v for by_severity in row["corrupted"].values() for v in by_severity.values()]
        assert len(grid) == 4 and all(0.0 <= v <= 1.0 for v in grid)
        assert row["mean_corrupted"] == pytest.approx(sum(grid) / 4)
        for corruption, by_severity in row["corrupted"].items():
            assert set(by_severity) == {"1", "5"}
            assert row["per_corruption"][corruption] == pytest.approx((by_severity["1"] + by_severity["5"]) / 2)
        if row["clean"] > 0:
            assert row["relative_robustness"] == pytest.approx(row["mean_corrupted"] / row["clean"])
        else:
            assert row["relative_robustness"] is None
        changed += sum(v != row["clean"] for v in grid)
    assert any(row["clean"] > 0 for row in data["tasks"].values())
    assert changed > 0  # the corrupted images reached the model
    markdown = (run / "robustness.md").read_text()
    assert "](figures/robustness.png)" in markdown
    for name, row in data["tasks"].items():
        assert f"\n## {name}: {row['metric']}" in markdown
    assert markdown.count("| elastic | ") == 4
    figure = run / "figures" / "robustness.png"
    assert figure.read_bytes().startswith(PNG) and figure.stat().st_size > 5000
    # plain `mtpeft eval` keeps doing what it did: the report is refreshed, the robustness files are left alone
    stamp = (run / "robustness.json").stat().st_mtime_ns
    main(["eval", str(run)])
    assert "refreshed" in capsys.readouterr().out and figure.is_file()
    assert (run / "robustness.json").stat().st_mtime_ns == stamp and "robustness" not in (run / "report.md").read_text()


@needs_fashion
def test_max_images(run: Path) -> None:
    directory = RunDirectory(run)
    model = directory.load_model()
    options = {"corruptions": ["shot_noise"], "severities": [5], "progress": False}
    report = robustness.evaluate_robustness(model, directory.config, max_images=3, **options)
    assert report["max_images"] == 3 and {row["num_images"] for row in report["tasks"].values()} == {3}
    with pytest.raises(ValueError, match=r"`max_images` should be a positive integer value but the value passed is 0"):
        robustness.evaluate_robustness(model, directory.config, max_images=0, **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--shift", "weather"], "--shift must be one of corruptions but the value passed is 'weather'"),
        (
            ["--shift", "corruptions", "--corruptions", "jpeg,fog"],
            "Unknown corruption 'fog'; available: brightness, contrast, defocus_blur, elastic, gaussian_blur, ",
        ),
        (
            ["--shift", "corruptions", "--severities", "0,3"],
            "severity must be an int in 1..5 but the value passed is 0",
        ),
        (["--shift", "corruptions", "--severities", "1,x"], "--severities expects comma-separated ints but the value "),
        (["--shift", "corruptions", "--severities", ","], "--severities expects a comma-separated list but the value"),
        (["--shift", "corruptions", "--max-images", "0"], "--max-images should be a positive integer but the value"),
        (["--corruptions", "jpeg"], "--corruptions needs `--shift corruptions` or `--wise`: add it, or leave it out"),
        (
            ["--severities", "1", "--seed", "2"],
            "--severities, --seed need `--shift corruptions` or `--wise`: add it, or leave them",
        ),
        (["--shift", "corruptions"], "is not a run directory (no config.yaml)"),
    ],
)
def test_eval_shift_errors(tmp_path: Path, capsys: pytest.CaptureFixture, options: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path), *options])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _report(clean: float) -> dict:
    row = robustness._row("classification", "top1", 10, clean, {"jpeg": {"1": 0.5, "5": 0.25}})
    options = {"corruptions": ["jpeg"], "severities": [1, 5], "seed": 0, "max_images": None, "eval_time_s": 0.0}
    return {"shift": "corruptions", "backbone": "test_vit", **options, "tasks": {"cls": row}}


def test_markdown_and_a_missing_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = _report(0.8)
    row = report["tasks"]["cls"]
    assert row["mean_corrupted"] == 0.375 and row["relative_robustness"] == pytest.approx(0.375 / 0.8)
    text = robustness.format_robustness(report, "figures/robustness.png")
    assert "| cls | classification | top1 | 10 | 80.00 % | 37.50 % | 0.469 |" in text
    assert "| jpeg | 50.00 % | 25.00 % | 37.50 % |" in text
    assert "n/a (clean is 0)" in robustness.format_summary(_report(0.0))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec answers None: as if not installed
    with pytest.warns(UserWarning, match=r"multitask-peft\[report\].*robustness.md is written without its figure"):
        written = robustness.write_robustness(report, tmp_path)
    assert written == [tmp_path / "robustness.json", tmp_path / "robustness.md"]
    assert "![" not in (tmp_path / "robustness.md").read_text() and not (tmp_path / "figures").exists()
    assert json.loads((tmp_path / "robustness.json").read_text()) == report


# --- mtpeft eval RUN --wise (on the same run: its probe shares the garment task's label space and data) ---------------
@needs_fashion
def test_eval_wise_curve_ends_at_the_task_and_the_reference(run: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    report = json.loads((run / "report.json").read_text())["tasks"]
    capsys.readouterr()
    options = ["--wise", "0:1:0.5", "--wise-reference", "probe", "--corruptions", "gaussian_noise", "--severities", "3"]
    main(["eval", str(run), *options])
    assert "WiSE curve" in capsys.readouterr().out
    wise = json.loads((run / "wise.json").read_text())
    assert wise["alphas"] == [0.0, 0.5, 1.0] and wise["reference"] == "probe"
    assert list(wise["tasks"]) == ["garment"]  # every task with a WiSE form and a head like the reference's
    garment = wise["tasks"]["garment"]
    assert garment["clean"][-1] == pytest.approx(report["garment"]["value"])  # alpha 1: the task
    assert garment["clean"][0] == pytest.approx(report["probe"]["value"])  # alpha 0: the probe (same eval data)
    assert len(garment["shifted"]) == 3 and all(0.0 <= v <= 1.0 for v in garment["shifted"])
    assert (run / "figures" / "wise.png").read_bytes().startswith(PNG)
    assert "| alpha | clean | under shift |" in (run / "wise.md").read_text()
    for options, message in [
        (["--wise", "0,1", "--wise-reference", "garment", "--corruptions", "none"], "must leave the backbone frozen"),
        (["--wise", "0,2"], "alphas must lie in [0, 1]"),
        (["--wise-reference", "probe"], "need `--wise ALPHAS`"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", str(run), *options])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_corrupted_subset_through_a_dataloader_is_corrupted() -> None:
    """A DataLoader fetches batches with `__getitems__` when the dataset has one (torch's Subset does): the wrapper
    must not hand the wrapped Subset's out, or every batch comes back clean (what `--max-images` uses)."""
    from torch.utils.data import DataLoader, Subset

    images = [(torch.rand(3, 16, 16) - 0.5) / 0.5 for _ in range(4)]
    subset = Subset([(x, 0) for x in images], [0, 1, 2, 3])
    shifted = Corrupted(subset, "gaussian_noise", 5, MEAN, STD)
    assert not hasattr(shifted, "__getitems__")
    batch = next(iter(DataLoader(shifted, batch_size=4, collate_fn=lambda items: torch.stack([x for x, _ in items]))))
    assert (batch - torch.stack(images)).abs().max() > 0.1
