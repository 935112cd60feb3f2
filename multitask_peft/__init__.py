"""multitask-peft: parameter-efficient multi-task vision on one frozen timm backbone."""

__version__ = "0.1.0"

from . import peft, tasks  # noqa: E402  (tasks registers the heads)
from .export import export_onnx  # noqa: E402
from .heads import FeatureInfo, Features, HeadConfig  # noqa: E402
from .model import MultiTaskModel, Task  # noqa: E402
from .onnx_runner import OnnxRunner  # noqa: E402
from .ppt import ppt  # noqa: E402

__all__ = [
    "Features",
    "FeatureInfo",
    "HeadConfig",
    "MultiTaskModel",
    "OnnxRunner",
    "Task",
    "export_onnx",
    "peft",
    "ppt",
    "tasks",
    "__version__",
]


def __getattr__(name: str) -> object:
    # `mtp.serving` on first use: it needs the `serve` extra, and the core never imports it
    if name == "serving":
        import importlib

        return importlib.import_module(".serving", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
