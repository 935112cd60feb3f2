"""YAML run configs and the train / eval / tasks commands, end to end on a tiny MultiFashion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from multitask_peft.cli import main
from multitask_peft.run import load_run_config
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
    capsys.readouterr()
    main(["tasks", str(run)])
    assert "garment" in capsys.readouterr().out
    main(["eval", str(run)])
    out = capsys.readouterr().out
    assert "boxes" in out and "map50" in out
    # the run's ONNX graph (export section): every task, the run's preprocessing, at the largest image size
    meta = json.loads((run / "model.json").read_text())
    assert sorted(meta["tasks"]) == ["boxes", "garment", "masks"] and meta["input"]["size"] == [64, 64]
    assert meta["input"]["mean"] == [0.5] * 3 and (run / "model.onnx").is_file()
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
                assert {t["name"] for t in client.tasks()} == {"garment", "boxes", "masks"}
                outs[backend] = client.predict(buffer.getvalue(), ["garment", "boxes", "masks"], logits=True)
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
    assert load_run_config(path, ["train.steps=7"]).train_config.steps == 7
