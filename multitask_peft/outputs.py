"""Output kinds: what a head's results look like, in every form they take.

A head produces only its *tensor form* (`Head.export_outputs(raw, image_size)`: batched, fixed-shape,
traceable; what an ONNX graph returns and what a protocol endpoint would send). Everything after that belongs
to the head's output kind (`HeadConfig.output_kind`), found by name in `OUTPUT_KINDS`:

- `tensor_spec(head_config, image_size)`: the tensor form's fields (names, dtypes, shapes, -1 where dynamic);
- `decode(tensors)`: the tensor form -> one result dict per image (what `MultiTaskModel.predict`, `OnnxRunner`
  and the serving backends return);
- `to_json(result, context)`: one result as the JSON the server sends, in the pixels of the image the client
  sent;
- `metric(head_config)` and `primary_metric`: how results are measured.

The concrete kinds (classification, detection, segmentation, embedding) live in `multitask_peft.tasks`, which
registers them on import; the model core only knows this interface.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch

from .heads import Head, HeadConfig
from .registry import Registry

Result = dict[str, Any]

#: Open Inference Protocol v2 tensor datatypes of the torch dtypes a tensor form may hold.
OIP_DATATYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "UINT8",
    torch.int8: "INT8",
    torch.int16: "INT16",
    torch.int32: "INT32",
    torch.int64: "INT64",
    torch.float16: "FP16",
    torch.bfloat16: "BF16",
    torch.float32: "FP32",
    torch.float64: "FP64",
}

#: How a segmentation mask may be sent as JSON: base64 PNG of class ids, or nested lists.
MASK_FORMATS = ("png", "list")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One field of a tensor form.

    Attributes:
        name: Field name (an exported graph names the output `<task>.<name>`).
        dtype: torch dtype of the field.
        shape: Dimensions, batch first; -1 where the size is dynamic (the batch, a number of detections, ...).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def datatype(self) -> str:
        """The Open Inference Protocol v2 datatype ("FP32", "INT64", ...)."""
        return OIP_DATATYPES[self.dtype]

    def matches(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` has this dtype, rank and every fixed dimension."""
        return (
            tensor.dtype == self.dtype
            and tensor.ndim == len(self.shape)
            and all(want in (-1, got) for want, got in zip(self.shape, tensor.shape))
        )

    def to_oip(self) -> dict[str, Any]:
        """The tensor's metadata as an OIP v2 endpoint describes it: {"name", "datatype", "shape"}."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclasses.dataclass(frozen=True)
class ResultOptions:
    """How results are formatted as JSON (serving's per-request options extend this).

    Attributes:
        score_threshold: Detections scoring below it are dropped (on top of the head's own threshold).
        max_detections: At most this many detections per image (the best ones); None: all.
        mask_format: Segmentation masks as "png" (base64 PNG of class ids) or "list" (nested lists).
        logits: Include classification logits.
    """

    score_threshold: float = 0.0
    max_detections: int | None = None
    mask_format: str = "png"
    logits: bool = False

    def __post_init__(self) -> None:
        if self.mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {self.mask_format!r}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold!r}")
        if self.max_detections is not None and self.max_detections < 0:
            raise ValueError(f"max_detections must be None or >= 0, got {self.max_detections!r}")


@dataclasses.dataclass(frozen=True)
class JsonContext:
    """What the JSON form of one task's result for one image depends on, besides the result.

    Attributes:
        input_size: (H, W) the model saw.
        original: (H, W) of the image the client sent: boxes and masks are sent in its pixels.
        options: Formatting options.
        class_names: The task's class names, if it has them.
    """

    input_size: tuple[int, int]
    original: tuple[int, int]
    options: ResultOptions = ResultOptions()
    class_names: Sequence[str] | None = None


class TaskMetric:
    """Accumulates one task's metric over batches: `update(results, targets)` per batch, then `compute()`."""

    def update(self, results: Sequence[Mapping[str, Any]], targets: Any) -> None:
        """Add one batch: `results` as returned by `model.predict(...)[task]`, `targets` as the task's convention."""
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """The metric values over every batch seen since the last `reset`, as plain floats."""
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class OutputKind:
    """The forms of one kind of result. Subclasses are stateless; `register_output_kind` registers an instance.

    Attributes:
        name: The kind's name (`HeadConfig.output_kind` of the heads that produce it).
        primary_metric: Key of the metric value that sums a task up (e.g. "top1"); None: the kind has no metric.
    """

    name: ClassVar[str] = ""
    primary_metric: ClassVar[str | None] = None

    def tensor_spec(self, head_config: HeadConfig, image_size: tuple[int, int]) -> tuple[TensorSpec, ...]:
        """The fields of the tensor form, in the order `export_outputs` returns them."""
        raise NotImplementedError

    def decode(self, tensors: Mapping[str, torch.Tensor]) -> list[Result]:
        """The tensor form of a batch -> one result dict per image."""
        raise NotImplementedError

    def to_json(self, result: Mapping[str, Any], context: JsonContext) -> dict[str, Any]:
        """One image's result (a result dict of `decode`) as JSON values, in the pixels of the image the client
        sent (`context.original`)."""
        raise NotImplementedError

    def oip_fields(self, num_classes: int | None) -> tuple[TensorSpec, ...]:
        """The tensors an Open Inference Protocol endpoint answers for a batch of images (`to_oip`), batch first,
        -1 where the size is dynamic; `num_classes` of the task if known (else -1 where it sets a size)."""
        raise NotImplementedError(f"{self.name!r} results have no Open Inference Protocol form")

    def to_oip(self, results: Sequence[Mapping[str, Any]], contexts: Sequence[JsonContext]) -> dict[str, torch.Tensor]:
        """A batch of results (one per image, each with its `JsonContext`) as the `oip_fields` tensors, in the
        pixels of the images the client sent (boxes scaled, masks resized nearest), with the JSON form's options
        applied (score threshold, max detections). Raises a ValueError if the images cannot form one tensor."""
        raise NotImplementedError(f"{self.name!r} results have no Open Inference Protocol form")

    def from_class_logits(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensor form from per-class scores (`Head.class_logits`, class dimension 1): how an ensemble's
        combined class logits become results. Kinds without one cannot be ensembled."""
        raise NotImplementedError(f"{self.name!r} results cannot be built from class logits (no ensembles)")

    def metric(self, head_config: HeadConfig) -> TaskMetric:
        """A fresh metric for a task with this head config (kinds with a `primary_metric` have one)."""
        raise ValueError(f"{self.name!r} results have no metric (head config {type(head_config).__name__})")


OUTPUT_KINDS: Registry[OutputKind] = Registry("output kind")

K = TypeVar("K", bound=type[OutputKind])


def register_output_kind(name: str) -> Callable[[K], K]:
    """Class decorator: register an instance of an `OutputKind` subclass under `name`."""

    def decorator(cls: K) -> K:
        cls.name = name
        OUTPUT_KINDS.register(name)(cls())
        return cls

    return decorator


def output_kind(kind: HeadConfig | str) -> OutputKind:
    """The output kind of a head config (its `output_kind`) or of a kind name; unknown names raise a ValueError."""
    return OUTPUT_KINDS.get(kind if isinstance(kind, str) else kind.output_kind)


def decode_outputs(kind: HeadConfig | str, head: Head, raw: Any, image_size: tuple[int, int]) -> list[Result]:
    """Per-image result dicts of a head's raw outputs: `decode(head.tensor_outputs(raw, image_size))`.

    Args:
        kind: The task's head config (or its output kind's name).
        head: The head that made `raw`.
        raw: Its forward outputs for a batch.
        image_size: (H, W) of the input images.
    """
    return output_kind(kind).decode(head.tensor_outputs(raw, image_size))
