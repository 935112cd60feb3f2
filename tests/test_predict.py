"""`mtpeft predict` on a tiny run (classification, detection, segmentation) and on its ONNX graph: results.jsonl
equals `model.predict` in each image's own pixels, pictures are drawn, bad images are skipped, EXIF is honoured."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from multitask_peft.cli import main
from multitask_peft.run import export_run
from multitask_peft.run_config import RunConfig, build_model
from multitask_peft.rundir import RunDirectory
from multitask_peft.serving.images import Preprocess
from multitask_peft.visualize import draw_result

TASKS = ("garment", "boxes", "masks")
SIZES = {"scene.png": (72, 96), "sub/cat.jpg": (60, 80), "rotated.jpg": (90, 60)}  # displayed (height, width)


def _config(out: Path) -> dict:
    data = {"source": "multifashion", "root": str(out / "no-data"), "image_size": 64}
    return {
        "backbone": {"name": "test_efficientnet"},
        "tasks": {
            "garment": {
                "head": {"type": "classification", "num_classes": 3, "class_names": ["shirt", "bag", "shoe"]},
                "peft": [{"method": "lora", "r": 2}],
                "data": {**data, "task": "classification"},
            },
            "boxes": {  # score_thresh 0: the random head's boxes all survive, so there is something to draw
                "head": {
                    "type": "detection",
                    "num_classes": 2,
                    "channels": 16,
                    "score_thresh": 0.0,
                    "detections_per_img": 6,
                    "class_names": ["hat", "sock"],
                },
                "peft": [{"method": "pfeiffer", "dim": 4}],
                "data": {**data, "task": "detection"},
            },
            "masks": {
                "head": {"type": "segmentation", "num_classes": 3, "channels": 16, "class_names": ["bg", "a", "b"]},
                "peft": [{"method": "ssf"}],
                "data": {**data, "task": "segmentation"},
            },
        },
        "output": str(out),
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunDirectory:
    """A run directory of three untrained tasks (what `mtpeft train` leaves, minus the training) with model.onnx."""
    path = tmp_path_factory.mktemp("run")
    config = RunConfig.from_dict(_config(path))
    run = RunDirectory.create(path, config)
    model = build_model(config)
    for name in model.tasks:
        model.save_task(name, run.tasks_dir / name)
    if _has_onnx():
        with contextlib.redirect_stdout(io.StringIO()):
            export_run(model, config, run.onnx_path, optimize=False, check=False)
    return run


def _has_onnx() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos of sizes other than the model's (non-square), one in a subfolder, one JPEG with an EXIF
    orientation (stored 90 x 60, shown 60 x 90), a truncated JPEG and a text file."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    Image.fromarray(skimage.data.astronaut()).resize((96, 72)).save(root / "scene.png")
    Image.fromarray(skimage.data.chelsea()).resize((80, 60)).save(root / "sub" / "cat.jpg", quality=95)
    rotated = Image.fromarray(skimage.data.coffee()).resize((90, 60))
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show
    rotated.save(root / "rotated.jpg", exif=exif, quality=95)
    whole = io.BytesIO()
    Image.fromarray(skimage.data.rocket()).save(whole, format="JPEG")
    (root / "broken.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 3])
    (root / "notes.txt").write_text("not an image")
    return root


def _predict(*args: str) -> tuple[str, str]:
    """`mtpeft predict ARGS` in process: (stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        main(["predict", *args])
    return out.getvalue(), err.getvalue()


def _records(out: Path) -> dict[str, dict]:
    lines = (out / "results.jsonl").read_text().splitlines()
    return {Path(r["image"]).name: r for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def torch_out(run: RunDirectory, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("pred") / "torch"
    stdout, stderr = _predict(str(run.path), str(photos), "--out", str(out), "--batch-size", "2", "--device", "cpu")
    return out, stdout, stderr


def test_results_equal_model_predict_in_original_pixels(run: RunDirectory, photos: Path, torch_out: tuple) -> None:
    out, stdout, stderr = torch_out
    records = _records(out)
    assert sorted(records) == ["cat.jpg", "rotated.jpg", "scene.png"]
    assert "broken.jpg" in stderr and "cannot decode the image" in stderr  # reported with the reason, run went on
    assert "predicted 3 image(s)" in stdout and "1 skipped" in stdout and str(out) in stdout
    model = run.load_model().eval()
    spec = run.input_spec(model)
    preprocess = Preprocess(spec.size, spec.mean, spec.std)
    for relative, (h, w) in SIZES.items():
        record = records[Path(relative).name]
        assert (record["height"], record["width"]) == (h, w) and record["image"] == str(photos / relative)
        shown = ImageOps.exif_transpose(Image.open(photos / relative)).convert("RGB")  # independent of predict
        assert shown.size == (w, h)
        want = model.predict(preprocess.tensor(shown)[None], list(TASKS))
        got = record["tasks"]
        # classification: label, name, score, top-5 (3 classes here), best first
        cls = want["garment"][0]
        assert got["garment"]["label"] == cls["label"]
        assert got["garment"]["class_name"] == ["shirt", "bag", "shoe"][cls["label"]]
        assert got["garment"]["score"] == pytest.approx(cls["score"], abs=1e-5)
        assert [t["label"] for t in got["garment"]["top5"]] == cls["logits"].argsort(descending=True).tolist()
        # detection: boxes scaled from the 64 x 64 input to the image's own width and height
        det = want["boxes"][0]
        assert len(det["scores"]) > 0
        scale = torch.tensor([w / 64, h / 64, w / 64, h / 64])
        assert np.allclose(got["boxes"]["boxes"], (det["boxes"] * scale).numpy(), atol=1e-2)
        assert got["boxes"]["labels"] == det["labels"].tolist()
        assert got["boxes"]["class_names"] == [["hat", "sock"][i] for i in det["labels"].tolist()]
        assert np.allclose(got["boxes"]["scores"], det["scores"].numpy(), atol=1e-5)
        # segmentation: a PNG of class ids at the image's size (nearest), the classes present with pixel counts
        mask = np.asarray(Image.open(out / got["masks"]["mask_png"]))
        assert mask.dtype == np.uint8 and mask.shape == (h, w)
        want_mask = F.interpolate(want["masks"][0]["mask"][None, None].float(), size=(h, w), mode="nearest")[0, 0]
        assert (mask == want_mask.numpy()).all()
        ids, counts = np.unique(mask, return_counts=True)
        assert got["masks"]["classes"] == [
            {"id": int(i), "name": ["bg", "a", "b"][i], "pixels": int(c)} for i, c in zip(ids, counts, strict=True)
        ]
        # the picture: the photo with the results drawn on it, a text strip (caption, legend) underneath
        picture = np.asarray(Image.open(out / record["picture"]))
        assert picture.shape[1] == w and picture.shape[0] > h
        assert (picture[:h] != np.asarray(shown)).any(axis=-1).mean() > 0.05


@pytest.mark.skipif(not _has_onnx(), reason="needs the onnx extra")
def test_onnx_graph_gives_the_same_results(run: RunDirectory, photos: Path, torch_out: tuple, tmp_path: Path) -> None:
    want = _records(torch_out[0])
    for source, extra in ((run.onnx_path, []), (run.path, ["--onnx"])):
        out = tmp_path / Path(source).name
        stdout, _ = _predict(str(source), str(photos), "--out", str(out), "--device", "cpu", *extra)
        assert "ONNX Runtime" in stdout
        got = _records(out)
        assert sorted(got) == sorted(want)
        for name, record in got.items():
            a, b = record["tasks"], want[name]["tasks"]
            assert a["garment"]["label"] == b["garment"]["label"]
            assert a["garment"]["score"] == pytest.approx(b["garment"]["score"], abs=1e-4)
            assert a["boxes"]["labels"] == b["boxes"]["labels"]
            assert np.allclose(a["boxes"]["boxes"], b["boxes"]["boxes"], atol=1e-2)
            masks = [np.asarray(Image.open(o / r["masks"]["mask_png"])) for o, r in ((out, a), (torch_out[0], b))]
            assert (masks[0] == masks[1]).mean() >= 0.99


def test_score_threshold_tasks_and_pictures_off(
    run: RunDirectory, photos: Path, torch_out: tuple, tmp_path: Path
) -> None:
    scores = _records(torch_out[0])["scene.png"]["tasks"]["boxes"]["scores"]
    gaps = -np.diff(scores)  # scores come best first; cut in the widest gap (batch size moves scores by ~1e-8)
    cut = int(gaps.argmax()) + 1
    threshold = (scores[cut - 1] + scores[cut]) / 2
    args = ["--tasks", "boxes", "--score-threshold", str(threshold), "--no-pictures", "--device", "cpu"]
    _predict(str(run.path), str(photos / "scene.png"), "--out", str(tmp_path), *args)
    record = _records(tmp_path)["scene.png"]
    assert list(record["tasks"]) == ["boxes"] and "picture" not in record
    kept = record["tasks"]["boxes"]["scores"]
    assert kept == pytest.approx(scores[:cut], abs=1e-5) and 0 < len(kept) < len(scores)
    assert not list(tmp_path.glob("*.png"))


def test_nothing_readable_exits_1_and_bad_arguments_exit_2(run: RunDirectory, photos: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _predict(str(run.path), str(photos / "broken.jpg"), str(tmp_path / "missing.png"), "--out", str(tmp_path))
    assert exit_info.value.code == 1
    assert (tmp_path / "results.jsonl").read_text() == ""
    for args, message in [
        ([str(tmp_path), str(photos)], "no run directory|not a run directory"),
        ([str(run.path), str(photos), "--tasks", "garment,nope"], r"\['nope'\]: not tasks of .* it has"),
    ]:
        err = io.StringIO()
        with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(err):
            main(["predict", *args, "--out", str(tmp_path / "o")])
        assert exit_info.value.code == 2
        assert re.search(message, err.getvalue()), err.getvalue()


def test_draw_result_per_kind() -> None:
    image = torch.from_numpy(skimage.data.astronaut()[:64, :80].transpose(2, 0, 1).copy())
    boxes = {
        "boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([1]),
    }
    mask = torch.zeros(64, 80, dtype=torch.int64)
    mask[10:30, 20:60] = 2
    for kind, result in [
        ("detection", boxes),
        ("segmentation", {"mask": mask}),
        ("classification", {"label": 1, "score": 0.5}),
    ]:
        drawn = draw_result(image, kind, result, ["background", "x", "y"], task="t")
        assert drawn.dtype == torch.uint8 and drawn.shape[0] == 3 and drawn.shape[2] == 80
        assert not torch.equal(drawn, image)
    background = draw_result(image, "segmentation", {"mask": torch.zeros(64, 80, dtype=torch.int64)}, ["background"])
    assert torch.equal(background[:, :64], image)  # background is not painted
    assert torch.equal(draw_result(image, "embedding", {"embedding": torch.ones(4)}), image)
    with pytest.raises(ValueError, match="resize the mask"):
        draw_result(image, "segmentation", {"mask": torch.zeros(32, 40, dtype=torch.int64)})
