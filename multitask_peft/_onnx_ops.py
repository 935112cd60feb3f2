"""onnxscript translations of our custom ops for the ONNX exporter (`export._onnx_translations`).

No `from __future__ import annotations` here: the exporter reads the onnxscript type annotations at run time.
"""

import numpy as np
import onnx_ir as ir
from onnxscript import BOOL, FLOAT, INT64
from onnxscript import opset18 as op


def nms_keep(boxes: FLOAT, scores: FLOAT, labels: INT64, iou: float, min_score: float, num_classes: int) -> BOOL:
    """`multitask_peft::nms_keep` (tasks/detection.py) as one batched NonMaxSuppression: (N, k) kept mask."""
    # per-class score planes (N, C, k): a candidate scores in its own class only (0 elsewhere, under min_score)
    onehot = op.OneHot(labels, op.Constant(value_int=num_classes), op.Constant(value_floats=[0.0, 1.0]))
    planes = op.Transpose(op.Mul(onehot, op.Unsqueeze(scores, [-1])), perm=[0, 2, 1])
    k = op.Shape(scores, start=1, end=2)
    selected = op.NonMaxSuppression(
        boxes, planes, k, op.Constant(value_float=iou), op.Constant(value_float=min_score)
    )  # (S, 3): image, class, candidate
    pairs = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)
    keep = op.ConstantOfShape(op.Shape(scores), value=ir.tensor(np.array([False])))
    ones = op.Expand(op.Constant(value=ir.tensor(np.array([True]))), op.Shape(pairs, start=0, end=1))
    return op.ScatterND(keep, pairs, ones)
