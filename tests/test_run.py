"""YAML run configs and the train / eval / tasks commands, end to end on a tiny MultiFashion."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

import multitask_peft as mtp
from multitask_peft.backbone import DataConfig
from multitask_peft.cli import main
from multitask_peft.run import RunConfig, TaskSpec, load_run_config
from multitask_peft.rundir import RunDirectory
from multitask_peft.task_io import CONFIG_NAME
from multitask_peft.tasks.data import MultiFashionConfig, generate_multifashion

fashion = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(not fashion.is_file(), reason="needs Debian's dataset-fashion-mnist")


def _config(root: Path, out: Path) -> dict:
    data = {"source": "multifashion", "root": str(root), "image_size": 64}
    return {
        "backbone": {"name": "test_efficientnet"},
        "tasks": {
            "garment": {
                "head": {"type": "classification", "num_classes": 10},
                "peft": [{"method": "lora", "r": 2}],
                "data": {**data, "task": "classification", "image_size": 32},
            },
            "boxes": {
                "head": {"type": "detection", "num_classes": 10, "channels": 16},
                "peft": [{"method": "pfeiffer", "dim": 4}],
                "data": {**data, "task": "detection"},
            },
            "masks": {
                "head": {"type": "segmentation", "num_classes": 11, "channels": 16},
                "peft": [{"method": "ssf"}],
                "data": {**data, "task": "segmentation"},
            },
        },
        "train": {"steps": 3, "batch_size": 4, "checkpoint_every": 2, "tensorboard": False, "progress": False},
        "export": {"onnx": True, "optimize": False},
        "output": str(out),
    }


@needs_fashion
def test_train_eval_tasks_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "mf"
    generate_multifashion(
        root,
        MultiFashionConfig(num_scenes=(8, 4, 4), num_crops=(20, 8, 8), image_size=64, crop_size=32, workers=1),
        progress=False,
    )
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_config(root, tmp_path / "run")))
    main(["train", str(config), "--set", "train.lr=0.002"])
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert set(report["tasks"]) == {"garment", "boxes", "masks"}
    for name, metric in [("garment", "top1"), ("boxes", "map50"), ("masks", "miou")]:
        row = report["tasks"][name]
        assert row["metric"] == metric and 0.0 <= row["value"] <= 1.0 and row["peft_params"] > 0
    assert (run / "report.md").read_text().count("|") > 20
    assert (run / "log.jsonl").is_file() and (run / "checkpoints" / "latest").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.002
    # the tasks keep their data's class names (MultiFashion's garments; background first for the masks)
    from multitask_peft.tasks.data.multifashion import CLASSES

    saved = {t: json.loads((run / "tasks" / t / CONFIG_NAME).read_text()) for t in ("garment", "masks")}
    assert saved["garment"]["head"]["class_names"] == list(CLASSES)
    assert saved["masks"]["head"]["class_names"] == ["background", *CLASSES]
    capsys.readouterr()
    main(["tasks", str(run)])
    assert "garment" in capsys.readouterr().out
    main(["eval", str(run)])
    out = capsys.readouterr().out
    assert "boxes" in out and "map50" in out
    # the run's ONNX graph (export section): every task, the backbone's preprocessing, at the largest image size
    meta = json.loads((run / "model.json").read_text())
    assert sorted(meta["tasks"]) == ["boxes", "garment", "masks"] and meta["input"]["size"] == [64, 64]
    assert meta["tasks"]["boxes"]["head_config"]["class_names"] == list(CLASSES)
    assert meta["input"]["mean"] == [0.485, 0.456, 0.406] and (run / "model.onnx").is_file()  # test_efficientnet's
    main(["export", str(run), str(tmp_path / "garment.onnx"), "--tasks", "garment", "--merge", "--no-optimize"])
    meta = json.loads((tmp_path / "garment.json").read_text())
    assert meta["form"] == "merged" and list(meta["tasks"]) == ["garment"]
    _check_serve(run)


def _check_serve(run: Path) -> None:
    """`mtpeft serve RUN` with either backend: the same answers for all three tasks on a real photo."""
    pytest.importorskip("fastapi")
    import io
    import socket
    import subprocess
    import sys
    import time

    import numpy as np
    import skimage.data
    from PIL import Image

    from multitask_peft import serving
    from multitask_peft.tasks.data.multifashion import CLASSES

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, format="JPEG")
    outs = {}
    for backend in ("torch", "onnx"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "multitask_peft.cli", "serve", str(run), "--backend", backend]
        proc = subprocess.Popen([*command, "--port", str(port)], stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while not serving.Client(url).ready():
                assert proc.poll() is None and time.monotonic() < deadline, f"mtpeft serve --backend {backend} failed"
                time.sleep(0.1)
            with serving.Client(url) as client:
                listed = {t["name"]: t for t in client.tasks()}
                assert set(listed) == {"garment", "boxes", "masks"}
                assert listed["garment"]["class_names"][0] == CLASSES[0]  # names, not "label 0"
                outs[backend] = client.predict(buffer.getvalue(), ["garment", "boxes", "masks"], logits=True)
                assert outs[backend]["results"]["garment"]["class_name"] in listed["garment"]["class_names"]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    torch_out, onnx_out = outs["torch"]["results"], outs["onnx"]["results"]
    assert outs["torch"]["image_size"] == [512, 512]
    assert np.allclose(torch_out["garment"]["logits"], onnx_out["garment"]["logits"], atol=1e-4)
    assert torch_out["boxes"]["labels"] == onnx_out["boxes"]["labels"]
    assert np.allclose(torch_out["boxes"]["boxes"], onnx_out["boxes"]["boxes"], atol=1e-2)
    masks = [serving.decode_mask_png(o["masks"]["mask_png"]) for o in (torch_out, onnx_out)]
    assert masks[0].shape == (512, 512) and (masks[0] == masks[1]).mean() >= 0.999


def test_config_errors(tmp_path: Path) -> None:
    good = _config(tmp_path / "mf", tmp_path / "out")
    path = tmp_path / "c.yaml"

    def check(data: dict | str, match: str, overrides: tuple[str, ...] = ()) -> None:
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        with pytest.raises(ValueError, match=match):
            load_run_config(path, list(overrides))

    check({**good, "trian": {}}, r"unknown key\(s\) \['trian'\]; valid keys")
    check({**good, "train": {"step": 3}}, r"unknown key\(s\) \['step'\]")
    check({**good, "tasks": {}}, "at least one task")
    check({**good, "tasks": {"Bad Name": good["tasks"]["garment"]}}, "must match")
    bad_task = {**good["tasks"]["garment"], "peft": [{"method": "lora", "r": 0}]}
    check({**good, "tasks": {"garment": bad_task}}, "`r` should be a positive integer")
    bad_data = {**good["tasks"]["garment"], "data": {"source": "ftp"}}
    check({**good, "tasks": {"garment": bad_data}}, "`source` must be one of")
    check("backbone: [", "not valid YAML")
    check(good, "expects key.path=value", overrides=("train.lr",))
    check(good, r"unknown key\(s\) \['nope'\]", overrides=("train.nope=1",))
    path.write_text(yaml.safe_dump(good))
    assert load_run_config(path, ["train.steps=7"]).train.steps == 7


def _with(config: dict, path: str, value: object) -> dict:
    """A deep copy of `config` with the key at dotted `path` set to `value` (list items by index)."""
    config = yaml.safe_load(yaml.safe_dump(config))
    *parents, last = path.split(".")
    node = config
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value
    return config


@pytest.mark.parametrize(
    ("where", "owner", "valid"),
    [
        ("", "RunConfig", "backbone"),
        ("backbone", "BackboneSpec", "pretrained"),
        ("tasks.garment", "TaskSpec", "loss_weight"),
        ("tasks.garment.head", "Classification", "num_classes"),
        ("tasks.garment.peft.0", "LoRA", "r"),
        ("tasks.garment.data", "DataSpec", "image_size"),
        ("train", "TrainConfig", "steps"),
        ("export", "ExportSpec", "onnx"),
        ("multifashion", "MultiFashionConfig", "num_scenes"),
    ],
)
def test_unknown_keys_at_every_level(tmp_path: Path, where: str, owner: str, valid: str) -> None:
    good = {**_config(tmp_path / "mf", tmp_path / "out"), "multifashion": {"seed": 1}}
    node = good
    for part in where.split(".") if where else []:
        node = node[int(part)] if isinstance(node, list) else node[part]
    bad = _with(good, f"{where}.colour" if where else "colour", 1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=rf"{owner}: unknown key\(s\) \['colour'\]; valid keys: \[.*'{valid}'") as err:
        load_run_config(path)
    assert all(repr(k) in str(err.value) for k in node if k != "type" and k != "method")


def test_config_sections_are_declared(tmp_path: Path) -> None:
    """Every section is its dataclass; missing required keys and wrong shapes are ValueErrors."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path / "mf", tmp_path / "out")))
    config = load_run_config(path)
    task = config.tasks["garment"]
    assert isinstance(task, TaskSpec) and task.head == mtp.tasks.Classification(num_classes=10)
    backbone = DataConfig((48, 40), (0.5,) * 3, (0.5,) * 3)
    assert task.peft == [mtp.peft.LoRA(r=2)] and task.data.image_size == 32 and config.input_size(backbone) == (64, 64)
    config.tasks["masks"].data.image_size = None  # the backbone's size
    assert config.tasks["masks"].data.size(backbone) == (48, 40) and config.input_size(backbone) == (64, 64)
    assert config.train.steps == 3 and config.export.optimize is False and config.multifashion is None
    assert {f.name for f in dataclasses.fields(config)} >= set(vars(config))  # nothing undeclared
    assert all({f.name for f in dataclasses.fields(t)} >= set(vars(t)) for t in config.tasks.values())
    for path_, value, error, match in [
        ("tasks.garment.data", {"source": "multifashion"}, ValueError, "`task` must be one of"),
        ("tasks.garment.data", None, ValueError, "tasks.garment.data: DataSpec.from_dict expects a mapping"),
        ("train", [1], ValueError, "train: TrainConfig.from_dict expects a mapping"),
        ("tasks.garment.head", {"num_classes": 3}, ValueError, "needs a 'type' key"),
        ("tasks.garment.peft", {"method": "lora"}, ValueError, "is a list of"),
        ("tasks.garment.head.type", "nope", ValueError, "Unknown head 'nope'"),
        ("tasks", ["garment"], ValueError, "expected a mapping of name -> TaskSpec"),
    ]:
        path.write_text(yaml.safe_dump(_with(_config(tmp_path / "mf", tmp_path / "out"), path_, value)))
        with pytest.raises(error, match=match):
            load_run_config(path)
    data = _config(tmp_path / "mf", tmp_path / "out")
    del data["tasks"]["garment"]["data"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"TaskSpec: missing key\(s\) \['data'\]"):
        load_run_config(path)


@pytest.mark.parametrize("source", ["test", "demo", "readme"])
def test_config_round_trips_through_yaml(tmp_path: Path, source: str) -> None:
    """`to_dict` -> YAML -> `load_run_config` gives an equal config (a run's config.yaml, read by eval / serve)."""
    path = tmp_path / "c.yaml"
    if source == "test":
        data = {**_config(tmp_path / "mf", tmp_path / "out"), "multifashion": {"num_scenes": [4, 2, 2], "seed": 3}}
        path.write_text(yaml.safe_dump(data))
    elif source == "demo":
        path = Path(__file__).parents[1] / "configs" / "demo.yaml"
    else:  # the README's "Training from a config" example
        readme = (Path(__file__).parents[1] / "README.md").read_text()
        path.write_text(readme.split("## Training from a config")[1].split("```yaml")[1].split("```")[0])
    config = load_run_config(path)
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    assert load_run_config(again) == config
    assert RunConfig.from_dict(config.to_dict()) == config


def test_run_directory(tmp_path: Path) -> None:
    """A run directory's paths and input; errors say what is wrong and how to fix it."""
    with pytest.raises(ValueError, match=r"is not a run directory \(no config.yaml\); train one with `mtpeft train"):
        RunDirectory(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path / "mf", tmp_path / "out")))
    run = RunDirectory.create(tmp_path / "run", load_run_config(path))
    assert run.config == load_run_config(path) and RunDirectory(run.path).config == run.config
    assert run.tasks_dir == tmp_path / "run" / "tasks" and run.onnx_path == tmp_path / "run" / "model.onnx"
    spec = run.input_spec()
    backbone = run.build_backbone().data_config  # test_efficientnet: timm's ImageNet mean / std
    assert spec.size == (64, 64) and (spec.mean, spec.std) == (backbone.mean, backbone.std)
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    with pytest.raises(ValueError, match=r"no trained task folder for \['boxes', 'garment', 'masks'\].*--resume"):
        run.load_model()


@pytest.mark.parametrize("command", ["eval", "tasks", "export", "serve"])
def test_commands_need_a_run_directory(tmp_path: Path, command: str, capsys: pytest.CaptureFixture) -> None:
    if command == "serve":
        pytest.importorskip("fastapi")
    argv = [command, str(tmp_path), *([str(tmp_path / "x.onnx")] if command == "export" else [])]
    with pytest.raises(SystemExit):
        main(argv)
    assert "is not a run directory (no config.yaml); train one with `mtpeft train" in capsys.readouterr().err


def test_backbone_preprocessing_flows_into_datasets(tmp_path: Path) -> None:
    """A task's dataset is normalised with the backbone's mean / std and, without `image_size`, resized to the
    backbone's input size."""
    from PIL import Image

    from multitask_peft.run import DataSpec

    folder = tmp_path / "train" / "red"
    folder.mkdir(parents=True)
    Image.new("RGB", (10, 10), (255, 0, 0)).save(folder / "a.png")
    spec = DataSpec(source="imagefolder", root=str(tmp_path), augment="none")
    backbone = DataConfig((24, 20), (0.2, 0.3, 0.4), (0.5, 0.25, 0.125))
    image, _ = spec.dataset("train", train=False, backbone=backbone)[0]
    assert image.shape == (3, 24, 20)
    expected = torch.tensor([(1 - 0.2) / 0.5, (0 - 0.3) / 0.25, (0 - 0.4) / 0.125])
    torch.testing.assert_close(image[:, 12, 10], expected)
    model = mtp.MultiTaskModel.from_timm("test_vit", img_size=48)  # timm's config for test_vit: mean = std = 0.5
    assert model.data_config.image_size == (48, 48) and model.data_config.mean == (0.5, 0.5, 0.5)
