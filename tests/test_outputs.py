"""Output kinds: every registered kind's tensor spec against what our heads return, decode round trips, the JSON
forms (options, class names, rescaling), metrics by kind, and the layering the kinds rely on."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
import torch

import multitask_peft as mtp
from conftest import make_model, randomize
from multitask_peft.outputs import (
    OIP_DATATYPES,
    OUTPUT_KINDS,
    JsonContext,
    ResultOptions,
    TensorSpec,
    decode_outputs,
    output_kind,
)
from multitask_peft.tasks.detection_output import pad_detections
from multitask_peft.tasks.segmentation_output import decode_mask_png

ROOT = Path(__file__).resolve().parents[1]

# One head of ours per output kind (small widths); a newly registered kind must add one (see the first test).
HEADS = {
    "classification": mtp.tasks.Classification(num_classes=4),
    "detection": mtp.tasks.Detection(num_classes=3, channels=16, detections_per_img=20),
    "segmentation": mtp.tasks.Segmentation(num_classes=3, channels=16),
    "embedding": mtp.tasks.Embedding(),
}
RESULT_KEYS = {
    "classification": {"logits", "label", "score"},
    "detection": {"boxes", "scores", "labels"},
    "segmentation": {"mask"},
    "embedding": {"embedding"},
}


def test_every_registered_kind_has_an_example_head() -> None:
    assert set(OUTPUT_KINDS.names()) == set(HEADS) == set(RESULT_KEYS)
    for name, config in HEADS.items():
        assert output_kind(config) is OUTPUT_KINDS.get(name) and output_kind(name).name == name


@pytest.fixture(scope="module", params=["vit", "cnn"])
def tensor_forms(request: pytest.FixtureRequest) -> tuple[mtp.MultiTaskModel, torch.Tensor, dict[str, Any]]:
    """A model with one task per output kind, 3 images, and per task {"raw": head outputs, "tensors": the tensor
    form} from the routed forward."""
    model, size = make_model(request.param)
    for name, config in HEADS.items():
        model.add_task(name, head=config, peft=[mtp.peft.SSF()])
        randomize(model.task(name), seed=len(name))
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    forms = {}
    with torch.no_grad():
        for name in HEADS:
            _, raw = model(images, [model.slot(name)] * 3)[name]
            forms[name] = {"raw": raw, "tensors": model.task(name).head.export_outputs(raw, (size, size))}
    return model, images, forms


@pytest.mark.parametrize("name", sorted(HEADS))
def test_spec_matches_export_outputs(tensor_forms: tuple, name: str) -> None:
    model, images, forms = tensor_forms
    size = (images.shape[-2], images.shape[-1])
    tensors = forms[name]["tensors"]
    spec = output_kind(name).tensor_spec(model.task(name).head_config, size)
    assert [s.name for s in spec] == list(tensors)  # names, in the order an exported graph returns them
    for field in spec:
        tensor = tensors[field.name]
        assert field.matches(tensor), f"{name}.{field.name}: {tensor.dtype} {tuple(tensor.shape)} vs {field}"
        assert tensor.shape[0] == 3 and field.shape[0] == -1  # batch first, dynamic
        assert field.datatype in OIP_DATATYPES.values()


@pytest.mark.parametrize("name", sorted(HEADS))
def test_decode_round_trips(tensor_forms: tuple, name: str) -> None:
    """decode gives one result per image with the kind's keys; putting the results back gives the tensor form."""
    _, _, forms = tensor_forms
    tensors = forms[name]["tensors"]
    results = output_kind(name).decode(tensors)
    assert len(results) == 3 and all(set(r) == RESULT_KEYS[name] for r in results)
    if name == "detection":
        num_slots = tensors["scores"].shape[1]
        assert num_slots == 20 and tensors["num_detections"].gt(0).all()
        again = pad_detections(results, num_slots)
        for field, tensor in tensors.items():
            assert torch.equal(again[field], tensor), field
        for r in results:
            assert r["boxes"].shape == (len(r["scores"]), 4) and r["labels"].dtype == torch.int64
            assert (r["scores"][:-1] >= r["scores"][1:]).all()  # best first
    else:
        (field,) = tensors
        assert torch.equal(torch.stack([r[field] for r in results]), tensors[field])
    if name == "classification":
        probs = tensors["logits"].softmax(-1)
        assert [r["label"] for r in results] == probs.argmax(-1).tolist()
        assert [r["score"] for r in results] == pytest.approx(probs.max(-1).values.tolist())
        assert all(isinstance(r["label"], int) and isinstance(r["score"], float) for r in results)


def test_predict_decodes_the_tensor_form(tensor_forms: tuple) -> None:
    """`predict` and `predict_each` (shared prefix) give what the kinds decode from the routed forward."""
    model, images, forms = tensor_forms
    size = (images.shape[-2], images.shape[-1])
    predicted = model.predict(images, list(HEADS))
    each = model.predict_each(images, [list(HEADS)] * 3)
    for name in HEADS:
        expected = decode_outputs(model.task(name).head_config, model.task(name).head, forms[name]["raw"], size)
        for i, ref in enumerate(expected):
            for got in (predicted[name][i], each[i][name]):
                assert set(got) == set(ref)
                for key, value in ref.items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        torch.testing.assert_close(got[key], value, atol=1e-4, rtol=1e-4)
                    elif isinstance(value, torch.Tensor):
                        assert torch.equal(got[key], value), (name, key)
                    else:
                        assert got[key] == pytest.approx(value, abs=1e-5), (name, key)


# --- JSON forms ----------------------------------------------------------------------------------------------------


def _to_json(kind: str, result: dict[str, Any], original: tuple[int, int] = (32, 64), **options: Any) -> dict:
    names = options.pop("class_names", None)
    return output_kind(kind).to_json(result, JsonContext((32, 64), original, ResultOptions(**options), names))


def test_classification_json() -> None:
    result = {"logits": torch.tensor([0.5, 2.0, -1.0]), "label": 1, "score": 0.75}
    assert _to_json("classification", result) == {"label": 1, "score": 0.75}
    assert _to_json("classification", result, class_names=("a", "b", "c"), logits=True) == {
        "label": 1,
        "score": 0.75,
        "class_name": "b",
        "logits": [0.5, 2.0, -1.0],
    }


def test_detection_json_rescales_and_filters() -> None:
    result = {
        "boxes": torch.tensor([[0.0, 0.0, 10.0, 20.0], [4.0, 2.0, 6.0, 3.0], [1.0, 1.0, 3.0, 3.0]]),
        "scores": torch.tensor([0.9, 0.5, 0.25]),
        "labels": torch.tensor([2, 0, 1]),
    }
    # model input (32, 64) (H, W), sent image (64, 32): y scales by 2, x by 0.5
    assert _to_json("detection", result, original=(64, 32)) == {
        "boxes": [[0.0, 0.0, 5.0, 40.0], [2.0, 4.0, 3.0, 6.0], [0.5, 2.0, 1.5, 6.0]],
        "scores": [pytest.approx(0.9), 0.5, 0.25],
        "labels": [2, 0, 1],
    }
    out = _to_json("detection", result, original=(32, 64), score_threshold=0.3, class_names=("a", "b", "c"))
    assert out["labels"] == [2, 0] and out["class_names"] == ["c", "a"] and out["boxes"][1] == [4.0, 2.0, 6.0, 3.0]
    out = _to_json("detection", result, max_detections=1)
    assert out["labels"] == [2] and len(out["boxes"]) == len(out["scores"]) == 1
    assert _to_json("detection", {k: v[:0] for k, v in result.items()}) == {"boxes": [], "scores": [], "labels": []}


def test_segmentation_json_resizes_the_mask() -> None:
    mask = torch.zeros(32, 64, dtype=torch.int64)
    mask[:, 32:] = 2
    out = _to_json("segmentation", {"mask": mask}, original=(16, 8), class_names=("bg", "x", "y"))
    assert out["size"] == [16, 8] and out["class_names"] == ["bg", "x", "y"]
    sent = decode_mask_png(out["mask_png"])
    assert sent.shape == (16, 8) and (sent[:, 4:] == 2).all() and (sent[:, :4] == 0).all()
    listed = _to_json("segmentation", {"mask": mask}, original=(32, 64), mask_format="list")
    assert set(listed) == {"size", "mask"} and listed["mask"] == mask.tolist()
    big = torch.full((32, 64), 300, dtype=torch.int64)  # class ids >= 256: a 16-bit PNG
    assert (decode_mask_png(_to_json("segmentation", {"mask": big})["mask_png"]) == 300).all()


def test_embedding_json() -> None:
    assert _to_json("embedding", {"embedding": torch.tensor([0.5, -0.25])}) == {"embedding": [0.5, -0.25]}


def test_serving_to_json_is_the_kind_json() -> None:
    pytest.importorskip("fastapi")
    from multitask_peft.serving.images import PredictOptions, to_json

    options = PredictOptions.parse({"score_threshold": "0.3", "logits": "true", "timeout_s": 5})
    assert isinstance(options, ResultOptions) and options.timeout_s == 5.0 and options.logits
    result = {"logits": torch.tensor([0.5, 2.0]), "label": 1, "score": 0.8}
    assert to_json("classification", result, (32, 64), (8, 8), options, ["a", "b"]) == _to_json(
        "classification", result, logits=True, class_names=["a", "b"]
    )
    with pytest.raises(ValueError, match="Unknown output kind 'nope'"):
        to_json("nope", result, (32, 64), (8, 8), options)


# --- specs, options, metrics -----------------------------------------------------------------------------------------


def test_tensor_spec_and_options() -> None:
    spec = TensorSpec("boxes", torch.float32, (-1, -1, 4))
    assert spec.datatype == "FP32" and spec.to_oip() == {"name": "boxes", "datatype": "FP32", "shape": [-1, -1, 4]}
    assert spec.matches(torch.zeros(2, 7, 4)) and not spec.matches(torch.zeros(2, 7, 5))
    assert not spec.matches(torch.zeros(2, 7, 4, dtype=torch.float16)) and not spec.matches(torch.zeros(2, 4))
    assert TensorSpec("labels", torch.int64, (-1,)).datatype == "INT64"
    for bad in ({"mask_format": "jpeg"}, {"score_threshold": 1.5}, {"max_detections": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ResultOptions(**bad)


def test_primary_metric_of_each_kind() -> None:
    """Kinds with a metric build it from the head config and report their primary key; embedding has none."""
    box = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    results = {
        "classification": [{"logits": torch.tensor([0.1, 2.0, 0.3, 0.0]), "label": 1, "score": 0.6}],
        "detection": [{"boxes": box, "scores": torch.ones(1), "labels": torch.ones(1)}],
        "segmentation": [{"mask": torch.ones(4, 4, dtype=torch.int64)}],
    }
    targets = {
        "classification": torch.tensor([1]),
        "detection": [{"boxes": box, "labels": torch.tensor([1])}],
        "segmentation": torch.ones(1, 4, 4, dtype=torch.int64),
    }
    for name, config in HEADS.items():
        kind = output_kind(name)
        if name not in results:
            assert kind.primary_metric is None
            with pytest.raises(ValueError, match="no metric"):
                mtp.tasks.metric_for(config)
            continue
        metric = mtp.tasks.metric_for(config)
        assert isinstance(metric, mtp.tasks.TaskMetric) and type(kind.metric(config)) is type(metric)
        metric.update(results[name], targets[name])
        assert metric.compute()[kind.primary_metric] == pytest.approx(1.0)


def test_heads_bring_their_onnx_translations() -> None:
    """Only heads with custom ops bring translations; the ONNX exporter reads their onnxscript annotations."""
    pytest.importorskip("onnxscript")
    info = mtp.FeatureInfo(levels=((16, 16),), pooled_dim=16, kind="vit")
    assert HEADS["classification"].build(info).onnx_translations() == {}
    table = HEADS["detection"].build(info).onnx_translations()
    assert list(table) == [torch.ops.multitask_peft.nms_keep.default]
    (translation,) = table.values()
    hints = typing.get_type_hints(translation)  # fails if the module postpones annotations
    assert {"boxes", "scores", "labels", "return"} <= set(hints)
