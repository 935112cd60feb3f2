"""Detection head: shapes on both backbone kinds, FCOS parity with torchvision, losses, post-processing, overfitting."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FCOS
from torchvision.ops import box_iou

import multitask_peft as mtp
from conftest import make_model, randomize
from multitask_peft.heads import HEADS, FeatureInfo
from multitask_peft.outputs import decode_outputs
from multitask_peft.tasks.classification import Classification
from multitask_peft.tasks.detection import Detection, anchor_points, match_anchors


def _boxes_model(kind: str, **config: object) -> tuple[mtp.MultiTaskModel, nn.Module]:
    model, _ = make_model(kind)
    peft = [mtp.peft.LoRA(r=4)]
    model.add_task("boxes", head=Detection(num_classes=3, channels=32, **config), peft=peft)
    randomize(model.task("boxes"))
    return model, model.task("boxes").head


def _torchvision_fcos(head: nn.Module) -> FCOS:
    """torchvision's FCOS around our towers (its backbone and image transform are never run)."""
    backbone = nn.Identity()
    backbone.out_channels = head.config.channels
    cfg = head.config
    return FCOS(
        backbone,
        cfg.num_classes,
        head=head.towers,
        center_sampling_radius=cfg.center_sampling_radius,
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img,
        topk_candidates=cfg.topk_candidates,
    )


TARGETS = [
    {
        "boxes": torch.tensor([[10.0, 12.0, 50.0, 40.0], [60.0, 64.0, 120.0, 126.0], [0.0, 0.0, 70.0, 70.0]]),
        "labels": torch.tensor([0, 2, 1]),
        "iscrowd": torch.tensor([False, False, True]),
    },
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no boxes
]


@pytest.mark.parametrize("size", [128, 96])
def test_output_shapes(kind: str, size: int) -> None:
    model, head = _boxes_model(kind)
    images = torch.randn(2, 3, size, size)
    rows, out = model(images, [model.slot("boxes")] * 2)["boxes"]
    cells = [-(-size // s) for s in (8, 16, 32)]  # ceil: both necks cover the whole image
    num_anchors = sum(c * c for c in cells)
    assert out["num_anchors_per_level"] == [c * c for c in cells]
    assert out["cls_logits"].shape == (2, num_anchors, 3)
    assert out["bbox_regression"].shape == (2, num_anchors, 4)
    assert out["bbox_ctrness"].shape == (2, num_anchors, 1)
    assert out["anchors"].shape == (num_anchors, 4)
    # first anchor of each level: a stride-sized box centred on the first cell
    starts = torch.tensor([0, cells[0] ** 2, cells[0] ** 2 + cells[1] ** 2])
    expected = torch.tensor([[0.0, 0.0, s, s] for s in (8.0, 16.0, 32.0)])
    torch.testing.assert_close(out["anchors"][starts], expected)
    assert torch.isfinite(head.loss(out, TARGETS))


def test_loss_matches_torchvision_fcos_and_ignores_crowd() -> None:
    model, head = _boxes_model("vit")
    images = torch.randn(2, 3, 128, 128)
    _, out = model(images, [model.slot("boxes")] * 2)["boxes"]
    losses = head.losses(out, TARGETS)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    # torchvision's matching + loss on the same outputs and anchors, crowd box removed by hand
    no_crowd = [{"boxes": t["boxes"][:2], "labels": t["labels"][:2]} for t in TARGETS[:1]] + TARGETS[1:]
    head_outputs = {k: out[k] for k in ("cls_logits", "bbox_regression", "bbox_ctrness")}
    reference = _torchvision_fcos(head).compute_loss(
        no_crowd, head_outputs, [out["anchors"]] * 2, out["num_anchors_per_level"]
    )
    for name, value in reference.items():
        torch.testing.assert_close(losses[name], value)
    # the crowd box changes nothing; counting it as a normal box would
    assert torch.equal(head.loss(out, TARGETS), head.loss(out, no_crowd))
    as_normal = [{"boxes": TARGETS[0]["boxes"], "labels": TARGETS[0]["labels"]}, TARGETS[1]]
    assert not torch.equal(head.loss(out, TARGETS), head.loss(out, as_normal))
    # gradients reach the neck and the towers, also for a batch whose only image has no boxes
    _, single = model(images[1:], [model.slot("boxes")])["boxes"]
    loss = head.loss(single, TARGETS[1:])
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in head.towers.classification_head.parameters())


def test_matching_scale_ranges() -> None:
    grids, strides = [(64, 64), (32, 32), (16, 16)], (8, 16, 32)  # a 512 px image
    anchors = anchor_points(grids, strides)
    sizes = [h * w for h, w in grids]
    level = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    # largest distance from a sampled point to the edges: < 64, 64..128, > 128 px, > 256 px (no upper bound)
    boxes = torch.tensor([[100.0, 100, 140, 130], [60, 60, 200, 200], [4, 4, 252, 252], [0, 0, 512, 512]])
    matched = match_anchors(anchors, boxes, sizes, 1.5)
    for k, expected in enumerate([0, 1, 2, 2]):
        assert set(level[matched == k].tolist()) == {expected}
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    inside = (centers >= boxes[0, :2]).all(dim=1) & (centers <= boxes[0, 2:]).all(dim=1)
    assert (matched[matched == 0] >= 0).all() and inside[matched == 0].all()
    assert match_anchors(anchors, boxes[:0], sizes, 1.5).eq(-1).all()


def test_detections_respect_thresholds_and_match_torchvision() -> None:
    """The tensor form (`export_outputs`) decoded by the detection output kind: torchvision FCOS's detections."""
    model, head = _boxes_model("vit", score_thresh=0.3, detections_per_img=7, nms_thresh=0.5)
    _, out = model(torch.randn(3, 3, 128, 128), [model.slot("boxes")] * 3)["boxes"]
    g = torch.Generator().manual_seed(0)  # spread the scores so the threshold matters
    out["cls_logits"] = torch.randn(out["cls_logits"].shape, generator=g) * 3
    out["bbox_ctrness"] = torch.randn(out["bbox_ctrness"].shape, generator=g) * 3
    out["bbox_regression"] = torch.rand(out["bbox_regression"].shape, generator=g) * 4
    image_size = (112, 128)  # (H, W): clipping must use each side
    tensors = head.export_outputs(out, image_size)
    assert tensors["boxes"].shape == (3, 7, 4) and tensors["labels"].shape == (3, 7)
    assert (tensors["labels"] >= 0).sum(1).tolist() == tensors["num_detections"].tolist()
    results = decode_outputs(head.config, head, out, image_size)
    assert len(results) == 3
    for res in results:
        assert set(res) == {"boxes", "scores", "labels"}
        assert res["boxes"].dtype == res["scores"].dtype == torch.float32 and res["labels"].dtype == torch.int64
        assert 0 < len(res["scores"]) <= 7 and (res["scores"] > 0.3).all()
        assert (res["scores"][:-1] >= res["scores"][1:]).all()
        assert (res["boxes"] >= 0).all() and (res["boxes"][:, [0, 2]] <= 128).all()
        assert (res["boxes"][:, [1, 3]] <= 112).all() and res["labels"].lt(3).all()
        for c in res["labels"].unique():  # NMS within a class
            same = res["boxes"][res["labels"] == c]
            assert (box_iou(same, same).triu(1) <= 0.5).all()
    sizes = out["num_anchors_per_level"]
    split = {k: list(out[k].split(sizes, dim=1)) for k in ("cls_logits", "bbox_regression", "bbox_ctrness")}
    anchors = [list(out["anchors"].split(sizes))] * 3
    reference = _torchvision_fcos(head).postprocess_detections(split, anchors, [image_size] * 3)
    for res, ref in zip(results, reference):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(res[key], ref[key])
    head.config.score_thresh = 0.999
    empty = decode_outputs(head.config, head, out, image_size)[0]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == torch.int64


def test_mixed_batch_equals_detection_rows_alone() -> None:
    model, _ = make_model("vit")
    model.add_task("boxes", head=Detection(num_classes=3, channels=32), peft=[mtp.peft.LoRA(r=4)])
    model.add_task("cls", head=Classification(num_classes=4), peft=[mtp.peft.AdaptFormer(dim=4)])
    randomize(model.task("boxes"), seed=1)
    randomize(model.task("cls"), seed=2)
    images = torch.randn(5, 3, 64, 64)
    b, c = model.slot("boxes"), model.slot("cls")
    mixed = model(images, [c, b, -1, b, c])
    rows, out = mixed["boxes"]
    assert rows.tolist() == [1, 3] and mixed["cls"][0].tolist() == [0, 4]
    _, alone = model(images[[1, 3]], [b, b])["boxes"]
    assert out["num_anchors_per_level"] == alone["num_anchors_per_level"]
    for key in ("cls_logits", "bbox_regression", "bbox_ctrness", "anchors"):
        torch.testing.assert_close(out[key], alone[key], atol=1e-5, rtol=1e-4)
    # and predict (shared prefix) gives the same detections as the routed rows
    predicted = model.predict(images[[1, 3]], ["cls", "boxes"])["boxes"]
    head = model.task("boxes").head
    for res, ref in zip(predicted, decode_outputs("detection", head, alone, (64, 64))):
        torch.testing.assert_close(res["scores"], ref["scores"], atol=1e-5, rtol=1e-4)


def test_save_and_load_round_trip(tmp_path: object) -> None:
    model, _ = _boxes_model("cnn", class_names=("a", "b", "c"))
    images = torch.randn(1, 3, 64, 64)
    before = model(images, [model.slot("boxes")])["boxes"][1]
    model.save_task("boxes", tmp_path)
    model.remove_task("boxes")
    task = model.load_task(tmp_path)
    assert task.head_config == Detection(num_classes=3, channels=32, class_names=("a", "b", "c"))
    after = model(images, [model.slot("boxes")])["boxes"][1]
    assert torch.equal(before["cls_logits"], after["cls_logits"]) and torch.equal(before["anchors"], after["anchors"])


def test_config_validation() -> None:
    assert HEADS.get("detection") is Detection
    cfg = Detection(num_classes=2, strides=[8, 16])
    assert cfg.strides == (8, 16) and Detection.from_dict(cfg.to_dict()) == cfg
    bad = [
        {"num_classes": 0},
        {"channels": -4},
        {"strides": (16, 8)},
        {"strides": ()},
        {"num_convs": -1},
        {"score_thresh": 1.5},
        {"nms_thresh": 0.0},
        {"topk_candidates": 0},
        {"detections_per_img": 2.5},
        {"center_sampling_radius": 0},
        {"class_names": ("a",)},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError, match="Detection"):
            Detection(**{"num_classes": 2, **kwargs})
    with pytest.raises(ValueError, match="stride 12"):
        Detection(strides=(12,)).build(FeatureInfo(levels=((64, 16),), pooled_dim=64, kind="vit"))
    model, head = _boxes_model("vit")
    _, out = model(torch.randn(1, 3, 64, 64), [model.slot("boxes")])["boxes"]
    for targets, match in [
        ([], "list of 1"),
        ([{"boxes": torch.zeros(1, 4)}], "'labels'"),
        ([{"boxes": torch.zeros(1, 5), "labels": torch.zeros(1, dtype=torch.int64)}], r"\(K, 4\)"),
        ([{"boxes": torch.tensor([[0.0, 0, 4, 4]]), "labels": torch.tensor([3])}], r"\[0, 3\)"),
        ([{"boxes": torch.tensor([[5.0, 0, 4, 4]]), "labels": torch.tensor([0])}], "x2 >= x1"),
    ]:
        with pytest.raises(ValueError, match=match):
            head.loss(out, targets)


def _scenes(n: int = 4, size: int = 128, seed: int = 0) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Noise with 2-3 non-overlapping bright rectangles each: red = class 0, green = class 1 (normalised)."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1]])
    images, targets = [], []
    for _ in range(n):
        image = torch.rand(3, size, size, generator=g) * 0.4
        boxes: list[torch.Tensor] = []
        count = int(torch.randint(2, 4, (1,), generator=g))
        while len(boxes) < count:
            w, h = torch.randint(16, 48, (2,), generator=g).tolist()
            x0, y0 = (
                int(torch.randint(0, size - w, (1,), generator=g)),
                int(torch.randint(0, size - h, (1,), generator=g)),
            )
            box = torch.tensor([[x0, y0, x0 + w, y0 + h]], dtype=torch.float32)
            if boxes and box_iou(box, torch.cat(boxes)).max() > 0:
                continue
            image[:, y0 : y0 + h, x0 : x0 + w] = colours[len(boxes) % 2][:, None, None]
            boxes.append(box)
        images.append((image - 0.5) / 0.5)
        targets.append({"boxes": torch.cat(boxes), "labels": torch.arange(count) % 2})
    return torch.stack(images), targets


def test_initial_boxes_are_not_degenerate() -> None:
    """Regression starts at 1 stride per side, so GIoU has a gradient at the first step (see FCOSTowers)."""
    model, _ = make_model("vit")
    model.add_task("boxes", head=Detection(num_classes=2))
    _, out = model(torch.randn(2, 3, 64, 64), [model.slot("boxes")] * 2)["boxes"]
    assert (out["bbox_regression"] > 0.5).all()


def test_overfits_four_scenes() -> None:
    """The issue's check: a head trained for a few dozen steps on 4 scenes reaches mAP50 > 0.5 on them."""
    images, targets = _scenes()
    model, _ = make_model("vit")
    model.add_task("boxes", head=Detection(num_classes=2), peft=[mtp.peft.LoRA(r=4)])
    head = model.task("boxes").head
    metric = MeanAveragePrecision(iou_type="bbox", iou_thresholds=[0.5], backend="pycocotools")
    metric.update(model.predict(images, "boxes")["boxes"], targets)
    assert metric.compute()["map"] < 0.1  # untrained
    optimizer = torch.optim.AdamW(model.trainable_parameters("boxes"), lr=3e-3)
    model.train()
    slots = [model.slot("boxes")] * len(images)
    for _ in range(30):
        loss = head.loss(model(images, slots)["boxes"][1], targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    metric.reset()
    metric.update(model.predict(images, "boxes")["boxes"], targets)
    assert metric.compute()["map"] > 0.5
