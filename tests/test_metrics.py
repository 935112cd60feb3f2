"""Metrics against hand-computable cases, and `evaluate` end to end on a tiny model."""

from __future__ import annotations

import pytest
import torch

import multitask_peft as mtp
from conftest import make_model
from multitask_peft.tasks.evaluate import collate_pairs, evaluate
from multitask_peft.tasks.metrics import ClassificationMetric, DetectionMetric, SegmentationMetric, metric_for

# --- classification ------------------------------------------------------------------------------------------------


def _cls_results(logits: torch.Tensor) -> list[dict]:
    return [{"logits": row, "label": int(row.argmax()), "score": 1.0} for row in logits]


def test_classification_perfect_and_partial() -> None:
    labels = torch.tensor([0, 1, 2, 3])
    metric = ClassificationMetric(num_classes=6)
    metric.update(_cls_results(torch.nn.functional.one_hot(labels, 6).float()), labels)
    assert metric.compute() == {"top1": 1.0, "top5": 1.0}

    # Rows 0-2 rank the label first; row 3 ranks it 2nd (top1 miss, top5 hit): top1 = 3/4.
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5],
            [1.0, 9, 2, 3, 4, 5],
            [1.0, 2, 9, 3, 4, 5],
            [1.0, 2, 3, 8, 4, 9],
        ]
    )
    metric.reset()
    metric.update(_cls_results(logits), [0, 1, 2, 3])
    assert metric.compute() == {"top1": 0.75, "top5": 1.0}

    # Label ranked last of 6: outside the top 5 too.
    metric.reset()
    metric.update(_cls_results(torch.tensor([[9.0, 8, 7, 6, 5, 0]])), [5])
    assert metric.compute() == {"top1": 0.0, "top5": 0.0}


def test_classification_top_k_capped_at_num_classes() -> None:
    metric = ClassificationMetric(num_classes=3)  # top5 with 3 classes: always a hit
    metric.update(_cls_results(torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])), [0, 0])
    assert metric.compute() == {"top1": 0.5, "top5": 1.0}


def test_classification_bad_input() -> None:
    metric = ClassificationMetric(num_classes=3)
    with pytest.raises(ValueError, match="2 results but 1 targets"):
        metric.update(_cls_results(torch.zeros(2, 3)), [0])
    with pytest.raises(ValueError, match=r"expected \(N, 3\)"):
        metric.update(_cls_results(torch.zeros(2, 4)), [0, 1])
    with pytest.raises(ValueError, match="top_k"):
        ClassificationMetric(num_classes=3, top_k=(0,))


# --- detection -----------------------------------------------------------------------------------------------------

BOX_A = [0.0, 0.0, 10.0, 10.0]
BOX_B = [20.0, 20.0, 30.0, 30.0]


def _det(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _gt(boxes: list[list[float]], labels: list[int], crowd: list[bool] | None = None) -> dict[str, torch.Tensor]:
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}
    if crowd is not None:
        target["iscrowd"] = torch.tensor(crowd)
    return target


def _map(results: list[dict], targets: list[dict]) -> dict[str, float]:
    metric = DetectionMetric()
    metric.update(results, targets)
    return metric.compute()


def test_detection_perfect() -> None:
    results = [_det([BOX_A, BOX_B], [0.9, 0.8], [0, 1]), _det([BOX_B], [0.7], [1])]
    targets = [_gt([BOX_A, BOX_B], [0, 1]), _gt([BOX_B], [1])]
    out = _map(results, targets)
    assert out["map"] == pytest.approx(1.0) and out["map50"] == pytest.approx(1.0) and out["map75"] == 1.0
    assert set(out) == {"map", "map50", "map75", "map_small", "map_medium", "map_large", "mar_100"}


# COCO AP: precision made monotone (max precision at any recall >= r), sampled at the 101 recall thresholds
# r = 0.00, 0.01, ..., 1.00 and averaged; thresholds above the highest recall reached contribute 0.
# One of two GT boxes found, no false positive: precision 1.0 up to recall 0.5, so the 51 thresholds
# 0.00 ... 0.50 give 1.0 and the other 50 give 0:  AP = 51 / 101 = 0.50495...
HALF_FOUND_AP = 51 / 101


def test_detection_one_of_two_found() -> None:
    out = _map([_det([BOX_A], [0.9], [0])], [_gt([BOX_A, BOX_B], [0, 0])])
    assert out["map50"] == pytest.approx(HALF_FOUND_AP, abs=1e-6)
    assert out["map"] == pytest.approx(HALF_FOUND_AP, abs=1e-6)  # exact box: a hit at every IoU threshold
    assert out["mar_100"] == pytest.approx(0.5)


def test_detection_false_positive_ranked_first() -> None:
    # A false positive (score 0.9) ranked above the only true positive (0.8) of the only GT box: the ranked list
    # has precision 0/1 then 1/2 at recall 1, so the monotone precision is 0.5 at every threshold: AP = 0.5.
    out = _map([_det([BOX_B, BOX_A], [0.9, 0.8], [0, 0])], [_gt([BOX_A], [0])])
    assert out["map50"] == pytest.approx(0.5, abs=1e-6)


def test_detection_crowd_box_is_ignored() -> None:
    # An unmatched crowd box costs no recall: BOX_A found, crowd BOX_B missed -> AP 1.0; the same box not marked
    # crowd is a missed GT box -> the half-found value.
    only_a = [_det([BOX_A], [0.9], [0])]
    assert _map(only_a, [_gt([BOX_A, BOX_B], [0, 0], crowd=[False, True])])["map50"] == pytest.approx(1.0)
    assert _map(only_a, [_gt([BOX_A, BOX_B], [0, 0], crowd=[False, False])])["map50"] == pytest.approx(
        HALF_FOUND_AP, abs=1e-6
    )
    # A detection on a crowd box is no false positive: ranked first it leaves AP 1.0, whereas without the crowd
    # region it is a false positive ranked above the only true positive (AP 0.5, as above).
    det_on_b = [_det([BOX_B, BOX_A], [0.95, 0.9], [0, 0])]
    assert _map(det_on_b, [_gt([BOX_A, BOX_B], [0, 0], crowd=[False, True])])["map50"] == pytest.approx(1.0)
    assert _map(det_on_b, [_gt([BOX_A], [0])])["map50"] == pytest.approx(0.5, abs=1e-6)


def test_detection_empty_predictions_and_bad_targets() -> None:
    out = _map([_det([], [], [])], [_gt([BOX_A], [0])])
    assert out["map"] == 0.0
    with pytest.raises(ValueError, match="'boxes' and 'labels'"):
        DetectionMetric().update([_det([], [], [])], [{"labels": torch.tensor([0])}])


# --- segmentation --------------------------------------------------------------------------------------------------

TARGET = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
PRED = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1]])
# class 0: intersection 4, union 4 + 1 false positive = 5 -> IoU 0.8
# class 1: intersection 3, union 4 (one pixel missed)     -> IoU 0.75
# mIoU = (0.8 + 0.75) / 2 = 0.775; pixel accuracy = 7 / 8 = 0.875
PARTIAL = {"miou": 0.775, "pixel_acc": 0.875}


def _seg(num_classes: int, preds: list[torch.Tensor], targets: torch.Tensor | list[torch.Tensor]) -> dict:
    metric = SegmentationMetric(num_classes)
    metric.update([{"mask": p} for p in preds], targets)
    return metric.compute()


def test_segmentation_perfect_and_partial() -> None:
    assert _seg(2, [TARGET, TARGET], torch.stack([TARGET, TARGET])) == {"miou": 1.0, "pixel_acc": 1.0}
    assert _seg(2, [PRED], TARGET[None]) == pytest.approx(PARTIAL)


def test_segmentation_ignores_255_and_absent_classes() -> None:
    # Extra column: target 255 with a wrong prediction -> ignored, same values as without it.
    target = torch.cat([TARGET, torch.full((2, 1), 255)], dim=1)  # (2, 5)
    pred = torch.cat([PRED, torch.tensor([[1], [0]])], dim=1)
    assert _seg(2, [pred], [target]) == pytest.approx(PARTIAL)
    # Class 2 occurs neither in the target nor the prediction: left out of the mean.
    assert _seg(3, [pred], [target]) == pytest.approx(PARTIAL)
    # Class 2 predicted on one pixel of class 1 but never in the target: it counts with IoU 0.
    # class 0: 0.8; class 1: intersection 2, union 4 -> 0.5; class 2: 0 -> mIoU = 1.3 / 3; pixel acc = 6 / 8.
    pred2 = pred.clone()
    pred2[1, 3] = 2
    assert _seg(3, [pred2], [target]) == pytest.approx({"miou": 1.3 / 3, "pixel_acc": 0.75})


def test_segmentation_accumulates_over_batches() -> None:
    # The confusion matrix is summed over images: perfect image + partial image = union of both counts.
    # class 0: I 4 + 4 = 8, U 4 + 5 = 9; class 1: I 4 + 3 = 7, U 4 + 4 = 8 -> mIoU = (8/9 + 7/8) / 2.
    metric = SegmentationMetric(2)
    metric.update([{"mask": TARGET}], [TARGET])
    metric.update([{"mask": PRED}], [TARGET])
    assert metric.compute() == pytest.approx({"miou": (8 / 9 + 7 / 8) / 2, "pixel_acc": 15 / 16})


def test_segmentation_bad_input() -> None:
    with pytest.raises(ValueError, match="same"):
        _seg(2, [PRED[:, :3]], [TARGET])
    with pytest.raises(ValueError, match="target class 7"):
        _seg(2, [PRED], [TARGET + 6 * (TARGET == 1)])
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationMetric(300, ignore_index=255)


# --- metric_for / evaluate -----------------------------------------------------------------------------------------


def test_metric_for_picks_by_output_kind() -> None:
    assert isinstance(metric_for(mtp.tasks.Classification(num_classes=4)), ClassificationMetric)
    # a head wrapping another library's module is measured by the form of its results, not its type name
    assert isinstance(metric_for(mtp.tasks.MMSegHead(head=dict(type="FCNHead", num_classes=3))), SegmentationMetric)
    assert isinstance(metric_for(mtp.tasks.MMDetHead(head=dict(type="RetinaHead", num_classes=3))), DetectionMetric)

    class Odd(mtp.tasks.HeadConfig):
        output_kind = "odd"

    with pytest.raises(ValueError, match="no metric for 'odd' results"):
        metric_for(Odd())
    with pytest.raises(ValueError, match="no metric for 'embedding' results"):
        metric_for(mtp.tasks.Embedding())


def test_collate_pairs() -> None:
    images, labels = collate_pairs([(torch.zeros(3, 4, 4), 1), (torch.zeros(3, 4, 4), torch.tensor(2))])
    assert images.shape == (2, 3, 4, 4) and labels.tolist() == [1, 2] and labels.dtype == torch.int64
    _, masks = collate_pairs([(torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.int64))] * 2)
    assert masks.shape == (2, 4, 4)
    _, dicts = collate_pairs([(torch.zeros(3, 4, 4), {"boxes": torch.zeros(0, 4)})] * 2)
    assert isinstance(dicts, list) and len(dicts) == 2
    with pytest.raises(ValueError, match="pairs"):
        collate_pairs([torch.zeros(3, 4, 4)])


def test_evaluate_end_to_end() -> None:
    model, size = make_model("vit")
    model.add_task("cls", head=mtp.tasks.Classification(num_classes=7))
    g = torch.Generator().manual_seed(0)
    dataset = [(torch.randn(3, size, size, generator=g), i % 7) for i in range(10)]
    model.train()
    out = evaluate(model, "cls", dataset, batch_size=4, progress=False)
    assert model.training  # mode left as it was
    assert set(out) == {"top1", "top5", "num_images"} and out["num_images"] == 10
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for k, v in out.items() if k != "num_images")

    # Same numbers as the metric on one predict call over the whole set (batching changes nothing).
    metric = ClassificationMetric(7)
    images, labels = collate_pairs(dataset)
    metric.update(model.predict(images, ["cls"])["cls"], labels)
    assert out == pytest.approx({**metric.compute(), "num_images": 10})

    with pytest.raises(ValueError, match="unknown task"):
        evaluate(model, "nope", dataset, progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, "cls", [], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, "cls", dataset, batch_size=0, progress=False)
