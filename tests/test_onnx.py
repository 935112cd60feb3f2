"""ONNX export: one multi-task graph per backbone kind, checked against `model.predict` on ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import multitask_peft as mtp  # noqa: E402
from conftest import example_config, make_model, randomize  # noqa: E402
from multitask_peft.export import sidecar_path  # noqa: E402
from multitask_peft.peft import METHODS  # noqa: E402


def _onnx_methods(kind: str) -> list[str]:
    return [m for m in METHODS if METHODS.get(m).onnx and example_config(m, kind) is not None]


@pytest.fixture(scope="module", params=["vit", "cnn"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Every ONNX-capable method (combined three ways into classification tasks, so the graph stays small), plus
    detection and segmentation tasks; exported once, with a dynamic batch."""
    kind = request.param
    model, size = make_model(kind)
    methods = _onnx_methods(kind)
    # weight updates (lora, dora, fact, ...) one per task (they would clash on a module), methods that recompute
    # a module from its sub-layers (prefix) alone too, the rest spread over those tasks
    alone = [m for m in methods if METHODS.get(m).weight_update or METHODS.get(m).owns_submodules]
    groups: list[list[str]] = [[m] for m in alone] + [[] for _ in range(max(0, 3 - len(alone)))]
    spread = [k for k, g in enumerate(groups) if not (g and METHODS.get(g[0]).owns_submodules)]
    for k, m in enumerate(m for m in methods if m not in alone):
        groups[spread[k % len(spread)]].append(m)
    for k, group in enumerate(groups):
        peft = [example_config(m, kind) for m in group]
        model.add_task(f"cls{k}", head=mtp.tasks.Classification(num_classes=4), peft=peft)
        randomize(model.task(f"cls{k}"), seed=k)
    model.add_task("boxes", head=mtp.tasks.Detection(num_classes=3), peft=[mtp.peft.SSF()])
    model.add_task("masks", head=mtp.tasks.Segmentation(num_classes=5), peft=[example_config("lora", kind)])
    randomize(model.task("boxes"), seed=100)
    randomize(model.task("masks"), seed=101)
    # optimize=False: the exporter's optimiser adds half again to the export time; ORT optimises the graph anyway
    path = mtp.export_onnx(model, tmp_path_factory.mktemp(kind) / "model.onnx", image_size=size, optimize=False)
    return kind, model, size, path


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_runtime_matches_pytorch(exported: tuple, batch: int) -> None:
    kind, model, size, path = exported
    runner = mtp.OnnxRunner(path)
    images = _images(batch, size, seed=batch)
    got = runner.predict(images)
    expected = model.predict(images, runner.tasks)
    assert set(got) == set(model.tasks)
    for task, results in expected.items():
        for i, (a, b) in enumerate(zip(got[task], results, strict=True)):
            where = f"{kind} {task} image {i}"
            if "logits" in b:
                torch.testing.assert_close(a["logits"], b["logits"], atol=1e-4, rtol=1e-4, msg=where)
                assert a["label"] == b["label"], where
            elif "mask" in b:
                agree = (a["mask"] == b["mask"]).float().mean().item()
                assert agree >= 0.999, f"{where}: {agree:.4%} of pixels agree"
            else:
                assert len(a["boxes"]) == len(b["boxes"]) > 0, where
                assert torch.equal(a["labels"], b["labels"]), where
                torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=0, msg=where)
                torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=0, msg=where)


def test_onnx_sidecar_and_outputs(exported: tuple) -> None:
    kind, model, size, path = exported
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["input"]["size"] == [size, size] and meta["input"]["dynamic_batch"]
    assert list(meta["tasks"]) == model.tasks
    assert meta["tasks"]["boxes"]["outputs"] == {
        f: f"boxes.{f}" for f in ("boxes", "scores", "labels", "num_detections")
    }
    assert meta["tasks"]["masks"]["head_config"]["num_classes"] == 5
    runner = mtp.OnnxRunner(path)
    raw = runner.run(_images(3, size, seed=0))
    assert raw["boxes.boxes"].shape == (3, 100, 4) and raw["masks.mask"].shape == (3, size, size)
    assert raw["cls0.logits"].shape == (3, 4)
    with pytest.raises(ValueError, match=r"shape \(N, 3, "):
        runner.run(torch.zeros(2, 3, size + 1, size))
    with pytest.raises(ValueError, match="'nope'"):
        runner.predict(torch.zeros(1, 3, size, size), tasks=["nope"])


def test_export_rejects_methods_without_onnx_form(tmp_path: Path) -> None:
    model, size = make_model("vit")
    model.add_task("prompted", head=mtp.tasks.Classification(num_classes=2), peft=[mtp.peft.VPT(num_tokens=2)])
    with pytest.raises(ValueError, match="'prompted'.*vpt"):
        mtp.export_onnx(model, tmp_path / "m.onnx", image_size=size)
    with pytest.raises(ValueError, match="unknown task 'missing'"):
        mtp.export_onnx(model, tmp_path / "m.onnx", tasks=["missing"], image_size=size)
    assert not (tmp_path / "m.onnx").exists()


def test_merged_single_task_graph_equals_unmerged(exported: tuple, tmp_path: Path) -> None:
    """A task whose PEFT folds (LoRA on the segmentation task) exported alone and merged: same outputs."""
    kind, model, size, path = exported
    if kind != "vit":
        pytest.skip("one backbone is enough here (folding itself is tested for both in test_model)")
    merged = mtp.export_onnx(
        model, tmp_path / "masks.onnx", tasks=["masks"], image_size=size, merge=True, optimize=False
    )
    meta = json.loads(sidecar_path(merged).read_text())
    assert meta["form"] == "merged" and list(meta["tasks"]) == ["masks"]
    images = _images(2, size, seed=7)
    got = mtp.OnnxRunner(merged).run(images)["masks.mask"]
    expected = mtp.OnnxRunner(path).run(images)["masks.mask"]
    assert (got == expected).mean() >= 0.999
    with pytest.raises(ValueError, match="cannot be folded"):
        mtp.export_onnx(model, tmp_path / "x.onnx", tasks=["cls0"], merge=True)  # bottleneck adapters


def test_lora_adapter_files_switch_tasks(tmp_path: Path) -> None:
    """Several LoRA tasks of one shape: one graph, one .onnx_adapter per task; each adapter gives its task's
    outputs, in one ONNX Runtime session."""
    model, size = make_model("vit")
    names = ["a", "b", "c"]
    for k, name in enumerate(names):
        model.add_task(name, head=mtp.tasks.Classification(num_classes=4), peft=[mtp.peft.LoRA(r=2, alpha=4)])
        randomize(model.task(name), seed=10 + k)
    path = mtp.export_onnx(model, tmp_path / "lora.onnx", tasks=names, image_size=size, merge=True)
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["form"] == "adapters" and all((tmp_path / meta["adapters"][n]).is_file() for n in names)
    runner = mtp.OnnxRunner(path)
    images = _images(3, size, seed=3)
    got = runner.predict(images, tasks=names)
    expected = model.predict(images, names)
    for name in names:
        for a, b in zip(got[name], expected[name], strict=True):
            torch.testing.assert_close(a["logits"], b["logits"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got["a"][0]["logits"], got["b"][0]["logits"])
    with pytest.raises(ValueError, match="name one of"):
        runner.run(images)
    model.add_task("other", head=mtp.tasks.Classification(num_classes=4), peft=[mtp.peft.LoRA(r=4)])
    with pytest.raises(ValueError, match="'other' differs"):
        mtp.export_onnx(model, tmp_path / "bad.onnx", tasks=["a", "other"], image_size=size, merge=True)
    assert not (tmp_path / "bad.onnx").exists()


def test_int8_export(tmp_path: Path) -> None:
    """Dynamic int8 weight matmuls: MatMulInteger in the graph, drift recorded and small, labels kept."""
    import onnx

    model, size = make_model("vit")
    model.add_task("cls", head=mtp.tasks.Classification(num_classes=4), peft=[mtp.peft.LoRA(r=4)])
    model.add_task("masks", head=mtp.tasks.Segmentation(num_classes=3), peft=[mtp.peft.SSF()])
    randomize(model.task("cls"))
    randomize(model.task("masks"), seed=1)
    path = mtp.export_onnx(model, tmp_path / "q.onnx", image_size=size, quantize="int8", optimize=False)
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["precision"] == "int8"
    drift = sidecar["quantization"]["drift"]
    assert 0 < drift["cls.logits"] <= 0.25 and drift["masks.mask"] >= 0.95
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "MatMulInteger" in ops
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.json", "q.onnx"]  # no fp32 copy left behind
    images = _images(4, size, seed=2)
    raw = torch.from_numpy(mtp.OnnxRunner(path).run(images)["cls.logits"])
    expected = torch.stack([r["logits"] for r in model.predict(images, "cls")["cls"]])
    assert (raw - expected).abs().max() <= 0.25 * max(1.0, expected.abs().max().item())
    with pytest.raises(ValueError, match="exclude each other"):
        mtp.export_onnx(model, tmp_path / "bad.onnx", image_size=size, quantize="int8", fp16=True)
    with pytest.raises(ValueError, match="quantize must be"):
        mtp.export_onnx(model, tmp_path / "bad.onnx", image_size=size, quantize="int4")


def test_fp16_export(tmp_path: Path) -> None:
    """Half-precision graph with float32 inputs and outputs, close to the fp32 model."""
    model, size = make_model("vit")
    model.add_task("cls", head=mtp.tasks.Classification(num_classes=4), peft=[mtp.peft.SSF()])
    randomize(model.task("cls"))
    path = mtp.export_onnx(model, tmp_path / "half.onnx", image_size=size, fp16=True, optimize=False)
    assert json.loads(sidecar_path(path).read_text())["precision"] == "fp16"
    images = _images(2, size, seed=1)
    raw = mtp.OnnxRunner(path).run(images)["cls.logits"]
    assert raw.dtype.name == "float32"
    expected = torch.stack([r["logits"] for r in model.predict(images, "cls")["cls"]])
    torch.testing.assert_close(torch.from_numpy(raw), expected, atol=2e-2, rtol=2e-2)
    # the merged single-task form: the folded backbone is cast with the graph
    merged = mtp.export_onnx(
        model, tmp_path / "half_merged.onnx", image_size=size, fp16=True, merge=True, optimize=False
    )
    raw = mtp.OnnxRunner(merged).run(images)["cls.logits"]
    torch.testing.assert_close(torch.from_numpy(raw), expected, atol=2e-2, rtol=2e-2)


def test_detection_parity_tolerates_near_tie_swaps_only() -> None:
    """Post-NMS detections compare as sets: two near-tied candidates swapping across the top-k cut pass, a moved
    box or a changed label does not."""
    from multitask_peft.export.checks import compare

    names = ["det.boxes", "det.scores", "det.labels", "det.num_detections"]
    k = 20
    boxes = torch.arange(k * 4, dtype=torch.float32).reshape(1, k, 4) * 3  # (1, K, 4)
    scores = torch.linspace(0.9, 0.1, k)[None]  # best first
    labels = torch.arange(k)[None] % 3
    expected = [boxes, scores, labels, torch.tensor([k])]

    def run(b: torch.Tensor, s: torch.Tensor, lab: torch.Tensor) -> None:
        compare(names, [b.numpy(), s.numpy(), lab.numpy(), np.array([k])], expected, 1e-4, "test")

    run(boxes.clone(), scores.clone(), labels.clone())
    swapped = boxes.clone()
    swapped[0, -1] = torch.tensor([500.0, 500.0, 540.0, 540.0])  # the last slot went to a tied candidate elsewhere
    run(swapped, scores.clone(), labels.clone())
    moved = boxes.clone()
    moved[0, :5] += 10.0  # five of twenty boxes moved: more than near-ties explain
    with pytest.raises(RuntimeError, match="no partner"):
        run(moved, scores.clone(), labels.clone())
    with pytest.raises(RuntimeError, match="no partner"):
        run(boxes.clone(), scores.clone(), (labels + 1) % 3)
